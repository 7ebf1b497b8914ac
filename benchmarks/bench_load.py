"""Loading pretrained weights: `mmfm.load` against timm and open_clip loading their own local safetensors files.

Each side first writes its randomly initialised model to a local file: mmfm-base with `save_pretrained`
(config.yaml + model.safetensors), timm ViTs and an open_clip CLIP as single safetensors files. Then each round
times a cold call of the library's loading entry point, all in one process, interleaved:

    mmfm.load(directory)
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    open_clip.create_model(name, pretrained=path)

The files are in the page cache after the warm-up round, so this measures building + filling the model, not the
disk. The models differ in size, so the ratios are per byte of weights: (t_peer / bytes_peer) / (t_mmfm /
bytes_mmfm), above 1 when mmfm loads a byte faster. timm's ViT-L/16 (304M parameters) is nearly mmfm-base's size
(301M), so its ratio is close to the raw time ratio too. mmfm builds the model with meta parameters and takes the
memory-mapped tensors as they are, so its pages are read when first used: a second mmfm line (not a ratio) times
`mmfm.load` plus a first read of every weight.

Peak RSS is measured per load in a fresh process (VmHWM, reset after the imports) and reported as the RSS added
over the process after importing the libraries, against the weights file's size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import open_clip
import timm
import torch
from safetensors.torch import save_file

import mmfm
from benchmarks.harness import Ratio, Result, compare, peak_rss, setup, table

TARGET_TIME = 1 / 1.2  # mmfm may take at most 1.2x a peer's time per byte
TARGET_RSS = 1 / 1.3  # the RSS a load adds may be at most 1.3x the weights' size


def main(quick: bool = False) -> list[Result]:
    """Prints the timing and memory tables; returns per-byte speed ratios and the RSS headroom."""
    setup()
    preset, rounds = ("mmfm-test", 2) if quick else ("mmfm-base", 5)
    # timm's ViT-B/16 (mmfm-base's image encoder), and a timm ViT of mmfm-base's size (ViT-L/16: 304M parameters)
    timm_names = ["vit_tiny_patch16_224"] * 2 if quick else ["vit_base_patch16_224", "vit_large_patch16_224"]
    clip_name = "ViT-S-32" if quick else "ViT-B-32"
    with tempfile.TemporaryDirectory(prefix="mmfm-bench-load-") as tmp:
        tmp = Path(tmp)
        files = _write_checkpoints(tmp, preset, timm_names, clip_name)
        sizes = {name: _weights_bytes(path) for name, path in files.items()}
        loaders = {"mmfm": lambda: mmfm.load(files["mmfm"])}
        for name in timm_names:
            loaders[f"timm {name}"] = lambda name=name: _load_timm(name, files[f"timm {name}"])
        loaders[f"open_clip {clip_name}"] = lambda: _load_open_clip(clip_name, files[f"open_clip {clip_name}"])
        loaders["mmfm + first read"] = lambda: _touch(mmfm.load(files["mmfm"]))

        result = compare(loaders, rounds=rounds, warmup=1)
        print(f"\nloading {preset} with mmfm.load vs timm and open_clip, local safetensors, warm page cache")
        rows = [
            [name, f"{sizes.get(name, sizes['mmfm']) / 2**20:.0f} MiB", f"{result.median(name):.2f} s"]
            for name in loaders
        ]
        print(table(["loader", "weights", "median time"], rows))

        results = []
        peers = {"load_vs_timm": f"timm {timm_names[0]}", "load_vs_timm_large": f"timm {timm_names[1]}"}
        peers["load_vs_open_clip"] = f"open_clip {clip_name}"
        for key, peer in peers.items():
            ratio = _per_byte(result.times["mmfm"], result.times[peer], sizes["mmfm"], sizes[peer])
            print(f"mmfm vs {peer}: {ratio} (per byte; above 1: mmfm loads a byte faster)")
            results.append(Result(key, ratio, TARGET_TIME, "(t/B)_peer / (t/B)_mmfm"))

        runs = [("mmfm.load + first read", _rss_mmfm, (str(files["mmfm"]), True))]
        if not quick:  # a fresh interpreter per measurement: too slow for the smoke run
            runs += [
                ("mmfm.load", _rss_mmfm, (str(files["mmfm"]), False)),
                *[(f"timm {n}", _load_timm, (n, str(files[f"timm {n}"]))) for n in dict.fromkeys(timm_names)],
                (f"open_clip {clip_name}", _load_open_clip, (clip_name, str(files[f"open_clip {clip_name}"]))),
            ]
        rss_rows, headroom = [], None
        for name, fn, args in runs:
            rss = peak_rss(fn, *args)
            size = sizes["mmfm"] if name.startswith("mmfm") else sizes[name]
            added = (rss.peak - rss.baseline) * 2**20
            rss_rows.append(
                [name, f"{size / 2**20:.0f} MiB", f"{added / 2**20:.0f} MiB", f"{added / size:.2f}x", str(rss)]
            )
            if name == "mmfm.load + first read":
                headroom = size / added
        print("\npeak RSS while loading, each in a fresh process, over the RSS after importing mmfm, timm, open_clip")
        print(table(["loader", "weights", "added RSS", "added / weights", "detail"], rss_rows))
        results.append(
            Result("load_rss", Ratio(headroom, headroom, headroom), TARGET_RSS, "weights / added RSS, mmfm + read")
        )
    return results


def _write_checkpoints(tmp: Path, preset: str, timm_names: list[str], clip_name: str) -> dict[str, Path]:
    """Writes every side's randomly initialised weights once; returns what each loader is given."""
    files = {"mmfm": tmp / "mmfm"}
    mmfm.create_model(preset).save_pretrained(files["mmfm"])
    for name in dict.fromkeys(timm_names):
        files[f"timm {name}"] = tmp / f"{name}.safetensors"
        save_file(timm.create_model(name, pretrained=False).state_dict(), files[f"timm {name}"])
    files[f"open_clip {clip_name}"] = tmp / f"{clip_name}.safetensors"
    state = open_clip.create_model(clip_name, pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, files[f"open_clip {clip_name}"])
    return files


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _per_byte(t_mmfm: list[float], t_peer: list[float], b_mmfm: int, b_peer: int) -> Ratio:
    ratios = sorted((p / b_peer) / (m / b_mmfm) for m, p in zip(t_mmfm, t_peer))
    return Ratio(ratios[len(ratios) // 2], ratios[0], ratios[-1])


def _load_timm(name: str, path: str | Path) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


def _load_open_clip(name: str, path: str | Path) -> torch.nn.Module:
    return open_clip.create_model(name, pretrained=str(path)).eval()


def _touch(model: torch.nn.Module) -> torch.nn.Module:
    """Reads every weight once (as a first forward pass would), so memory-mapped pages become resident."""
    total = torch.zeros(())
    for p in model.parameters():
        total += p.detach().float().sum()
    return model


def _rss_mmfm(path: str, read: bool) -> None:
    model = mmfm.load(path)
    if read:
        _touch(model)


if __name__ == "__main__":
    main()
