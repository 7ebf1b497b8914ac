"""Greedy caption decoding: mmfm with its KV cache against mmfm without it, and against Hugging Face GPT-2.

mmfm decodes from an image prefix plus BOS, exactly as `model.caption(images=..., use_cache=...)` does
(`CachedDecoder` or `RecomputingDecoder` driven by `mmfm.text_generation.generate`). The loop is called directly
with an EOS id no token can have (-1), so every row runs the full `max_new_tokens` whatever the random
weights predict; image preprocessing and encoding happen once, outside the clock, since they are the same
for every variant and GPT-2 has no image. GPT-2 gets a random prompt of the same length and
`generate(do_sample=False, use_cache=True, min_new_tokens=max_new_tokens)`, so it also emits exactly
`max_new_tokens` tokens. Both run under `torch.inference_mode`.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Result, compare, setup
from benchmarks.peers import DecoderSize, count_parameters, gpt2_twin, mmfm_decoder
from mmfm.config import ImageEncoderConfig
from mmfm.decoding import CachedDecoder, RecomputingDecoder
from mmfm.text_generation import GenerationConfig, generate

CACHE_TARGET = 3.0
HF_TARGET = 1.0
NEVER = -1  # an EOS id no token has


def main(quick: bool = False) -> list[Result]:
    """Prints one timing table per batch size and returns t_uncached / t_cached and t_hf / t_mmfm per batch."""
    setup()
    if quick:
        size, new_tokens, image_px = DecoderSize(dim=64, depth=2, num_heads=4, max_seq_len=64), 16, 32
        rounds = {1: (3, 3), 8: (3, 3)}
    else:
        # nanoGPT's character-level "baby GPT" (6 x 384, 6 heads). Uncached decoding costs O(new_tokens^2)
        # token passes: at batch 8 one uncached run of this size takes ~11 s on 2 cores, and 512 x 8 about
        # 2.4x that, which would push the suite past its few-minute budget.
        size, new_tokens, image_px = DecoderSize(dim=384, depth=6, num_heads=6, max_seq_len=256), 128, 64
        rounds = {1: (5, 7), 8: (3, 7)}  # batch -> (rounds against the uncached loop, rounds against GPT-2)
    image = ImageEncoderConfig(model_name="vit_tiny_patch16_224", img_size=image_px, patch_size=16, depth=2)
    model = mmfm_decoder(size, image)
    hf = gpt2_twin(model)
    config = GenerationConfig(max_new_tokens=new_tokens)
    print(
        f"\ndecoder: {size}, byte vocab {model.tokenizer.vocab_size}; backbone + embedding parameters: "
        f"mmfm {(count_parameters(model.backbone) + count_parameters(model.token_embedding)) / 1e6:.1f}M, "
        f"GPT-2 {count_parameters(hf) / 1e6:.1f}M; {new_tokens} new tokens, greedy, fp32, "
        f"{torch.get_num_threads()} threads"
    )

    results = []
    for batch, (cache_rounds, hf_rounds) in rounds.items():
        with torch.inference_mode():
            pixels = torch.randn(batch, 3, image_px, image_px)
            bos = torch.full((batch, 1), model.tokenizer.bos_id)
            prompt = model.sequence({"image": pixels}, bos, torch.ones_like(bos, dtype=torch.bool))
            prompt_ids = torch.randint(0, model.tokenizer.vocab_size, prompt.mask.shape)

            def cached(prompt=prompt):
                return generate(CachedDecoder(model.decoder_parts(), prompt, new_tokens), config, NEVER)

            def uncached(prompt=prompt):
                return generate(RecomputingDecoder(model.decoder_parts(), prompt), config, NEVER)

            def gpt2(prompt_ids=prompt_ids):
                return hf.generate(
                    input_ids=prompt_ids,
                    attention_mask=torch.ones_like(prompt_ids),
                    do_sample=False,
                    use_cache=True,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                )

            cached()  # the uncached side warms up on its own first steps; a warmup call would cost a whole run
            vs_uncached = compare({"mmfm_cache": cached, "mmfm_no_cache": uncached}, rounds=cache_rounds, warmup=0)
            vs_hf = compare({"mmfm_cache": cached, "hf_gpt2_cache": gpt2}, rounds=hf_rounds)
        out = vs_uncached.outputs
        if out["mmfm_cache"] != out["mmfm_no_cache"]:
            raise AssertionError("cached and uncached decoding generated different tokens")
        hf_new = vs_hf.outputs["hf_gpt2_cache"].shape[1] - prompt.mask.shape[1]
        lengths = {len(row) for row in out["mmfm_cache"]} | {hf_new}
        if lengths != {new_tokens}:
            raise AssertionError(f"expected {new_tokens} new tokens from every decoder, got lengths {lengths}")

        where = f"batch {batch}, prompt {prompt.mask.shape[1]} tokens ({prompt.segments[0].end} image + BOS)"
        print(vs_uncached.format(f"KV cache, {where}"))
        print(vs_hf.format(f"vs GPT-2, {where}"))
        results += [
            Result(
                f"decode_cache_b{batch}",
                vs_uncached.ratio("mmfm_cache", "mmfm_no_cache"),
                CACHE_TARGET,
                "t_no_cache / t_cache",
            ),
            Result(f"decode_vs_hf_b{batch}", vs_hf.ratio("mmfm_cache", "hf_gpt2_cache"), HF_TARGET, "t_hf / t_mmfm"),
        ]
    return results


if __name__ == "__main__":
    main()
