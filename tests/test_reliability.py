"""Reliability suite (issue 15): a corpus of bad inputs and faults built here, run through every
command. Each case states its expected outcome and is asserted:

- a bad input or option: exit code != 0, one `Error:` line naming the file or option, no
  traceback (CliRunner records an uncaught exception as `result.exception`; a clean error is
  a SystemExit);
- a tolerated fault: exit 0 and the skip logged and listed;
- a user's file or a dataset next to a refused output: byte-identical afterwards.

Then determinism (two runs of each stage on the same tiny inputs: byte-identical outputs) and a
kill matrix (SIGKILL at random points of a stage, rerun: outputs byte-identical to an
uninterrupted run, no temporaries left); the larger matrix is marked slow."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import click
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from synthetic import one_thread, tiny_train_overrides, write_archive, write_labeled_folder

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = "vit_kwargs={embed_dim: 48, depth: 2, num_heads: 2}"
# The default (ARPACK) eigensolver: TokenCut's tie rule makes it deterministic on the
# degenerate affinities of random weights, so determinism and kill/rerun hold with it too.
SALIENCY_TINY = ["--random-weights", "--short-side", "64", "--batch-size", "4", "--refine", "none",
                 "--set", TINY_VIT, "--device", "cpu"]


def sets(overrides) -> list:
    return [a for o in overrides for a in ("--set", o)]


TRAIN_TINY = sets(tiny_train_overrides(2, batch=2, crop=32))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


def digest_tree(folder: Path, skip=()) -> dict:
    """{relative path: sha256} of every file under `folder` (names in `skip` left out)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def temporaries(folder: Path) -> list:
    return [p for p in folder.rglob(".*.tmp*")]


# ---------------------------------------------------------------------------------- corpus

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny archive + pseudo-masks, a labelled folder dataset, a trained tiny segmenter and
    a corpus of bad files."""
    root = tmp_path_factory.mktemp("world")
    archive, masks, _ = write_archive(root, per_class=3, size=48)
    val = write_labeled_folder(root / "val", count=3, size=48)
    runner = CliRunner()
    model = root / "model"
    r = runner.invoke(cli, ["-q", "train", "--archive", str(archive), "--masks", str(masks), "--out", str(model)]
                      + TRAIN_TINY)
    assert r.exit_code == 0, r.output
    bad = root / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("chat\nch\xe9vre\n".encode("latin-1"))
    (bad / "kitty.txt").write_text("cat\n| kitty\n")
    (bad / "not-a-mapping.yaml").write_text("- a\n- b\n")
    (bad / "truncated.pt").write_bytes((model / "checkpoint.pt").read_bytes()[:1000])
    (bad / "truncated.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:500])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "photo.jpg")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "photo.jpg").write_bytes((bad / "photo.jpg").read_bytes())
    (bad / "pool").mkdir()
    (bad / "pool" / "list.txt").write_text("../../elsewhere/photo.jpg\n")
    images = bad / "images"
    images.mkdir()
    (images / "good.png").write_bytes((root / "pool" / "disc" / "000.png").read_bytes())
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.png").write_text("not an image\n")
    return {"root": root, "archive": archive, "masks": masks, "val": val, "model": model, "bad": bad}


def mask_variant(world, tmp_path, name, transform) -> Path:
    """A copy of the pseudo-mask folder whose masks are transform(mask array)."""
    out = tmp_path / name
    manifest = json.loads((world["masks"] / "manifest.json").read_text())
    for entry in manifest["masks"].values():
        src = world["masks"] / entry["mask"]
        (out / entry["mask"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(transform(np.array(Image.open(src)))).save(out / entry["mask"])
    manifest["archive"] = os.path.relpath(world["archive"], out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ------------------------------------------------------------------------ bad inputs, one line

def run_cli(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    """Exit != 0, a clean error (no uncaught exception, no traceback), one `Error:` line that
    names each needle."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    # (a progress bar may precede the error on its line)
    errors = [m.group(1) for m in re.finditer(r"(?:^|[^A-Za-z]|\x1b\[A)(Error: .*)", result.output, re.M)]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], result.output


def train_args(world, out, *extra):
    return ["train", "--archive", world["archive"], "--masks", world["masks"], "--out", out, *TRAIN_TINY, *extra]


def saliency_args(world, out, *extra):
    return ["saliency", "--archive", world["archive"], "--out", out, *SALIENCY_TINY, *extra]


# (id, function(world, tmp_path) -> command line, needles the error line must contain)
BAD_OPTIONS = [
    ("train-iterations-negative", lambda w, t: train_args(w, t / "o", "--iterations", "-3"), ["iterations"]),
    ("train-iterations-zero", lambda w, t: train_args(w, t / "o", "--iterations", "0"), ["iterations"]),
    ("train-log-every-0", lambda w, t: train_args(w, t / "o", "--set", "log_every=0"), ["log_every"]),
    ("train-checkpoint-every-0", lambda w, t: train_args(w, t / "o", "--set", "checkpoint_every=0"),
     ["checkpoint_every"]),
    ("train-num-workers-negative", lambda w, t: train_args(w, t / "o", "--set", "num_workers=-1"), ["num_workers"]),
    ("train-crop-size-0", lambda w, t: train_args(w, t / "o", "--set", "augment.crop_size=0"),
     ["augment.crop_size"]),
    ("train-copy-paste-p-2", lambda w, t: train_args(w, t / "o", "--set", "copy_paste.p=2"), ["copy_paste.p"]),
    ("train-lr-nan", lambda w, t: train_args(w, t / "o", "--set", "optim.lr_head=.nan"), ["optim.lr_head"]),
    ("train-amp-bad", lambda w, t: train_args(w, t / "o", "--set", "amp=fp8"), ["amp"]),
    ("train-device-gpu7", lambda w, t: train_args(w, t / "o", "--set", "device=gpu7"), ["gpu7"]),
    ("saliency-tau-nan", lambda w, t: saliency_args(w, t / "o", "--tau", "nan"), ["tau"]),
    ("saliency-tau-2", lambda w, t: saliency_args(w, t / "o", "--tau", "2"), ["tau"]),
    ("saliency-short-side-huge", lambda w, t: saliency_args(w, t / "o", "--short-side", "100000"), ["short_side"]),
    ("saliency-unknown-dino", lambda w, t: saliency_args(w, t / "o", "--dino", "no_such_vit"), ["no_such_vit"]),
    ("saliency-device-gpu7", lambda w, t: saliency_args(w, t / "o", "--device", "gpu7"), ["gpu7"]),
    ("eval-num-classes-negative", lambda w, t: ["eval", "--pred", w["val"] / "labels", "--gt", w["val"] / "labels",
                                                "--num-classes", "-3"], ["--num-classes"]),
    ("eval-num-classes-huge", lambda w, t: ["eval", "--pred", w["val"] / "labels", "--gt", w["val"] / "labels",
                                            "--num-classes", "100000"], ["--num-classes"]),
    ("eval-backend-foo", lambda w, t: ["eval", "--pred", w["val"] / "labels", "--gt", w["val"] / "labels",
                                       "--num-classes", "4", "--backend", "foo"], ["foo"]),
    ("eval-out-is-folder", lambda w, t: ["eval", "--pred", w["val"] / "labels", "--gt", w["val"] / "labels",
                                         "--num-classes", "4", "--out", w["bad"]], ["--out"]),
    ("eval-out-under-a-file", lambda w, t: ["eval", "--pred", w["val"] / "labels", "--gt", w["val"] / "labels",
                                            "--num-classes", "4", "--out", w["bad"] / "kitty.txt" / "m.json"],
     ["kitty.txt"]),
    ("refine-backend-foo", lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks", w["masks"] / "masks",
                                         "--out", t / "o", "--backend", "foo"], ["foo"]),
    ("refine-threshold-2", lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks", w["masks"] / "masks",
                                         "--out", t / "o", "--threshold", "2"], ["threshold"]),
    ("run-config-not-mapping", lambda w, t: ["run", "--config", w["bad"] / "not-a-mapping.yaml", "--out", t / "o"],
     ["not-a-mapping.yaml", "mapping"]),
    ("run-bad-stage-value", lambda w, t: ["run", "--out", t / "o", "--set", "train.iterations=-1"],
     ["train.iterations"]),
    ("build-archive-categories-latin1", lambda w, t: ["build-archive", "--pool", w["root"] / "pool", "--categories",
                                                      w["bad"] / "latin1.txt", "--out", t / "o"], ["latin1.txt"]),
    ("build-archive-categories-empty-name", lambda w, t: ["build-archive", "--pool", w["root"] / "pool",
                                                          "--categories", w["bad"] / "kitty.txt", "--out", t / "o"],
     ["kitty.txt:2"]),
    ("build-archive-pool-escapes", lambda w, t: ["build-archive", "--pool", w["bad"] / "pool" / "list.txt",
                                                 "--categories", "voc", "--out", t / "o", "--model", "nm-tiny"],
     ["list.txt"]),
    ("build-archive-pool-is-image", lambda w, t: ["build-archive", "--pool", w["bad"] / "photo.jpg",
                                                  "--categories", "voc", "--out", t / "o"], ["photo.jpg"]),
    ("build-archive-k-0", lambda w, t: ["build-archive", "--pool", w["root"] / "pool", "--categories", "voc",
                                        "--out", t / "o", "--k", "0"], ["k "]),
    ("build-archive-truncated-pretrained", lambda w, t: ["build-archive", "--pool", w["root"] / "pool",
                                                         "--categories", "voc", "--out", t / "o", "--model", "nm-tiny",
                                                         "--pretrained", w["bad"] / "truncated.pt"], ["truncated.pt"]),
    ("train-truncated-backbone", lambda w, t: train_args(w, t / "o", "--set",
                                                         f"model.pretrained={w['bad'] / 'truncated.pt'}"),
     ["truncated.pt"]),
    ("train-out-is-file", lambda w, t: train_args(w, w["bad"] / "kitty.txt"), ["kitty.txt", "not a folder"]),
    ("predict-unreadable-image", lambda w, t: ["predict", w["bad"] / "images", "--checkpoint", w["model"],
                                               "--out", t / "o", "--no-overlays"], ["empty.jpg", "--skip-bad"]),
]

if not torch.cuda.is_available():  # asking for what this machine lacks
    BAD_OPTIONS += [
        ("saliency-device-cuda-no-gpu", lambda w, t: saliency_args(w, t / "o", "--device", "cuda"), ["cuda"]),
        ("eval-backend-cuda-no-gpu", lambda w, t: ["eval", "--pred", w["val"] / "labels", "--gt", w["val"] / "labels",
                                                   "--num-classes", "4", "--backend", "cuda"], ["cuda"]),
        ("refine-backend-cuda-no-gpu", lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks",
                                                     w["masks"] / "masks", "--out", t / "o", "--backend", "cuda"],
         ["cuda"]),
    ]


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_input_is_one_line_error(world, tmp_path, case):
    _, make, needles = case
    assert_one_line_error(run_cli(make(world, tmp_path)), *needles)


def test_truncated_model_safetensors_next_to_meta(world, tmp_path):
    """A run folder whose model.safetensors was cut short: one line naming it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_bytes((world["model"] / "model.json").read_bytes())
    (run / "model.safetensors").write_bytes((world["model"] / "model.safetensors").read_bytes()[:300])
    result = run_cli(["predict", world["bad"] / "images" / "good.png", "--checkpoint", run, "--out", tmp_path / "o"])
    assert_one_line_error(result, "model.safetensors")


# ------------------------------------------------------------------- silently wrong, refused

@pytest.mark.parametrize("kind,transform,needles", [
    ("0-255", lambda m: m * 255, ["none of the", "0/255"]),
    ("value-7", lambda m: np.where(m == 1, 7, 0).astype(np.uint8), ["value 7"]),
    ("no-foreground", lambda m: np.zeros_like(m), ["none of the"]),
    ("rgb", lambda m: np.stack([m] * 3, -1), ["RGB"]),
])
def test_bad_pseudo_masks_fail_before_training(world, tmp_path, kind, transform, needles):
    masks = mask_variant(world, tmp_path, kind, transform)
    out = tmp_path / "run"
    result = run_cli(["train", "--archive", world["archive"], "--masks", masks, "--out", out, *TRAIN_TINY])
    assert_one_line_error(result, *needles)
    assert not (out / "checkpoint.pt").exists() and not (out / "model.safetensors").exists()


def test_error_in_a_dataloader_worker_is_one_line(world, tmp_path):
    """An image that fails to decode inside a worker process: the worker's traceback is not
    the message; the error names the image."""
    root = tmp_path / "w"
    archive, masks, _ = write_archive(root, per_class=2, size=32)
    (root / "pool" / "disc" / "000.png").write_bytes(b"\x89PNG broken")
    result = run_cli(["train", "--archive", archive, "--masks", masks, "--out", tmp_path / "o", *TRAIN_TINY,
                      "--set", "num_workers=1"])
    assert_one_line_error(result, "000.png")


def test_saliency_refuses_an_out_made_for_another_archive(world, tmp_path):
    out = tmp_path / "sal"
    assert run_cli(saliency_args(world, out)).exit_code == 0
    other = json.loads(world["archive"].read_text())
    other["archives"]["disc"] = other["archives"]["disc"][:1]
    y = world["archive"].parent / "archive_y.json"
    y.write_text(json.dumps(other))
    before = digest_tree(out)
    result = run_cli(["saliency", "--archive", y, "--out", out, *SALIENCY_TINY])
    assert_one_line_error(result, "archive")
    assert digest_tree(out) == before


# ---------------------------------------------------------------------- user files untouched

def test_predict_into_a_dataset_root_is_refused(world, tmp_path):
    before = digest_tree(world["val"])
    result = run_cli(["predict", world["val"] / "images", "--checkpoint", world["model"], "--out", world["val"]])
    assert_one_line_error(result, str(world["val"]), "did not make")
    assert digest_tree(world["val"]) == before


@pytest.mark.parametrize("command", ["train", "saliency", "refine", "predict", "build-archive", "experts", "run"])
def test_every_stage_refuses_a_folder_of_user_files(world, tmp_path, command):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work\n")
    (user / "labels").mkdir()
    (user / "labels" / "a.png").write_bytes(b"\x89PNG user")
    before = digest_tree(user)
    w = world
    args = {
        "train": train_args(w, user),
        "saliency": saliency_args(w, user),
        "refine": ["refine", "--images", w["root"] / "pool", "--masks", w["masks"] / "masks", "--out", user],
        "predict": ["predict", w["bad"] / "images" / "good.png", "--checkpoint", w["model"], "--out", user],
        "build-archive": ["build-archive", "--pool", w["root"] / "pool", "--categories", "voc", "--out", user,
                          "--model", "nm-tiny"],
        "experts": ["experts", "--archive", w["archive"], "--masks", w["masks"], "--out", user],
        "run": ["run", "--out", user, "--stages", "archive"],
    }[command]
    assert_one_line_error(run_cli(args), "did not make")
    assert digest_tree(user) == before


def test_pool_line_escaping_its_folder_writes_nothing_outside(world, tmp_path):
    victim = world["root"] / "elsewhere" / "photo.jpg"
    before = victim.read_bytes()
    run_cli(["build-archive", "--pool", world["bad"] / "pool" / "list.txt", "--categories", "voc", "--out",
             tmp_path / "o", "--model", "nm-tiny"])
    assert victim.read_bytes() == before
    assert not (world["root"] / "elsewhere" / "photo.png").exists()


def test_second_writer_is_refused_naming_the_holder(world, tmp_path):
    """A concurrent `train` into one --out: the second fails with the first one's pid."""
    from namedmask import io

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from namedmask import io\n"
        f"with io.output_folder({str(out)!r}, 'train'):\n"
        "    print('locked', flush=True); time.sleep(60)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_cli(train_args(world, out))
        assert_one_line_error(result, f"pid {holder.pid}")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(train_args(world, out)).exit_code == 0  # the lock died with its holder
    assert io.OutputLock  # (the primitive under test)


# ------------------------------------------------------------------------ tolerated, listed

def test_predict_skip_bad_continues_and_lists(world, tmp_path, caplog):
    out = tmp_path / "pred"
    result = run_cli(["predict", world["bad"] / "images", "--checkpoint", world["model"], "--out", out,
                      "--no-overlays", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["good.png"]
    skipped = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "empty.jpg" in skipped and "text.png" in skipped


def test_refine_lists_a_dangling_mask_symlink(world, tmp_path, caplog):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "disc").mkdir()
    (masks / "disc" / "000.png").write_bytes((world["masks"] / "masks" / "disc" / "000.png").read_bytes())
    (masks / "disc" / "001.png").symlink_to(tmp_path / "gone.png")
    base = ["refine", "--images", world["root"] / "pool", "--masks", masks, "--backend", "torch"]
    assert_one_line_error(run_cli([*base, "--out", tmp_path / "a"]), "bad or missing")
    result = run_cli([*base, "--out", tmp_path / "b", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped 1" in result.output
    assert any("001" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_prepare_check_reports_unreadable_images(world, tmp_path):
    root = write_labeled_folder(tmp_path / "ds", count=2, size=16)
    (root / "images" / "000.png").write_bytes(b"")
    (root / "labels" / "001.png").write_text("not a png\n")
    result = run_cli(["prepare", "check", "--dataset", "folder", "--root", root])
    assert result.exit_code == 1
    assert "000.png  (unreadable" in result.output and "001.png  (unreadable" in result.output


def test_disk_full_is_one_line(world, tmp_path, monkeypatch):
    """OSError 28 while writing a label map: one line, and no temporary left behind."""
    import errno

    from namedmask import io

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "pred"
    result = run_cli(["predict", world["bad"] / "images" / "good.png", "--checkpoint", world["model"],
                      "--out", out, "--no-overlays"])
    assert_one_line_error(result, "No space left on device")
    assert temporaries(out) == []
    assert io  # atomic_path removed its temporary


# ------------------------------------------------------------------------------ determinism

def test_every_stage_is_deterministic(world, tmp_path):
    """Two runs of each stage into two folders: byte-identical outputs (manifests compared
    without the fields that name their own folder)."""
    w = world
    for name in ("a", "b"):
        d = tmp_path / name
        steps = [
            ["build-archive", "--pool", w["root"] / "pool", "--categories", "voc", "--out", d / "archive",
             "--model", "nm-tiny", "--pretrained", "random", "--k", "3", "--batch-size", "4", "--device", "cpu"],
            saliency_args(w, d / "saliency"),
            ["refine", "--images", w["root"] / "pool", "--masks", w["masks"], "--out", d / "refined",
             "--backend", "torch"],
            train_args(w, d / "train"),
            ["predict", w["val"] / "images", "--checkpoint", d / "train", "--out", d / "predict"],
            ["eval", "--checkpoint", d / "train", "--dataset", "folder", "--root", w["val"], "--out",
             d / "metrics.json", "--device", "cpu"],
        ]
        for args in steps:
            result = run_cli(args)
            assert result.exit_code == 0, (args[0], result.output)
    a, b = tmp_path / "a", tmp_path / "b"
    same = ["archive/archive.json", "archive/text_embeddings.safetensors", "train/model.safetensors",
            "metrics.json"]
    for rel in same:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for folder in ("saliency/masks", "refined", "predict"):
        da, db = digest_tree(a / folder, skip=("refine.json", "manifest.json")), \
            digest_tree(b / folder, skip=("refine.json", "manifest.json"))
        assert da and da == db, folder
    ma, mb = (json.loads((d / "saliency" / "manifest.json").read_text()) for d in (a, b))
    assert ma["masks"] == mb["masks"] and ma["archive_sha256"] == mb["archive_sha256"]
    assert json.loads((a / "train" / "summary.json").read_text())["rank_digests"] == \
        json.loads((b / "train" / "summary.json").read_text())["rank_digests"]


# ------------------------------------------------------------------------------ kill matrix

def _subprocess_env():
    # one thread, like the in-process runs they are compared with: training bits depend on it
    return dict(os.environ, OMP_NUM_THREADS="1", NAMEDMASK_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def kill_at(args: list, trigger: Path, pattern: str, delay: float) -> int:
    """Runs `python -m namedmask ARGS`; once a file matching `pattern` exists under `trigger`
    (the stage has started writing), waits `delay` seconds and SIGKILLs it."""
    proc = subprocess.Popen([sys.executable, "-m", "namedmask", "-q", *map(str, args)], env=_subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not any(trigger.glob(pattern)):
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def outputs(stage: str, out: Path) -> dict:
    """What must come out byte-identical (files naming their own folder are left out)."""
    if stage == "saliency":
        return {**digest_tree(out / "masks"), "manifest.masks": json.loads((out / "manifest.json").read_text())["masks"]}
    if stage == "refine":
        return digest_tree(out, skip=(".namedmask.lock", "manifest.json"))
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
            for name in ("model.safetensors",)} | {"metrics": [
                {k: v for k, v in r.items() if k != "seconds"}
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]}


def stage_command(world, stage: str, out: Path) -> tuple:
    """(command line, file pattern that shows the stage is writing)."""
    w = world
    return {
        "saliency": (saliency_args(w, out, "--batch-size", "1"), "masks/*/*.png"),
        "refine": (["refine", "--images", w["root"] / "pool", "--masks", w["masks"], "--out", out,
                    "--backend", "torch", "--set", "batch_size=1"], "*/*.png"),
        "train": (train_args(w, out, "--set", "iterations=8", "--set", "checkpoint_every=1"), "checkpoint.pt"),
    }[stage]


def kill_matrix(world, tmp_path, stages, seeds):
    for stage in stages:
        whole = tmp_path / f"{stage}-whole"
        assert run_cli(stage_command(world, stage, whole)[0]).exit_code == 0
        for seed in seeds:
            out = tmp_path / f"{stage}-killed-{seed}"
            args, pattern = stage_command(world, stage, out)
            delay = random.Random(f"{stage}{seed}").uniform(0.0, 1.0)
            kill_at(args, out, pattern, delay)
            result = run_cli(args)  # the rerun resumes
            assert result.exit_code == 0, (stage, seed, result.output)
            assert outputs(stage, out) == outputs(stage, whole), (stage, seed, delay)
            assert temporaries(out) == [], (stage, seed)


def test_kill_matrix_small(world, tmp_path, monkeypatch):
    monkeypatch.setenv("NAMEDMASK_THREADS", "1")  # the killed subprocess's setting: same threads, same bits
    kill_matrix(world, tmp_path, ["saliency", "train"], seeds=[0])


@pytest.mark.slow
def test_kill_matrix_large(world, tmp_path, monkeypatch):
    monkeypatch.setenv("NAMEDMASK_THREADS", "1")
    kill_matrix(world, tmp_path, ["saliency", "refine", "train"], seeds=range(4))


# =========================================================================================
# Issue 28: the commands added since (discover, zero-shot and two-stage predict, toy-world,
# adapt-clip) held to the same standard. Each class of problem is tested by its mechanism,
# parametrised over every command it applies to, so the next command's version of a bug is
# found here too.

DISCOVER_TINY = ["--model", "nm-tiny", "--dino", "vit_tiny_patch16_224", "--random-weights", "--size", "32",
                 "--templates", "simple", "--k", "3", "--device", "cpu"]
TWO_STAGE_TINY = ["--proposals", "discover", "--model", "nm-tiny", "--text", "disc, square", "--templates",
                  "simple", "--random-dino", "--dino", "vit_tiny_patch16_224", "--size", "32", "--k", "3",
                  "--device", "cpu"]


def vocabulary_file(world) -> Path:
    path = world["root"] / "vocabulary.txt"
    if not path.exists():
        path.write_text("disc | circle\nsquare\ntriangle\nsky\n")
    return path


# command -> function(world, inputs, out, *extra) -> command line; every command that writes one
# set of files per input image (namedmask.data.image_outputs) belongs here.
PER_IMAGE_COMMANDS = {
    "discover": lambda w, inputs, out, *x: ["discover", *inputs, "--out", out, "--vocabulary", vocabulary_file(w),
                                            *DISCOVER_TINY, *x],
    "predict": lambda w, inputs, out, *x: ["predict", *inputs, "--checkpoint", w["model"], "--out", out,
                                          "--device", "cpu", *x],
    "predict-zero-shot": lambda w, inputs, out, *x: ["predict", *inputs, "--model", "nm-tiny", "--text",
                                                    "disc, square", "--templates", "simple", "--short-side", "32",
                                                    "--out", out, "--device", "cpu", *x],
    "predict-two-stage": lambda w, inputs, out, *x: ["predict", *inputs, *TWO_STAGE_TINY, "--out", out, *x],
}
PER_IMAGE = sorted(PER_IMAGE_COMMANDS)


def save_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A small image whose size identifies it (the label map of an image has its size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 90, np.uint8)
    image[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = rng.integers(150, 255, 3, dtype=np.uint8)
    Image.fromarray(image).save(path, quality=95) if path.suffix != ".png" else Image.fromarray(image).save(path)
    return path


def label_size(out: Path, name: str) -> tuple:
    with Image.open(out / "labels" / f"{name}.png") as img:
        return img.size


@pytest.mark.parametrize("command", PER_IMAGE)
def test_stems_that_collide_keep_their_extension(world, tmp_path, command):
    """photo.jpg, photo.png and photo.webp: three label maps, each of its own image (before,
    two of them were silently overwritten)."""
    photos = tmp_path / "photos"
    sizes = {".jpg": (40, 30), ".png": (36, 28), ".webp": (32, 24)}
    for i, (suffix, (w, h)) in enumerate(sizes.items()):
        save_image(photos / f"photo{suffix}", w, h, seed=i)
    save_image(photos / "sub" / "photo.png", 20, 18)  # another folder: its relative path keeps it apart
    out = tmp_path / "out"
    result = run_cli(PER_IMAGE_COMMANDS[command](world, [photos], out))
    assert result.exit_code == 0, result.output
    for suffix, size in sizes.items():
        assert label_size(out, f"photo{suffix}") == size
    assert label_size(out, "sub/photo") == (20, 18)
    assert len(list((out / "labels").rglob("*.png"))) == 4


@pytest.mark.parametrize("command", PER_IMAGE)
def test_an_output_folder_inside_the_input_folder_is_not_scanned(world, tmp_path, command):
    """`cmd photos/ --out photos/found` twice: still 2 images (before: its own outputs became
    inputs, 2 -> 7 images)."""
    photos = tmp_path / "photos"
    save_image(photos / "a.png", 40, 30)
    save_image(photos / "b.jpg", 36, 28)
    out = photos / "found"
    for _ in range(2):
        result = run_cli(PER_IMAGE_COMMANDS[command](world, [photos], out))
        assert result.exit_code == 0, result.output
        assert sorted(p.relative_to(out / "labels").as_posix() for p in (out / "labels").rglob("*.png")) == \
            ["a.png", "b.png"]


@pytest.mark.parametrize("command", PER_IMAGE)
def test_a_symlinked_output_subfolder_leading_outside_is_refused(world, tmp_path, command):
    photos = tmp_path / "photos"
    save_image(photos / "a.png", 40, 30)
    out = tmp_path / "out"
    assert run_cli(PER_IMAGE_COMMANDS[command](world, [photos], out)).exit_code == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.png").write_bytes(b"the user's own file")
    import shutil

    shutil.rmtree(out / "labels")
    (out / "labels").symlink_to(user)
    before = digest_tree(user)
    assert_one_line_error(run_cli(PER_IMAGE_COMMANDS[command](world, [photos], out)), "labels", "leads outside")
    assert digest_tree(user) == before


@pytest.mark.parametrize("command", PER_IMAGE)
def test_another_image_of_the_same_name_is_never_already_done(world, tmp_path, command):
    """a/photo.png then b/photo.png (another image) into one --out: the second is computed, not
    'already done' with the first one's result (the input's sha256 is recorded)."""
    first, second = save_image(tmp_path / "a" / "photo.png", 40, 30), save_image(tmp_path / "b" / "photo.png", 36, 28)
    out = tmp_path / "out"
    for image in (first, second):
        result = run_cli(PER_IMAGE_COMMANDS[command](world, [image.parent], out))
        assert result.exit_code == 0, result.output
        assert label_size(out, "photo") == Image.open(image).size
    assert json.loads((out / "sources" / "photo.json").read_text())["image"]["sha256"] == \
        hashlib.sha256(second.read_bytes()).hexdigest()


@pytest.mark.parametrize("command", PER_IMAGE)
def test_unreadable_images_do_not_stop_the_others(world, tmp_path, command):
    """Without --skip-bad: the good images are done, then one error line names every bad one;
    with it: exit 0 (discover stopped at the first bad image before, and had no --skip-bad)."""
    folder = world["bad"] / "images"
    out = tmp_path / "out"
    result = run_cli(PER_IMAGE_COMMANDS[command](world, [folder], out))
    assert_one_line_error(result, "empty.jpg", "text.png", "--skip-bad")
    assert (out / "labels" / "good.png").is_file()
    result = run_cli(PER_IMAGE_COMMANDS[command](world, [folder], tmp_path / "skipped", "--skip-bad"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "skipped" / "labels").iterdir()) == ["good.png"]


def test_discover_resumes_only_what_is_done(world, tmp_path):
    photos = tmp_path / "photos"
    save_image(photos / "a.png", 40, 30)
    out = tmp_path / "out"
    assert "1 images segmented (0 already done)" in run_cli(PER_IMAGE_COMMANDS["discover"](world, [photos], out)).output
    save_image(photos / "b.png", 36, 28)
    result = run_cli(PER_IMAGE_COMMANDS["discover"](world, [photos], out))
    assert "1 images segmented (1 already done)" in result.output, result.output
    save_image(photos / "a.png", 32, 24, seed=5)  # edited in place: computed again
    result = run_cli(PER_IMAGE_COMMANDS["discover"](world, [photos], out))
    assert "1 images segmented (1 already done)" in result.output, result.output
    assert label_size(out, "a") == (32, 24)


def test_output_names_rules():
    from namedmask.data.image_outputs import Found, output_names

    found = [Found(Path("/d/photo.jpg"), "photo.jpg"), Found(Path("/d/photo.png"), "photo.png"),
             Found(Path("/d/s/x.png"), "s/x.png"), Found(Path("/e/x.png"), "x.png"), Found(Path("/f/x.png"), "x.png"),
             Found(Path("/d/photo.jpg.png"), "photo.jpg.png")]
    assert output_names(found) == ["photo.jpg", "photo.png", "s/x", "e/x", "f/x", "photo.jpg~2"]


# ------------------------------------------------------------------------ options, one line

def tiny_run(world, out) -> list:
    return ["run", "--out", out, "--stages", "train", "--set", f"pool={world['root'] / 'pool'}"]


# (id, function(world, tmp_path) -> command line, needles): options of the new commands
NEW_BAD_OPTIONS = [
    ("discover-min-score-nan", lambda w, t: PER_IMAGE_COMMANDS["discover"](w, [w["bad"] / "photo.jpg"], t / "o",
                                                                        "--min-score", "nan"), ["min_score"]),
    ("discover-min-score-2", lambda w, t: PER_IMAGE_COMMANDS["discover"](w, [w["bad"] / "photo.jpg"], t / "o",
                                                                      "--min-score", "2"), ["min_score"]),
    ("discover-size-huge", lambda w, t: PER_IMAGE_COMMANDS["discover"](w, [w["bad"] / "photo.jpg"], t / "o",
                                                                    "--size", "100000"), ["size"]),
    ("discover-seed-negative", lambda w, t: PER_IMAGE_COMMANDS["discover"](w, [w["bad"] / "photo.jpg"], t / "o",
                                                                        "--set", "seed=-1"), ["seed"]),
    ("predict-zero-shot-short-side-huge",
     lambda w, t: PER_IMAGE_COMMANDS["predict-zero-shot"](w, [w["bad"] / "photo.jpg"], t / "o", "--short-side",
                                                          "100000"), ["short_side"]),
    ("predict-two-stage-size-huge",
     lambda w, t: PER_IMAGE_COMMANDS["predict-two-stage"](w, [w["bad"] / "photo.jpg"], t / "o", "--size", "100000"),
     ["size"]),
    ("predict-two-stage-threshold-nan",
     lambda w, t: PER_IMAGE_COMMANDS["predict-two-stage"](w, [w["bad"] / "photo.jpg"], t / "o",
                                                          "--background-threshold", "nan"), ["threshold"]),
    ("eval-zero-shot-short-side-huge",
     lambda w, t: ["eval", "--zero-shot", "--model", "nm-tiny", "--dataset", "folder", "--root", w["val"],
                   "--short-side", "100000"], ["short_side"]),
    ("toy-world-seed-negative", lambda w, t: ["toy-world", "--out", t / "toy", "--seed", "-1"], ["seed"]),
    ("toy-world-clip-steps-0", lambda w, t: ["toy-world", "--out", t / "toy", "--clip-steps", "0"], ["clip steps"]),
    ("toy-world-clip-steps-negative", lambda w, t: ["toy-world", "--out", t / "toy", "--clip-steps", "-5"],
     ["clip steps"]),
    ("toy-world-dino-steps-negative", lambda w, t: ["toy-world", "--out", t / "toy", "--dino-steps", "-5"],
     ["dino steps"]),
    ("saliency-set-eigen-solver", lambda w, t: saliency_args(w, t / "o", "--set", "eigen_solver=foo"),
     ["eigen_solver", "foo"]),
    ("refine-set-preset", lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks", w["masks"] / "masks",
                                        "--out", t / "o", "--set", "preset=foo"], ["preset", "foo"]),
    ("refine-sigmas-overflow-64-bit-keys",
     lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks", w["masks"] / "masks", "--out", t / "o",
                   "--sigma-spatial", "1e-5", "--sigma-luma", "1e-5", "--sigma-chroma", "1e-5", "--backend", "torch"],
     ["64-bit keys"]),
    ("adapt-clip-set-seed-negative", lambda w, t: ["adapt-clip", "--archive", w["archive"], "--masks", w["masks"],
                                                   "--out", t / "o", "--model", "nm-tiny", "--set", "seed=-1"],
     ["seed"]),
    ("train-set-seed-negative", lambda w, t: train_args(w, t / "o", "--set", "seed=-1"), ["seed"]),
    ("refine-set-sigma-not-a-number", lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks",
                                                    w["masks"] / "masks", "--out", t / "o", "--set",
                                                    "sigma_spatial=abc"], ["sigma_spatial"]),
]
if not torch.cuda.is_available():
    NEW_BAD_OPTIONS += [
        ("refine-device-cuda-no-gpu", lambda w, t: ["refine", "--images", w["root"] / "pool", "--masks",
                                                    w["masks"] / "masks", "--out", t / "o", "--device", "cuda"],
         ["cuda"]),
    ]


@pytest.mark.parametrize("case", NEW_BAD_OPTIONS, ids=[c[0] for c in NEW_BAD_OPTIONS])
def test_new_bad_options_are_one_line_errors(world, tmp_path, case):
    _, make, needles = case
    assert_one_line_error(run_cli(make(world, tmp_path)), *needles)
    assert not (tmp_path / "o" / "labels").exists() and not (tmp_path / "toy").exists()


# The least each command needs to get as far as reading its config (any required argument).
CONFIG_COMMAND_ARGS = {
    "adapt-clip": lambda w, t: ["--archive", w["archive"], "--masks", w["masks"], "--out", t / "o"],
    "build-archive": lambda w, t: ["--pool", w["root"] / "pool", "--categories", "voc", "--out", t / "o"],
    "discover": lambda w, t: [w["bad"] / "photo.jpg", "--out", t / "o"],
    "eval": lambda w, t: ["--pred", w["val"] / "labels", "--gt", w["val"] / "labels", "--num-classes", "4"],
    "experts": lambda w, t: ["--archive", w["archive"], "--masks", w["masks"], "--out", t / "o"],
    "predict": lambda w, t: [w["bad"] / "photo.jpg", "--checkpoint", w["model"], "--out", t / "o"],
    "refine": lambda w, t: ["--images", w["root"] / "pool", "--masks", w["masks"] / "masks", "--out", t / "o"],
    "run": lambda w, t: ["--out", t / "o"],
    "saliency": lambda w, t: ["--archive", w["archive"], "--out", t / "o"],
    "train": lambda w, t: ["--archive", w["archive"], "--masks", w["masks"], "--out", t / "o"],
    "weights": lambda w, t: [],
    "toy-world": lambda w, t: ["--out", t / "o"],
}


def commands_with(option: str) -> list:
    """Every command (and `config show`) that takes `option` (the parameter's name)."""
    found = sorted(name for name, c in cli.commands.items() if any(p.name == option for p in c.params))
    return found + (["config show"] if option in ("overrides", "config_path") else [])


def config_command(world, tmp_path, name, *extra) -> list:
    if name == "config show":
        return ["config", "show", "--for", "discover", *extra]
    return [name, *CONFIG_COMMAND_ARGS[name](world, tmp_path), *extra]


def test_every_command_with_a_config_is_listed():
    assert set(commands_with("overrides")) - {"config show"} == set(CONFIG_COMMAND_ARGS)


@pytest.mark.parametrize("command", commands_with("overrides"))
@pytest.mark.parametrize("override", ["k=[1,", "a: b: c", "x={"])
def test_set_with_broken_yaml_is_one_line(world, tmp_path, command, override):
    assert_one_line_error(run_cli(config_command(world, tmp_path, command, "--set", override)), override)


@pytest.mark.parametrize("command", commands_with("overrides"))
@pytest.mark.parametrize("kind", ["latin1", "broken-yaml", "missing"])
def test_config_files_are_read_like_every_user_file(world, tmp_path, command, kind):
    """A config file with a non-UTF-8 byte, a YAML syntax error or no file: one line naming it."""
    path = tmp_path / f"{kind}.yaml"
    if kind == "latin1":
        path.write_bytes("device: cpu # caf\xe9\n".encode("latin-1"))
    elif kind == "broken-yaml":
        path.write_text("device: [cpu\nfoo: 1\n")
    option = "--config"
    assert_one_line_error(run_cli(config_command(world, tmp_path, command, option, path)), path.name)


def test_a_config_file_with_a_bom_loads(tmp_path):
    from namedmask.config import DiscoverConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_bytes("\ufeffmin_score: 0.5\n".encode("utf-8"))
    assert load_config(DiscoverConfig, path).min_score == 0.5


def config_classes() -> list:
    import dataclasses

    from namedmask import config

    # the shared parts (ClipPart, ...) are never built alone: their keys are checked in every config holding them
    return [c for c in vars(config).values() if dataclasses.is_dataclass(c) and isinstance(c, type)
            and c.__module__ == config.__name__ and not c.__name__.endswith("Part")]


def _fields(kind):
    import dataclasses

    out = []
    for cls in config_classes():
        if cls.__name__ == "ToyWorldConfig":
            cfg = cls(out="x")
        else:
            cfg = cls()
        for f in dataclasses.fields(cls):
            value = getattr(cfg, f.name)
            if kind(value, f):
                out.append(pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}"))
    return out


def _build(cls, key, value):
    from namedmask.config import from_dict

    if cls.__name__ == "ToyWorldConfig":
        return cls(**{"out": "x", key: value})
    return from_dict(cls, {key: value})


@pytest.mark.parametrize("cls,key", _fields(lambda v, f: isinstance(v, float) or f.type in ("float | None",)))
def test_every_float_option_rejects_nan(cls, key):
    from namedmask.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        _build(cls, key, float("nan"))


@pytest.mark.parametrize("cls,key", _fields(lambda v, f: (isinstance(v, int) and not isinstance(v, bool))
                                            or f.type == "int | None"))
def test_every_integer_option_rejects_negative_values(cls, key):
    """Counts, sizes, steps and seeds alike (a seed of -1 was a NumPy traceback)."""
    from namedmask.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        _build(cls, key, -1)


def _build_with(cls, values: dict):
    from namedmask.config import from_dict

    return from_dict(cls, values)


# Choices that are valid only together with another setting (checked by the config too).
NEEDS = {(kind, "merge_rule", "tree"): {"cluster": "tree"} for kind in ("DiscoverConfig", "DiscoverCommandConfig")}
NEEDS |= {(kind, "namer", "caption"): {"captioner": "gpt2"} for kind in ("DiscoverConfig", "DiscoverCommandConfig")}
NEEDS |= {(kind, "loss", "contrastive"): {"negatives": None} for kind in ("AdaptConfig", "AdaptCommandConfig")}


@pytest.mark.parametrize("cls,key", _fields(lambda v, f: "choices" in f.metadata))
def test_every_choice_is_checked_however_it_is_given(cls, key):
    """--set and YAML respect the same choices as the command line (every value the field
    lists is taken, anything else is a ConfigError naming the key)."""
    import dataclasses

    from namedmask.config import ConfigError

    field = {f.name: f for f in dataclasses.fields(cls)}[key]
    for value in field.metadata["choices"]:
        needs = NEEDS.get((cls.__name__, key, value))
        built = _build_with(cls, {key: value, **needs}) if needs else _build(cls, key, value)
        assert getattr(built, key) == value
    with pytest.raises(ConfigError, match=key):
        _build(cls, key, "not-a-choice")


def test_the_cli_offers_the_configs_choices():
    """A click.Choice option that sets a config field lists exactly the field's choices."""
    import dataclasses

    from namedmask import config
    from namedmask.cli import CONFIG_KINDS

    checked = 0
    for command, kind in CONFIG_KINDS.items():
        if command not in cli.commands:
            continue
        fields = {f.name: f for f in dataclasses.fields(getattr(config, kind))}
        for param in cli.commands[command].params:
            if isinstance(param.type, click.Choice) and param.name in fields:
                allowed = fields[param.name].metadata.get("choices")
                assert allowed is not None, f"{command} --{param.name}: the config field has no choices"
                assert set(param.type.choices) == {c for c in allowed if c is not None}, (command, param.name)
                checked += 1
    assert checked >= 4


def test_config_choices_match_the_code_that_uses_them():
    import dataclasses

    from namedmask import config
    from namedmask.models.zero_guidance import EMBED_MODES
    from namedmask.ops.bilateral import PRESETS

    def choices(cls, key):
        return set({f.name: f for f in dataclasses.fields(cls)}[key].metadata["choices"]) - {None}

    assert choices(config.RefineConfig, "preset") == set(PRESETS)
    assert choices(config.DiscoverConfig, "embed") == set(EMBED_MODES) == choices(config.TwoStageConfig, "embed")


# ----------------------------------------------------------------------- shared readers

@pytest.mark.parametrize("command", ["train", "adapt-clip"])
@pytest.mark.parametrize("kind,transform,needles", [
    ("0-255", lambda m: m * 255, ["none of the", "0/255"]),
    ("value-7", lambda m: np.where(m == 1, 7, 0).astype(np.uint8), ["value 7"]),
    ("rgb", lambda m: np.stack([m] * 3, -1), ["RGB"]),
])
def test_every_reader_of_pseudo_masks_names_a_wrong_mask(world, tmp_path, command, kind, transform, needles):
    """adapt-clip reads masks with train's reader (data.pseudo_masks.read_pseudo_mask): 0/255 is
    named, not 'fewer than 2 non-empty masks'; 0/7 is refused, not taken as empty."""
    masks = mask_variant(world, tmp_path, kind, transform)
    args = {"train": train_args(world, tmp_path / "o"),
            "adapt-clip": ["adapt-clip", "--archive", world["archive"], "--masks", masks, "--out", tmp_path / "o",
                           "--model", "nm-tiny", "--templates", "simple", "--steps", "1", "--negatives", "none"]}[command]
    if command == "train":
        args[args.index("--masks") + 1] = masks
    assert_one_line_error(run_cli(args), *needles)


def test_every_word_list_reader_drops_a_bom(tmp_path):
    """A file saved as 'UTF-8 with BOM' names its first entry 'cat', not '\\ufeffcat', whichever
    reader takes it (they all read through namedmask.io.read_user_text)."""
    from namedmask.data.categories import get_category_set
    from namedmask.data.vocabulary import load_vocabulary
    from namedmask.models.prompts import get_templates
    from namedmask.models.openvocab import _read_words

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffcat | kitty\ndog\n".encode("utf-8"))
    assert load_vocabulary(str(path)).names == ("cat", "dog")
    assert get_category_set(str(path)).names[1:] == ("cat", "dog")
    assert _read_words(path) == ["cat | kitty", "dog"]
    templates = tmp_path / "templates.txt"
    templates.write_bytes("\ufeffa photo of a {}.\n".encode("utf-8"))
    assert get_templates(str(templates)) == ("a photo of a {}.",)


def test_discover_with_a_bom_vocabulary_names_no_bom(world, tmp_path):
    vocab = tmp_path / "bom.txt"
    vocab.write_bytes("\ufeffdisc\nsquare\n".encode("utf-8"))
    out = tmp_path / "out"
    result = run_cli(["discover", world["bad"] / "images" / "good.png", "--out", out, "--vocabulary", vocab,
                      "--min-score", "-1", *DISCOVER_TINY])
    assert result.exit_code == 0, result.output
    assert "\\ufeff" not in (out / "segments.json").read_text() and "\ufeff" not in (out / "segments.json").read_text()


# --------------------------------------------------------------------------------- toy-world

def test_toy_world_refuses_a_seed_folder_symlinked_to_a_users_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "seed-0").symlink_to(user)
    before = digest_tree(user)
    assert_one_line_error(run_cli(["toy-world", "--out", tmp_path / "toy", "--size", "ci"]), "seed-0", "leads outside")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "toy2").mkdir()
    (tmp_path / "toy2" / "seed-0").symlink_to(empty)  # even an empty folder elsewhere
    assert_one_line_error(run_cli(["toy-world", "--out", tmp_path / "toy2", "--size", "ci"]), "leads outside")
    assert digest_tree(user) == before and not any(empty.iterdir())


def test_toy_world_refuses_a_seed_folder_of_other_files(tmp_path):
    (tmp_path / "toy" / "seed-0").mkdir(parents=True)
    (tmp_path / "toy" / "seed-0" / "thesis.tex").write_text("years of work\n")
    assert_one_line_error(run_cli(["toy-world", "--out", tmp_path / "toy", "--size", "ci"]), "did not make")


class _Stop(Exception):
    pass


def test_toy_world_claims_locks_and_cleans_before_any_work(tmp_path, monkeypatch):
    """The temporaries a kill -9 leaves (while the world's JPEGs or a model were written) are
    removed on the next run, under the folder's lock, before any work."""
    from namedmask import io
    from namedmask.toy import world as toyworld
    from namedmask.toy import ToyWorldConfig, build_toy_world

    root = tmp_path / "toy" / "seed-0"
    (root / "world" / "pool").mkdir(parents=True)
    (root / "clip").mkdir()
    (root / "run.yaml").write_text("out: x\n")  # a world made before the folder marker existed
    stale = [root / "world" / "pool" / ".00007.jpg.k2j3.tmp.jpg", root / "clip" / ".nm-toy.pt.x8a.tmp.pt"]
    for p in stale:
        p.write_bytes(b"half")
    seen = {}

    def stop(where, *a, **k):
        seen["stale"] = [p.exists() for p in stale]
        with pytest.raises(io.OutputFolderError, match="in use"):  # the lock is held
            with io.OutputLock(root):
                pass
        raise _Stop

    monkeypatch.setattr(toyworld, "write_world", stop)
    with pytest.raises(_Stop):
        build_toy_world(ToyWorldConfig(str(tmp_path / "toy"), size="ci"), progress=False)
    assert seen["stale"] == [False, False]


def test_toy_world_without_dino_writes_a_run_config_that_runs(tmp_path, monkeypatch):
    """--dino-steps 0: run.yaml runs saliency on the CLIP tower (it named a DINO file that was
    never written); the config loads and names only files the build wrote."""
    from namedmask.toy import world as toyworld
    from namedmask.pipeline import load_run_config
    from namedmask import toy
    from namedmask.toy import clip as toy_clip
    from namedmask.toy import ToyWorldConfig, build_toy_world

    def world(root, *a, **k):
        (Path(root) / "pretrain").mkdir(parents=True, exist_ok=True)
        return Path(root)

    def train_clip(pairs, out, *a, **k):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "nm-toy.pt").write_bytes(b"model")
        return Path(out) / "nm-toy.pt"

    def tower(clip_file, out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"tower")
        return out

    monkeypatch.setattr(toyworld, "write_world", world)
    monkeypatch.setattr(toyworld, "read_captions", lambda root: [])
    monkeypatch.setattr(toy_clip, "train_clip", train_clip)
    monkeypatch.setattr(toy, "clip_tower_to_dino_layout", tower)
    root = build_toy_world(ToyWorldConfig(str(tmp_path / "toy"), size="ci", dino={"steps": 0}), progress=False)
    cfg = load_run_config(str(root / "run.yaml"))
    assert Path(cfg.saliency.dino_weights).is_file() and Path(cfg.archive.pretrained).is_file()
    assert not (root / "dino").exists()


# ------------------------------------------------------------------ disk full, bytes, API

def _enospc_on(monkeypatch, name: str):
    """Every write of namedmask.io (atomic writes, torch and safetensors files) to a file named
    `name` fails as a full disk does."""
    import builtins
    import errno

    from namedmask import io

    real = builtins.open

    def fake_open(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        if "w" in mode and Path(file).name.startswith(f".{name}."):
            class Full:
                def __getattr__(self, attr):
                    return getattr(f, attr)

                def write(self, data):
                    raise OSError(errno.ENOSPC, "No space left on device")

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()
            return Full()
        return f

    monkeypatch.setattr(io, "open", fake_open, raising=False)


@pytest.mark.parametrize("command,name", [("train", "checkpoint.pt"), ("train", "model.safetensors"),
                                          ("build-archive", "shard-000000.safetensors")])
def test_disk_full_while_saving_is_one_line_and_resumes(world, tmp_path, monkeypatch, command, name):
    """A full disk during train's checkpoint (torch.save) or weights, or the archive's shard
    write: one line naming the file, no temporary left, and the rerun finishes."""
    out = tmp_path / "o"
    args = {"train": train_args(world, out),
            "build-archive": ["build-archive", "--pool", world["root"] / "pool", "--categories", "voc", "--out", out,
                              "--model", "nm-tiny", "--pretrained", "random", "--k", "3", "--device", "cpu"]}[command]
    with monkeypatch.context() as m:
        _enospc_on(m, name)
        assert_one_line_error(run_cli(args), "No space left on device", name)
    assert temporaries(out) == [] and not (out / name).exists()
    result = run_cli(args)
    assert result.exit_code == 0, result.output


def test_save_torch_names_the_file_when_torch_swallows_the_write_error(tmp_path, monkeypatch):
    from namedmask import io

    _enospc_on(monkeypatch, "x.pt")
    with pytest.raises(OSError, match=r"No space left on device: cannot write .*x\.pt"):
        io.save_torch({"a": torch.zeros(1000)}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_real_file_size_limit_during_train_checkpoint_is_one_line(world, tmp_path):
    """The operating system refusing the write (RLIMIT_FSIZE: EFBIG, the same path as ENOSPC)
    inside torch.save: one line, not torch's inline_container.cc RuntimeError."""
    import resource

    out = tmp_path / "o"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([sys.executable, "-m", "namedmask", *map(str, train_args(world, out))], env=_subprocess_env(),
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert temporaries(out) == []


def test_every_safetensors_write_goes_through_io():
    """The one writer sorts the metadata (byte-identical files) and turns a full disk into an
    OSError: nothing else in the package may call safetensors' save/save_file."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "namedmask").rglob("*.py")
                 if p.name != "io.py" and re.search(r"\bsave_file\b|from safetensors\.torch import save\b",
                                                      p.read_text())]
    assert offenders == []


def test_mask_prompts_are_byte_identical_between_runs(tmp_path):
    """Two processes (the library orders the metadata keys per process) save the same tokens:
    the same bytes."""
    code = ("import sys, torch; from namedmask.models.clip import load_clip; "
            "from namedmask.models.mask_prompts import MaskPrompts; "
            "MaskPrompts(load_clip('nm-tiny'), depth=1, seed=3).save(sys.argv[1])")
    files = []
    for seed in ("1", "2"):
        path = tmp_path / f"p{seed}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], env={**_subprocess_env(), "PYTHONHASHSEED": seed},
                       check=True, timeout=300)
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_confusion_matrix_rejects_a_fractional_class_count():
    from namedmask import ops

    a = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="num_classes"):
        ops.confusion_matrix(a, a, num_classes=2.7)
    with pytest.raises(TypeError, match="ignore_index"):
        ops.confusion_matrix(a, a, num_classes=2, ignore_index=0.5)
    assert ops.confusion_matrix(a, a, num_classes=np.int64(2)).tolist() == [[4, 0], [0, 0]]


@pytest.mark.parametrize("cls,key", _fields(lambda v, f: isinstance(v, tuple) and v and all(
    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)))
def test_every_tuple_of_numbers_rejects_nan(cls, key):
    from namedmask.config import ConfigError

    value = getattr(cls() if cls.__name__ != "ToyWorldConfig" else cls(out="x"), key)
    with pytest.raises(ConfigError, match=key):
        _build(cls, key, [float("nan")] + list(value[1:]))


def test_refine_never_takes_another_pair_of_the_same_name_as_done(world, tmp_path):
    """refine --masks M1 then --masks M2 (other masks, same names) into one --out: every mask
    is refined again (the image's and mask's sha256 are recorded), the rerun of M2 skips all."""
    other = mask_variant(world, tmp_path, "inverted", lambda m: (1 - m).astype(np.uint8))
    out = tmp_path / "refined"
    base = ["refine", "--images", world["root"] / "pool", "--out", out, "--backend", "torch"]
    n = len(list((world["masks"] / "masks").rglob("*.png")))
    first = run_cli([*base, "--masks", world["masks"] / "masks"])
    assert f"refined {n}, already done 0" in first.output, first.output
    before = digest_tree(out, skip=("refine.json",))
    second = run_cli([*base, "--masks", other / "masks"])
    assert f"refined {n}, already done 0" in second.output, second.output
    assert digest_tree(out, skip=("refine.json",)) != before
    third = run_cli([*base, "--masks", other / "masks"])
    assert f"refined 0, already done {n}" in third.output, third.output


def test_build_archive_into_its_own_pool_does_not_embed_its_outputs(world, tmp_path):
    """--out inside --pool with --report: the contact sheets of the first run are not pool
    images of the second (before: 'holds embeddings of another run')."""
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(world["root"] / "pool", pool)
    args = ["build-archive", "--pool", pool, "--categories", "voc", "--out", pool / "archive", "--model", "nm-tiny",
            "--pretrained", "random", "--k", "3", "--device", "cpu", "--report"]
    for _ in range(2):
        result = run_cli(args)
        assert result.exit_code == 0, result.output
    archive = json.loads((pool / "archive" / "archive.json").read_text())
    assert not any(e["path"].startswith("archive/") for entries in archive["archives"].values() for e in entries)
