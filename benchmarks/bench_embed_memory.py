"""Batched embedding: peak RSS of `mmfm embed` over many images vs few, and model.embed's default batch vs 1.

1. Memory: `mmfm embed --model mmfm-small IMAGES... --out x.npy` over 1,000 images and over 32 (quick run:
   mmfm-test, 64 and 8), each in a fresh process, from 224x224 gradient PNGs the benchmark writes. The child
   runs the command line's `main` itself and reads its own high-water mark (VmHWM in /proc/self/status) at the
   end: `getrusage(RUSAGE_CHILDREN).ru_maxrss` is not used, because on Linux it is the largest of all children
   so far and a child inherits the parent's high-water mark through fork + exec (see harness.peak_rss). A
   watchdog stops a child whose RSS passes --rss-limit-gib (default: half the memory available at the start),
   so a code that holds every image at once (mmfm before issue 10) cannot take the machine down; its peak is
   then reported as "over the limit" and the ratio is a bound. Target: peak(1,000) <= 1.2 x peak(32), reported
   as peak(32) / peak(1,000) >= 0.83 so that above the target reads as good, like every summary line.
2. Throughput: images/s of `model.embed(images=...)` at its default batch size vs `batch_size=1`, same model,
   same PIL images, in this process, interleaved rounds (harness.compare). Target >= 3x. Skipped, with a line
   that says so, when the installed mmfm's `embed` has no `batch_size` (mmfm before issue 10).

    python -m benchmarks.bench_embed_memory [--quick] [--device cuda] [--rss-limit-gib 8]
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmfm
from benchmarks.harness import THREADS, Ratio, Result, compare, setup, table

RSS_TARGET = 1 / 1.2  # peak(few) / peak(many)
SPEED_TARGET = 3.0  # t(batch_size=1) / t(default batch size)

# Run by `python -c` in a fresh interpreter: argv[1] is where to write the result, the rest is the command line.
CHILD = r"""
import json, sys, torch
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
torch.set_num_threads(int(sys.argv[2]))
from mmfm.cli import main
after_imports = status("VmRSS")
code = main(sys.argv[3:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "after_imports_kib": after_imports, "peak_kib": status("VmHWM")}, f)
"""


def main(quick: bool = False, device: str | None = None, rss_limit_gib: float | None = None) -> list[Result]:
    """Prints the memory and throughput tables; returns the RSS ratio and, when embed batches, the speed-up."""
    setup()
    preset = "mmfm-test" if quick else "mmfm-small"
    many, few = (64, 8) if quick else (1000, 32)
    limit_kib = int((rss_limit_gib or _available_gib() / 2) * 2**20)
    print(f"\nmmfm from {Path(mmfm.__file__).parent}")
    results = []
    with tempfile.TemporaryDirectory(prefix="mmfm-bench-embed-") as tmp:
        tmp = Path(tmp)
        paths = _write_images(tmp / "images", many, size=64 if quick else 224)
        peaks = {}
        rows = []
        for n in (few, many):
            start = time.perf_counter()
            run = _cli_peak_rss(preset, paths[:n], tmp, limit_kib)
            seconds = time.perf_counter() - start
            peaks[n] = run
            peak = (
                f"> {limit_kib / 2**20:.1f} GiB (stopped)" if run["stopped"] else f"{run['peak_kib'] / 2**10:.0f} MiB"
            )
            imports = "-" if run["stopped"] else f"{run['after_imports_kib'] / 2**10:.0f} MiB"
            rows.append([str(n), peak, imports, f"{seconds:.1f} s"])
        print(f"\nmmfm embed --model {preset} IMAGES... --out x.npy, each in a fresh process, {THREADS} threads")
        print(table(["images", "peak RSS (VmHWM)", "RSS after importing mmfm.cli", "wall"], rows))
        if peaks[few]["stopped"]:
            print(f"the {few}-image run passed the RSS limit: no memory ratio")
        else:
            value = peaks[few]["peak_kib"] / (limit_kib if peaks[many]["stopped"] else peaks[many]["peak_kib"])
            bound = " (at most: the many-image run was stopped)" if peaks[many]["stopped"] else ""
            print(f"peak RSS {many} / {few} images: {1 / value:.2f}x{bound} (target <= {1 / RSS_TARGET:.1f}x)")
            results.append(Result("embed_rss", Ratio(value, value, value), RSS_TARGET, f"RSS_{few} / RSS_{many}"))

        speed = _throughput(preset, paths, quick, device)
        if speed is not None:
            results.append(speed)
    return results


def _throughput(preset: str, paths: list[Path], quick: bool, device: str | None) -> Result | None:
    parameter = inspect.signature(mmfm.MultimodalModel.embed).parameters.get("batch_size")
    if parameter is None:
        print(
            "\nembed throughput: skipped, this mmfm's model.embed has no batch_size argument "
            "(every input goes through as one batch)"
        )
        return None
    model = mmfm.create_model(preset).eval()
    if device is not None:
        model.to(device)
    count, rounds = (8, 2) if quick else (128, 3)
    images = [Image.open(p).convert("RGB") for p in paths[:count]]
    result = compare(
        {
            "default": lambda: model.embed(images=images),
            "batch_size=1": lambda: model.embed(images=images, batch_size=1),
        },
        rounds=rounds,
    )
    difference = (result.outputs["default"] - result.outputs["batch_size=1"]).abs().max().item()
    if difference > 1e-3:
        raise AssertionError(f"embeddings differ between batch sizes by up to {difference:.2e}")
    where = f"{model.device}, {torch.get_num_threads()} threads"
    print(f"\nmodel.embed throughput, {preset}, {count} images, default batch size {parameter.default}, {where}")
    rows = [[name, f"{result.median(name):.2f} s", f"{count / result.median(name):.1f}"] for name in result.times]
    print(table([f"batch size, {rounds} rounds", "median time", "images/s"], rows))
    speed = result.ratio("default", "batch_size=1")
    print(f"default batch vs batch_size=1: {speed} (max |difference| of the embeddings {difference:.1e})")
    return Result("embed_batch_speedup", speed, SPEED_TARGET, "t_batch1 / t_default")


def _cli_peak_rss(preset: str, paths: list[Path], tmp: Path, limit_kib: int) -> dict:
    """Runs `mmfm embed` over `paths` in a fresh interpreter; returns its peak RSS, or stopped=True past the limit."""
    result, out = tmp / "rss.json", tmp / "x.npy"
    result.unlink(missing_ok=True)
    argv = ["embed", "--model", preset, *map(str, paths), "--out", str(out)]
    command = [sys.executable, "-c", CHILD, str(result), str(THREADS), *argv]
    with open(tmp / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(command, cwd=tmp, stdout=subprocess.DEVNULL, stderr=stderr)
        stopped = False
        while proc.poll() is None:
            if _rss_kib(proc.pid) > limit_kib:
                proc.kill()
                proc.wait()
                stopped = True
                break
            time.sleep(0.05)
        if stopped:
            return {"stopped": True}
        stderr.seek(0)
        if proc.returncode != 0 or not result.exists() or json.loads(result.read_text())["code"] != 0:
            raise RuntimeError(f"mmfm embed over {len(paths)} images failed:\n{stderr.read()[-3000:]}")
    if np.load(out).shape[0] != len(paths):
        raise RuntimeError(f"mmfm embed wrote {np.load(out).shape[0]} embeddings for {len(paths)} images")
    return {"stopped": False, **json.loads(result.read_text())}


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except (FileNotFoundError, ProcessLookupError):  # it just exited
        return 0


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib / 2**20


def _write_images(folder: Path, count: int, size: int) -> list[Path]:
    """`count` RGB gradient PNGs, each with its own colours, so every image is a different input."""
    folder.mkdir()
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    x, y = np.meshgrid(ramp, ramp)
    paths = []
    for i in range(count):
        phase = i / count
        rgb = np.stack([(x + phase) % 1.0, (y + 2 * phase) % 1.0, (x * y + 3 * phase) % 1.0], axis=-1)
        path = folder / f"{i:05d}.png"
        Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mmfm-test, few images and rounds, for a smoke run")
    parser.add_argument("--device", help="device of the throughput part (default: the model's, CPU)")
    parser.add_argument("--rss-limit-gib", type=float, help="stop a child past this RSS (default: half of available)")
    args = parser.parse_args()
    main(quick=args.quick, device=args.device, rss_limit_gib=args.rss_limit_gib)
