"""The DPM-Solver++ vs DDIM benchmark runs on a saved image_gen model and digits data, and skips without them."""

from __future__ import annotations

import re

import pytest
import torch

import mmfm
from mmfm.data.digits import write_digits


@pytest.fixture()
def bench(monkeypatch):
    """The benchmark module, run on one thread like the rest of the tests."""
    from benchmarks import bench_dpm_vs_ddim, harness

    monkeypatch.setattr(harness, "THREADS", 1)
    return bench_dpm_vs_ddim


def test_reports_speed_accuracy_and_diversity_of_both_samplers(bench, tmp_path, capsys):
    torch.manual_seed(0)
    small = {"block_out_channels": [4, 8], "attention_head_dim": 4, "norm_num_groups": 2}
    model = mmfm.create_model("mmfm-test", image_gen={"channels": 1, "image_size": 8, **small})
    model.save_pretrained(tmp_path / "run" / "final")
    write_digits(tmp_path / "digits", limit=60)
    results = bench.main(quick=True, model_dir=tmp_path / "run", data_dir=tmp_path / "digits", per_digit=2)
    assert [r.name for r in results] == ["dpm20_vs_ddim50_speed", "dpm20_vs_ddim50_accuracy"]
    out = capsys.readouterr().out
    for sampler in ("dpmsolver++_20", "ddim_50"):
        # e.g. "dpmsolver++_20  0.41 s  0.100  0.213": time, judged accuracy, diversity
        assert re.search(rf"^{re.escape(sampler)}\s+\d+\.\d\d s\s+[01]\.\d{{3}}\s+\d\.\d{{3}}$", out, re.M)


def test_skips_cleanly_without_a_checkpoint_or_data(bench, tmp_path, capsys):
    assert bench.main(model_dir=tmp_path / "absent", data_dir=tmp_path) == []
    assert "skipped, no trained checkpoint" in capsys.readouterr().out
    mmfm.create_model("mmfm-test").save_pretrained(tmp_path / "model")
    assert bench.main(model_dir=tmp_path / "model", data_dir=tmp_path / "no-data") == []
    assert "skipped, no " in capsys.readouterr().out
