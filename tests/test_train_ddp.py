"""`torchrun --nproc_per_node 2 -m namedmask train` on CPU (gloo): trains, and every rank ends
with the same weights (digests gathered into summary.json); the checkpoint resumes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from namedmask.stages.evaluate import evaluate_checkpoint
from namedmask.report import read_metrics
from synthetic import tiny_train_overrides, write_archive, write_labeled_folder

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "namedmask", "-q", "train", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def run_two_ranks(tmp_path):
    archive, masks, _ = write_archive(tmp_path / "w", per_class=4)
    val = write_labeled_folder(tmp_path / "val", count=5, size=48)
    out = tmp_path / "run"
    extra = ["checkpoint_every=2", "model.dropout=0.5", "val.dataset=folder", f"val.root={val}", "val.every=2"]
    sets = [a for o in tiny_train_overrides(4, batch=4, crop=32) + extra for a in ("--set", o)]
    res = torchrun(["--archive", str(archive), "--masks", str(masks), "--out", str(out), *sets], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["rank_digests"]) == 2
    assert summary["rank_digests"][0] == summary["rank_digests"][1]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 4 and state["world_size"] == 2 and len(state["rng"]["torch"]) == 2
    # rank 0 reads sample numbers (i*2 + 0)*2 + [0, 2): two images per iteration, 4 iterations logged
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4] and all(len(r["images"]) == 2 for r in records)
    # validation is sharded over the ranks (3 + 2 images) and its confusion matrices all-reduced
    val_records = [r for r in read_metrics(out) if "val_miou" in r]
    assert [r["iteration"] for r in val_records] == [2, 4]
    single = evaluate_checkpoint(out, "folder", val, device="cpu", progress=False)
    assert val_records[-1]["val_miou"] == pytest.approx(single.metrics.miou, abs=1e-12)
    return archive, masks, out, sets


def test_two_process_gloo_run_has_equal_weights_on_every_rank(tmp_path):
    run_two_ranks(tmp_path)


@pytest.mark.slow
def test_two_process_run_resumes(tmp_path):
    archive, masks, out, sets = run_two_ranks(tmp_path)
    # extend the finished run by two iterations: it resumes at 5 on both ranks
    sets += ["--set", "iterations=6"]
    res = torchrun(["--archive", str(archive), "--masks", str(masks), "--out", str(out), *sets], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["iteration"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rank_digests"][0] == summary["rank_digests"][1]
