"""The benchmark suite runs end to end: `python -m benchmarks.run_all --quick` exits 0 and reports every ratio.

`test_quick_chat_run_reports_its_ratios` runs bench_chat alone (`--only chat`), for a quick check of that one.

Speed itself is never asserted (see DESIGN.md); this only keeps the benchmarks from rotting as the API moves.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmarks race Hugging Face GPT-2 (the 'bench' extra)")

REPO = Path(__file__).resolve().parents[1]
CHAT_RATIOS = ("chat_train_vs_hf", "chat_train_frozen_vs_hf", "chat_decode_image_vs_text")
RATIOS = (
    "image_encoder",
    "decode_cache_b1",
    "decode_vs_hf_b1",
    "decode_cache_b8",
    "decode_vs_hf_b8",
    "train_step_vs_hf",
    "trainer_vs_hand_loop",
    "loader_vs_trainer",
    "load_vs_timm",
    "load_vs_timm_large",
    "load_vs_open_clip",
    "load_rss",
    "image_gen_sampling",
    "embed_rss",
    "embed_batch_speedup",
    "import_vs_torch",
    "help_vs_torch",
    "model_import_vs_torch",
    "llm_decode_b1",
    "llm_decode_b8",
    "llm_bandwidth_b1",
    "llm_prefill",
    *CHAT_RATIOS,
    "cider_d_vs_pycocoevalcap",
    "bleu_vs_pycocoevalcap",
    "rouge_l_vs_pycocoevalcap",
    "eval_batched_vs_item_by_item",
    "serve_batching_throughput",
    "serve_http_latency",
)
# bench_build_caption compares against a commit of this repository's history: a clone without it skips them.
BASELINE_RATIOS = (
    "build_vs_baseline",
    "import_build_vs_baseline",
    "load_vs_baseline",
    "caption_vs_baseline",
    "build_caption_process_vs_baseline",
)


def _has_baseline() -> bool:
    from benchmarks.bench_build_caption import BASELINE

    verify = ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{BASELINE}^{{commit}}"]
    return subprocess.run(verify, capture_output=True).returncode == 0


def _quick_run(*args: str) -> str:
    """The stdout of `python -m benchmarks.run_all --quick *args`, which must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _assert_ratio_lines(stdout: str, names: tuple[str, ...]) -> None:
    summary = stdout.split("\nsummary (quick run")[-1]
    for name in names:
        # e.g. "decode_vs_hf_b8   t_hf / t_mmfm   2.15x   1.87  2.43  >= 1x   PASS"
        line = rf"^{name}\s+.+?\s+\d+\.\d\dx\s+\d+\.\d\d\s+\d+\.\d\d\s+>= [\d.]+x\s+(PASS|MISS)$"
        assert re.search(line, summary, re.MULTILINE), f"no ratio line for {name} in:\n{stdout[-3000:]}"


def test_quick_run_reports_every_ratio():
    stdout = _quick_run()
    _assert_ratio_lines(stdout, RATIOS + (BASELINE_RATIOS if _has_baseline() else ()))
    assert "peak" in stdout and "MiB" in stdout  # the train step's peak RSS of both sides
