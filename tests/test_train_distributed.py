"""torchrun on CPU (gloo): 2-rank DDP equals 1 rank, FSDP2 trains and saves loadable weights, a dead rank fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

import mmfm
from mmfm.train import TrainConfig, train
from mmfm.train.run_log import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(recipe, *overrides: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mmfm",
        "train",
        str(recipe),
        *overrides,
    ]


def step_losses(run_dir) -> dict[int, float]:
    series = read_metrics(run_dir / "metrics.csv")
    return {
        s: v for name, pts in series.items() if name.startswith("train/") and name.endswith("/loss") for s, v in pts
    }


def test_two_rank_ddp_matches_one_rank_on_the_same_global_batch(make_recipe, tmp_path):
    train(TrainConfig.from_file(make_recipe("single", steps=5)))
    recipe = make_recipe("ddp", steps=5, distributed="ddp")
    done = subprocess.run(torchrun(recipe), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4, 5]
    for step in single:
        assert abs(single[step] - ddp[step]) <= 1e-5, (step, single[step], ddp[step])


def test_two_rank_fsdp2_trains_and_its_checkpoint_loads_in_one_process(make_recipe, tmp_path):
    recipe = make_recipe("fsdp", steps=4, distributed="fsdp", checkpoint_every=2, mixing="all")
    done = subprocess.run(torchrun(recipe), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "fsdp"
    model = mmfm.load(run / "final")
    init = mmfm.create_model("mmfm-test").state_dict()
    trained = load_file(run / "final" / "model.safetensors")
    changed = [k for k in trained if not torch.equal(trained[k], init[k])]
    assert any(k.startswith("backbone.blocks.") for k in changed)  # the sharded blocks were trained and gathered
    assert mmfm.load(run / "checkpoints" / "step-000002") is not None
    assert model.caption(images=[torch.zeros(3, 32, 32)], max_new_tokens=2) is not None


def test_a_rank_that_dies_ends_the_job_with_an_error_not_a_hang(make_recipe, tmp_path):
    recipe = make_recipe("dies", steps=100000, distributed="ddp")
    job = subprocess.Popen(torchrun(recipe), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "dies" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
        time.sleep(0.2)
    workers = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert workers, "no rank-1 worker found"
    workers[0].kill()
    try:
        _, err = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job hung after rank 1 died")
    assert job.returncode != 0
    assert "rank" in err.lower() and ("failed" in err.lower() or "error" in err.lower()), err[-3000:]
