"""Data-parallel training (issue 17): `stepdiff train` under torchrun, 2 CPU processes with gloo.

A run depends on (seed, global batch, micro-batches) and not on how many processes share it
(stepdiff.train.train): 2 processes with one micro-batch each must give the weights of one
process that cuts the same global batch into 2 micro-batches, up to the order of the sums that
average the gradients (DDP's all-reduce against accumulation in one process). Measured on this
project's CPU after 4 steps of the tiny model: bit for bit equal (largest weight difference 0.0:
with two parts, (g0 + g1)/2 and g0/2 + g1/2 round alike, halving being exact), while the same
run with one micro-batch (other noise draws for half the batch) differs by 0.017. The test
allows float tolerance (rtol 1e-5, atol 1e-6), as another process count or NCCL's reduction
order would round differently. Checkpoints are written by rank 0 and resume exactly under
torchrun.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import threads_kept

from stepdiff import checkpoints as ckpt
from stepdiff.runs import train_run

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--data", "digits", "--size", "8", "--condition", "class", "--batch-size", "16", "--label-dropout", "0.25",
        "--steps", "4", "--threads", "1", "--lr", "0.003", "--no-progress",
        "--set", "model.channels=8", "--set", "model.channel_mult=[1, 2]", "--set", "model.attn_levels=[1]",
        "--set", "model.heads=2", "--set", "model.norm_groups=4"]
OVERRIDES = ["data.name=digits", "data.size=8", "data.condition=class", "train.batch_size=16",
             "train.label_dropout=0.25", "train.steps=4", "train.threads=1", "train.lr=0.003", "model.channels=8",
             "model.channel_mult=[1, 2]", "model.attn_levels=[1]", "model.heads=2", "model.norm_groups=4"]


def torchrun(*args, cwd) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "stepdiff", "train", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    out = torchrun(*ARGS, "--micro-batches", "2", "--out", "ddp.pt", cwd=folder)
    with threads_kept():  # a training run sets its own thread count
        single = train_run(None, folder / "one.pt", overrides=[*OVERRIDES, "train.micro_batches=2"])
        plain = train_run(None, folder / "plain.pt", overrides=OVERRIDES)
    return folder, out, single, plain


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_two_processes_equal_one_on_the_same_global_batch(runs):
    folder, out, single, _ = runs
    assert out.count("wrote ddp.pt") == 1  # rank 0 alone reports (and writes)
    ddp, one = ckpt.read_checkpoint(folder / "ddp.pt"), ckpt.read_checkpoint(folder / "one.pt")
    assert ddp["step"] == one["step"] == 4
    assert ddp["metadata"]["world_size"] == 2 and one["metadata"]["world_size"] == 1
    assert ddp["settings"]["batch_size"] == 16 and ddp["settings"]["micro_batches"] == 2  # the global batch
    assert ddp["losses"].tolist() == pytest.approx(one["losses"].tolist(), rel=1e-6)
    for key in ("model",):
        for name, value in ddp[key].items():
            assert torch.allclose(value, one[key][name], rtol=1e-5, atol=1e-6), name
    for name, value in ddp["ema"]["model"].items():
        assert torch.allclose(value, one["ema"]["model"][name], rtol=1e-5, atol=1e-6), name
    # the log is rank 0's, one line per step, with the global batch's mean loss
    lines = (folder / "ddp.log.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_the_tolerance_tells_runs_apart(runs):
    """One micro-batch draws other noise for half the batch: its weights are far outside the tolerance."""
    folder, _, _, _ = runs
    ddp, one, plain = (ckpt.read_checkpoint(folder / f"{n}.pt")["model"] for n in ("ddp", "one", "plain"))
    same, other = max_difference(ddp, one), max_difference(ddp, plain)
    assert other > 100 * max(same, 1e-7), (same, other)


def test_ddp_checkpoints_resume_exactly(runs):
    folder, _, _, _ = runs
    torchrun(*ARGS, "--micro-batches", "2", "--out", "part.pt", "--stop-after", "2", cwd=folder)
    assert ckpt.read_checkpoint(folder / "part.pt")["step"] == 2
    torchrun(*ARGS, "--micro-batches", "2", "--out", "part.pt", "--resume", cwd=folder)
    full, part = ckpt.read_checkpoint(folder / "ddp.pt"), ckpt.read_checkpoint(folder / "part.pt")
    assert torch.equal(full["losses"], part["losses"])
    assert all(torch.equal(v, part["model"][k]) for k, v in full["model"].items())
    assert all(torch.equal(v, part["ema"]["model"][k]) for k, v in full["ema"]["model"].items())


def test_micro_batches_must_fit_the_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "stepdiff", "train", *ARGS, "--micro-batches", "3", "--batch-size", "15", "--out",
                           "x.pt"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "must be a multiple of the number of processes (2)" in proc.stderr
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.log.jsonl").exists()
