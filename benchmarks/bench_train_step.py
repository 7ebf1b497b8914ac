"""One training step of a text-only causal LM: mmfm's text embedding + backbone + tied caption head vs HF GPT-2.

A step is forward, next-token cross-entropy, backward, AdamW step and zeroing the gradients, on the same
random token batch for both. mmfm's loss is `model.caption_loss({}, ids, mask)` (an all-True mask, so the
backbone runs plain causal SDPA); GPT-2's is `model(input_ids=ids, labels=ids).loss`. Peak RSS of a few
steps is measured for each side in its own fresh subprocess.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.harness import Result, compare, peak_rss, setup
from benchmarks.peers import DecoderSize, count_parameters, gpt2_twin, mmfm_decoder

TARGET = 1.0


def trainer(which: str, size: DecoderSize, batch: int, seq_len: int) -> Callable[[], float]:
    """A function doing one training step of a fresh 'mmfm' or 'gpt2' model on a fixed batch; returns the loss."""
    mmfm_model = mmfm_decoder(size)
    model = mmfm_model if which == "mmfm" else gpt2_twin(mmfm_model)
    model.train()
    ids = torch.randint(0, mmfm_model.tokenizer.vocab_size, (batch, seq_len))  # same seed -> same batch
    mask = torch.ones_like(ids, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    def step() -> float:
        if which == "mmfm":
            loss = model.caption_loss({}, ids, mask)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_steps(which: str, size: DecoderSize, batch: int, seq_len: int, steps: int) -> None:
    """Builds a model and runs `steps` training steps: the workload whose peak RSS is measured."""
    step = trainer(which, size, batch, seq_len)
    for _ in range(steps):
        step()


def main(quick: bool = False) -> list[Result]:
    """Prints step times, tokens/s and peak RSS; returns the tokens/s ratio mmfm / GPT-2 (= t_hf / t_mmfm)."""
    if quick:
        size, batch, seq_len, rounds, rss_steps = DecoderSize(64, 2, 4, max_seq_len=32), 2, 32, 3, 1
    else:
        size, batch, seq_len, rounds, rss_steps = DecoderSize(384, 6, 6, max_seq_len=256), 8, 256, 5, 2
    steps = {}
    for which in ("mmfm", "gpt2"):
        setup()  # the same seed before each build, so both train on the same token batch
        steps[which] = trainer(which, size, batch, seq_len)
    reference = mmfm_decoder(size)
    params = {"mmfm": count_parameters(reference), "gpt2": count_parameters(gpt2_twin(reference))}
    print(
        f"\ntrain step: {size}, byte vocab, batch {batch} x {seq_len} tokens, AdamW, fp32, "
        f"{torch.get_num_threads()} threads; parameters mmfm {params['mmfm'] / 1e6:.1f}M, "
        f"GPT-2 {params['gpt2'] / 1e6:.1f}M"
    )
    print(f"first-step loss: mmfm {steps['mmfm']():.3f}, GPT-2 {steps['gpt2']():.3f}")
    result = compare({"mmfm": steps["mmfm"], "hf_gpt2": steps["gpt2"]}, rounds=rounds)
    print(result.format("train step"))
    tokens = batch * seq_len
    print(f"tokens/s: mmfm {tokens / result.median('mmfm'):.0f}, GPT-2 {tokens / result.median('hf_gpt2'):.0f}")
    del steps
    for which in ("mmfm", "gpt2"):
        print(f"{which} {rss_steps} steps, own process: {peak_rss(run_steps, which, size, batch, seq_len, rss_steps)}")
    return [Result("train_step_vs_hf", result.ratio("mmfm", "hf_gpt2"), TARGET, "tok/s mmfm / hf")]


if __name__ == "__main__":
    main()
