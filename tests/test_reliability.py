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
    errors = [m.group(1) for m in re.finditer(r"(?:^|[^A-Za-z])(Error: .*)", result.output, re.M)]
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
    return dict(os.environ, OMP_NUM_THREADS="1",
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


def test_kill_matrix_small(world, tmp_path):
    kill_matrix(world, tmp_path, ["saliency", "train"], seeds=[0])


@pytest.mark.slow
def test_kill_matrix_large(world, tmp_path):
    kill_matrix(world, tmp_path, ["saliency", "refine", "train"], seeds=range(4))
