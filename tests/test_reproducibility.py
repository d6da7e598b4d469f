"""Numbers anyone can reproduce (docs/reproducibility.md): thread settings decided from the
configuration and the machine, never the load; a stage run under load equals the same stage idle;
an interrupted and resumed toy-world build equals an uninterrupted one; `.pt` files are
byte-stable; a stage's recorded time sums all its resumed parts; every run records its
environment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from namedmask import envinfo, io, runtime
from namedmask.cli import cli
from namedmask.config import RunConfig, TrainConfig, load_config
from namedmask.pipeline import _Stages
from namedmask.report import build_report, stage_timings

from synthetic import tiny_train_overrides, write_archive

# --------------------------------------------------------------------------------- threads


def test_thread_settings_resolve_explicit_before_automatic(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = runtime.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert runtime.resolve_threads("auto") == (cores, "auto (cores available: affinity and cgroup quota)")
    assert runtime.resolve_threads(None)[0] == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun ranks on one machine share its cores
    assert runtime.resolve_threads("auto")[0] == max(1, cores // 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.resolve_threads("auto") == (3, "$OMP_NUM_THREADS")
    assert runtime.resolve_threads(5) == (5, "config")
    monkeypatch.setenv(runtime.THREADS_ENV, "4")
    assert runtime.resolve_threads(5) == (4, f"--threads/${runtime.THREADS_ENV}")
    monkeypatch.setenv(runtime.THREADS_ENV, "auto")  # auto there defers to the config
    assert runtime.resolve_threads(5) == (5, "config")
    for bad in (0, -1, "two", "1.5", True):
        with pytest.raises(runtime.ThreadsError, match="auto or a positive integer"):
            runtime.parse_threads(bad)


def test_configure_threads_sets_torch_and_records_it(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    record = runtime.configure_threads(1)
    assert torch.get_num_threads() == 1 and record["intra_op"] == 1 and record["source"] == "config"
    assert record["cores_available"] == runtime.available_cores()
    assert record["dataloader_workers_max"] == max(0, runtime.available_cores() - 1)
    # workers never exceed the cores less the training loop's own
    assert runtime.dataloader_workers(4) == min(4, max(0, runtime.available_cores() - 1))
    assert runtime.dataloader_workers(0) == 0
    idle = runtime.idle_cores()
    assert idle is None or 1 <= idle <= runtime.available_cores()


def test_cgroup_quota_caps_the_cores(monkeypatch):
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 1.5)
    assert runtime.available_cores() == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 0.2)
    assert runtime.available_cores() == 1


def test_run_config_threads_key_and_cli_option():
    assert load_config(RunConfig, None, ["threads=2"]).threads == 2
    assert load_config(RunConfig, None, ["threads=auto"]).threads == "auto"
    with pytest.raises(Exception, match="threads"):
        load_config(RunConfig, None, ["threads=0"])
    result = CliRunner().invoke(cli, ["--threads", "zero", "info"])
    assert result.exit_code != 0 and "--threads" in result.output and "positive integer" in result.output


def test_the_openmp_wait_policy_is_passive_unless_the_user_chose():
    code = "import namedmask, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    cwd = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=cwd,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_augmentation_gives_the_same_bits_on_any_thread_count(tmp_path):
    """A sample is augmented on one thread (runtime.one_thread) in the main process as in a
    DataLoader worker: without it, 2 threads changed some pixels of the same sample."""
    from namedmask.data.training import TrainSamples, archive_items

    archive, masks, _ = write_archive(tmp_path, per_class=1, size=320)
    cfg = load_config(TrainConfig, overrides=["augment.crop_size=256"], archive=str(archive), masks=str(masks))
    items, _ = archive_items(archive, masks)
    samples = TrainSamples(items, cfg)
    outs = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        outs[n] = [samples[k] for k in range(6)]
    for a, b in zip(outs[1], outs[2]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------- load never matters

def _train_once(world: dict, out: Path) -> dict:
    """The files of one training run in `out` (which is then cleared: the checkpoint records its
    folder, so both runs use the same one)."""
    import shutil

    from namedmask.training import train

    cfg = load_config(TrainConfig, overrides=tiny_train_overrides(4, batch=4, crop=32) + ["checkpoint_every=2"],
                      archive=str(world["archive"]), masks=str(world["masks"]), out=str(out))
    train(cfg, progress=False)
    files = {name: (out / name).read_bytes() for name in ("model.safetensors", "checkpoint.pt")}
    shutil.rmtree(out)
    return files


def test_a_stage_under_a_busy_loop_equals_the_same_stage_idle(tmp_path):
    """The training stage on 2 threads, idle and with one spinning process per core: the same
    weights and the same checkpoint, byte for byte (the kernels decide their helpers from the load,
    torch's threads are the setting; neither changes a bit)."""
    archive, masks, _ = write_archive(tmp_path / "world", per_class=4)
    world = {"archive": archive, "masks": masks}
    torch.set_num_threads(2)
    idle = _train_once(world, tmp_path / "run")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(runtime.available_cores())]
    try:
        loaded = _train_once(world, tmp_path / "run")
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()
    assert loaded == idle


def test_a_tiny_model_on_automatic_threads_trains_on_one_thread(tmp_path, monkeypatch):
    """With namedmask's automatic threads a tiny model (under 20 GFLOP per iteration) trains on
    one thread, recorded, with the bits of an explicit --threads 1; an explicit 2 stays 2, and the
    process's setting is restored after the run."""
    from namedmask.training import TINY_TRAINING_FLOPS, is_tiny, training_flops

    archive, masks, _ = write_archive(tmp_path / "world", per_class=4)
    world = {"archive": archive, "masks": masks}
    cfg = load_config(TrainConfig, overrides=tiny_train_overrides(4, batch=4, crop=32))
    assert is_tiny(cfg) and 0 < training_flops(cfg) < TINY_TRAINING_FLOPS
    assert not is_tiny(TrainConfig())                                   # ResNet-50, batch 16, crop 384
    runtime.set_threads(1, "--threads/$NAMEDMASK_THREADS")
    one = _train_once(world, tmp_path / "run")
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    runtime.set_threads(2, "auto (cores available: affinity and cgroup quota)")
    summary = {}
    real_finish = __import__("namedmask.training", fromlist=["_finish"])._finish

    def finish(ctx, run_dir, *a, **k):
        real_finish(ctx, run_dir, *a, **k)
        summary.update(json.loads((run_dir / "summary.json").read_text()))
    monkeypatch.setattr("namedmask.training._finish", finish)
    auto = _train_once(world, tmp_path / "run")
    assert auto == one
    assert summary["environment"]["threads"]["intra_op"] == 1 and "tiny model" in summary["environment"]["threads"]["source"]
    assert torch.get_num_threads() == 2 and runtime.threads_are_automatic()   # restored
    runtime.set_threads(2, "config")
    assert _train_once(world, tmp_path / "run") != one                 # an explicit 2 trains on 2 threads


def test_a_tiny_forward_pass_runs_on_one_thread_with_the_same_labels():
    """Inference of a tiny model on a CPU runs on one thread (its operators are too short to
    share); the rule is the model's counted FLOPs times the image's pixels, never the load, so a
    tiny model's label maps are those of one thread whatever the thread setting."""
    from namedmask.models.deeplab import build_model
    from namedmask.models.inference import (TINY_FORWARD_FLOPS, forward_flops, forward_flops_per_pixel,
                                            inference_threads, predict_label)

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1, groups=2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 6, 7))
    # 2 x outputs x (inputs per output): conv 8*5*6 * 3*9, grouped conv 4*5*6 * 4, linear 7 * 120
    assert forward_flops(net, torch.zeros(1, 3, 5, 6)) == 2 * (8 * 30 * 27 + 4 * 30 * 4 + 7 * 120)

    cfg = load_config(TrainConfig, overrides=tiny_train_overrides(1))
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    per_pixel = forward_flops_per_pixel(model)
    assert per_pixel == forward_flops(model, torch.zeros(1, 3, 64, 64)) / 64 ** 2 and per_pixel > 0
    torch.set_num_threads(2)
    small = int((TINY_FORWARD_FLOPS / per_pixel) ** 0.5) - 1       # the largest square under the bound
    with inference_threads(model, small, small, "cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with inference_threads(model, small + 2, small + 2, "cpu"):
        assert torch.get_num_threads() == 2
    with inference_threads(model, 8, 8, "meta"):                   # not a CPU: as set
        assert torch.get_num_threads() == 2

    image = torch.randint(0, 256, (70, 90, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    from namedmask.data.augment import eval_input

    x = eval_input(image)
    labels = predict_label(model, image, "cpu")
    with torch.no_grad():
        two = model(x)
        torch.set_num_threads(1)
        one = model(x)
    # the logits differ in their last bits (on one thread torch runs 1x1 convolutions with another
    # kernel); the label map is the 1-thread one, and here equal to the 2-thread one
    assert torch.equal(labels, one.argmax(1)[0]) and torch.equal(one.argmax(1), two.argmax(1))
    assert torch.allclose(one, two, atol=1e-5)


# ------------------------------------------------------------------------ byte-stable files

def test_two_writes_of_the_same_checkpoint_are_byte_identical(tmp_path):
    state = {"model": {"w": torch.randn(4, 3), "b": torch.arange(3)}, "step": 7, "rng": runtime.rng_snapshot()}
    io.save_torch(state, tmp_path / "a.pt")
    io.save_torch(state, tmp_path / "b.pt")
    io.save_torch(state, tmp_path / "a.pt")  # rewritten in place: same bytes again
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    back = torch.load(tmp_path / "a.pt", weights_only=True)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert not list(tmp_path.glob(".*.tmp*"))
    # what it replaces: torch.save through atomic_path wrote the temporary's random name inside
    names = set()
    for _ in range(2):
        with io.atomic_path(tmp_path / "c.pt") as tmp:
            torch.save(state, tmp)
        names.add((tmp_path / "c.pt").read_bytes())
    assert len(names) == 2


def test_rng_snapshot_restores_every_generator():
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(3)
    torch.rand(5, generator=gen)
    snap = runtime.rng_snapshot(gen)
    first = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), random.random())
    runtime.restore_rng(torch.load(_roundtrip(snap), weights_only=True), gen)
    again = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert np.array_equal(first[2], again[2]) and first[3] == again[3]


def _roundtrip(obj):
    import io as _io

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# -------------------------------------------------------- toy world: interrupted == uninterrupted

class _Stop(KeyboardInterrupt):
    pass


SMALL = {"clip": {"steps": 4, "batch_size": 16, "save_every": 2, "warmup": 2},
         "dino": {"steps": 4, "batch_size": 8, "save_every": 2, "warmup": 2, "global_size": 64, "local_size": 32,
                  "local_crops": 2}}


def test_an_interrupted_toy_world_build_equals_an_uninterrupted_one(ci_world, tmp_path, monkeypatch):
    """A ci-size build stopped after 3 CLIP steps (state saved at 2), resumed and stopped again
    after 3 DINO steps, then finished, gives the very models of an uninterrupted build: every
    tensor equal and every .pt file byte-identical (the generators' state is in the checkpoints;
    before, a resume reseeded the data generator with seed*1000+step and drew other batches)."""
    from namedmask.toy import ToyWorldConfig, build_toy_world

    def build(out):
        return build_toy_world(ToyWorldConfig(str(out), seed=0, size="ci", **SMALL), progress=False)

    for run in ("a", "b"):  # the session's ci world (deterministic), not written again
        (tmp_path / run / "seed-0").mkdir(parents=True)
        os.symlink(ci_world, tmp_path / run / "seed-0" / "world")
    a = build(tmp_path / "a")

    calls = {"n": 0, "stop_at": 3}
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise _Stop
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(_Stop):  # CLIP stops in its 3rd step; its state at step 2 is on disk
        build(tmp_path / "b")
    assert torch.load(tmp_path / "b/seed-0/clip/train_state.pt", weights_only=True)["step"] == 2
    calls.update(n=0, stop_at=2 + 3)  # CLIP's last 2 steps, then DINO stops in its 3rd
    with pytest.raises(_Stop):
        build(tmp_path / "b")
    assert torch.load(tmp_path / "b/seed-0/dino/checkpoint.pth", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    b = build(tmp_path / "b")

    for rel in ("clip/nm-toy.pt", "dino/dino_toy_pretrain.pth", "clip_tower/dino_layout.pth"):
        sa, sb = (torch.load(root / rel, weights_only=True) for root in (a, b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), rel
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    la, lb = (json.loads((root / "dino" / "train.json").read_text()) for root in (a, b))
    assert la["losses"] == lb["losses"] and len(la["losses"]) == 4
    assert la["threads"] == lb["threads"] == 2


# -------------------------------------------------------------------- timings and environment

def test_a_stage_time_sums_all_its_resumed_parts(tmp_path):
    """A stage interrupted (Ctrl-C), killed (its process gone: a part left 'running') and finished
    records the sum of the three parts, and the report says it counted parts."""
    import time

    run = tmp_path / "run"
    out = run / "stage" / "done.txt"
    stages = _Stages(run, runtime.thread_record("test"))

    def interrupted():
        time.sleep(0.2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run("stage", {"a": 1}, interrupted, out)
    parts = json.loads((run / ".stages" / "stage.parts").read_text())
    assert [p["end"] for p in parts] == ["interrupted"] and parts[0]["seconds"] >= 0.2
    # a part whose process was killed: left as 'running' with its time to its last save
    parts.append({"started": "x", "seconds": 5.0, "end": "running", "fingerprint": "f"})
    io.write_json(run / ".stages" / "stage.parts", parts)

    def finish():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("ok")

    stages.run("stage", {"a": 1}, finish, out)
    marker = json.loads((run / ".stages" / "stage.json").read_text())
    assert [p["end"].split(" ")[0] for p in marker["parts"]] == ["interrupted", "killed", "finished"]
    assert marker["seconds"] == pytest.approx(sum(p["seconds"] for p in marker["parts"]), abs=0.011)
    assert marker["seconds"] >= 5.2
    assert marker["environment"]["resumed"] is True
    assert marker["environment"]["threads"]["source"] == "test"
    assert not (run / ".stages" / "stage.parts").exists()
    timing, = stage_timings(run)
    assert timing["parts"] == 3 and timing["seconds"] == marker["seconds"]
    html = build_report(run).read_text()
    assert "sum of all its parts" in html and "resumed: yes" in html
    # done with the same settings: skipped, its time kept
    stages.run("stage", {"a": 1}, lambda: pytest.fail("ran again"), out)
    assert json.loads((run / ".stages" / "stage.json").read_text())["seconds"] == marker["seconds"]


def test_the_environment_record_names_what_results_depend_on():
    env = envinfo.environment(resumed=False)
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"]["intra_op"] == torch.get_num_threads()
    assert env["resumed"] is False
    assert env["commit"] is None or len(env["commit"].removesuffix("-dirty")) == 40
    if torch.backends.mkldnn.is_available():
        assert env["onednn"] and env["onednn"][0].isdigit()
    line = envinfo.format_environment(env)
    assert env["cpu_capability"] in line and "intra-op" in line


def test_the_environment_record_names_the_libraries_cpu_dispatch_and_its_caps(monkeypatch):
    """NumPy's and SciPy's versions, the SIMD sets NumPy dispatches to and the variables that cap a
    library's dispatch are recorded: capping NumPy/OpenBLAS changed TokenCut masks (reproducibility.md)."""
    import numpy
    import scipy

    for name in envinfo.DISPATCH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("NPY_DISABLE_CPU_FEATURES", "AVX512F")
    env = envinfo.environment()
    assert (env["numpy"], env["scipy"]) == (numpy.__version__, scipy.__version__)
    assert env["cpu_dispatch_env"] == {"NPY_DISABLE_CPU_FEATURES": "AVX512F", "OPENBLAS_CORETYPE": "Haswell"}
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    assert env["numpy_simd"] == [f for f in __cpu_dispatch__ if __cpu_features__[f]]
    assert envinfo.format_machine({"cpu": "AMD EPYC", "cpu_capability": "AVX2", "numpy_simd": ["X86_V3"],
                                   "cpu_dispatch_env": {"OPENBLAS_CORETYPE": "Haswell"}}) \
        == "AMD EPYC [AVX2; NumPy X86_V3; OPENBLAS_CORETYPE=Haswell]"
    assert envinfo.format_machine({"cpu": "AMD EPYC", "cpu_capability": "AVX512"}) == "AMD EPYC [AVX512]"
    assert envinfo.format_machine(env) in envinfo.format_environment(env)


def test_the_demo_number_and_its_spreads_come_from_the_runs_json(tmp_path):
    """bench/demo_numbers.py: mIoU, world seed, CPU and per-stage threads read from the run folders;
    the first run is the headline; runs of its world and CPU give the thread spread, runs of its
    thread setting and CPU the seed spread, runs of its world and setting on another CPU or
    instruction set the machine spread (no run counted in a spread it does not belong to)."""
    import yaml

    from bench.demo_numbers import describe, summary

    def fake_run(name, seed, miou, experts, train, isa="AVX2"):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / ".stages").mkdir()
        (run / "refined").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps({"miou": miou, "num_images": 96}))
        (run / "config.yaml").write_text(yaml.safe_dump({"pool": f"runs/toy/seed-{seed}/world/pool",
                                                         "eval_root": f"runs/toy/seed-{seed}/world/eval/multi"}))
        for stage, n in (("experts", 2), ("train", train), ("eval", train)):
            (run / ".stages" / f"{stage}.json").write_text(json.dumps(
                {"environment": {"commit": "abcdef123", "cpu": "AMD EPYC", "cpu_capability": isa,
                                 "threads": {"intra_op": n}}}))
        (run / "refined" / "manifest.json").write_text(json.dumps({"training_threads": {"0": experts, "1": experts}}))
        (run / "train").mkdir()
        (run / "train" / "summary.json").write_text(json.dumps({"environment": {"threads": {"intra_op": train}}}))
        (run / ".stages" / "train.json").write_text(json.dumps({"environment": {"threads": {"intra_op": 2}}}))
        return run

    auto = fake_run("auto", 0, 0.66431, 1, 2)
    one = fake_run("t1", 0, 0.65541, 1, 1)
    seed1 = fake_run("s1", 1, 0.6, 1, 2)
    wide = fake_run("avx512", 0, 0.69601, 1, 2, isa="AVX512")
    wide_one = fake_run("avx512-t1", 0, 0.7, 1, 1, isa="AVX512")
    assert describe(auto) == {"run": str(auto), "miou": 0.66431, "images": 96, "eval_set": "multi", "seed": 0,
                              "cpu": "AMD EPYC [AVX2]", "threads": {"experts": "1", "train": 2, "eval": 2},
                              "commit": "abcdef1"}
    text = summary([auto, one, seed1, wide, wide_one])
    assert "headline: eval/multi mIoU 0.6643 (world seed 0, AMD EPYC [AVX2], threads: experts 1, train 2, eval 2)" in text
    assert "thread spread (seed 0, AMD EPYC [AVX2]): 0.6643 (experts 1, train 2, eval 2), " \
           "0.6554 (experts 1, train 1, eval 1); range 0.0089" in text
    assert "seed spread (experts 1, train 2, eval 2, AMD EPYC [AVX2]): 0.6643 (seed 0), 0.6000 (seed 1); " \
           "range 0.0643" in text
    assert "machine spread (seed 0, experts 1, train 2, eval 2): 0.6643 (AMD EPYC [AVX2]), " \
           "0.6960 (AMD EPYC [AVX512]); range 0.0317" in text
    assert f"| {wide} | 0 | multi (96 images) | AMD EPYC [AVX512] | experts 1, train 2, eval 2 | abcdef1 | 0.6960 |" in text
    assert len(text.splitlines()) == 2 + 5 + 2 + 3   # header, 5 runs, blank + headline, 3 spreads
    # One run alone: the headline, no spread lines.
    assert [line for line in summary([auto]).splitlines() if "spread" in line] == []