"""The CPU ops idle, on a loaded machine (N busy-loop processes, N = cores) and with that load
coming and going every 20 ms ("flickering", POSIX): per op, the time
with torch's default threads, with 1 thread, their ratio, and the ratio to the reference
(published scipy solver, per-sample NumPy loop, NumPy bincount) timed in the same conditions.

  python -m bench loaded          every condition
  python -m bench.bench_loaded --only loaded      (idle | loaded | flickering)

Medians of interleaved rounds (default and 1-thread calls alternating, each round starting with
the other, the reference once per round), so that a drift in load hits them alike;
under load a single call can wait a whole scheduler time slice, so the max is reported too.
Target: default threads <= 1.5x the 1-thread time under load, for every op.

  python -m bench loaded --stages   whole stages instead (run_stages below)
  python -m bench loaded --stages --stage experts --stage eval    only those (from a base run)

Whole stages (archive, saliency, experts, train, eval, discover) on a ci-size toy world, each
run in a fresh process (`namedmask run` for the first five, discover in the same process after
it), with namedmask's automatic threads and with --threads 1, idle and under one busy loop per
core. Target: automatic <= 1.2x the 1-thread time under load, within 10 % of the better setting
idle. The same runs check which stage outputs depend on the thread count."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import namedmask  # noqa: F401  first: it sets the OpenMP wait policy before torch loads (as for users)
import numpy as np
import torch

from bench.common import Row, print_table, settle
from namedmask import ops


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_machine(n: int | None = None, flicker: float | None = None):
    """N busy-loop processes (default: one per core) for the duration of the block; with
    `flicker` (seconds, POSIX), they are stopped and continued in turn every `flicker` seconds,
    so that load comes and goes in the middle of calls (a kernel decides its helpers at the
    start of a call and must not pay for load that arrives later)."""
    ctx = mp.get_context("spawn")  # no copy of this process's threads or tensors
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(n or os.cpu_count() or 1)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let them reach the loop
    done = threading.Event()

    def toggle():
        on = True
        while not done.wait(flicker):
            on = not on
            for p in procs:
                os.kill(p.pid, signal.SIGCONT if on else signal.SIGSTOP)

    toggler = threading.Thread(target=toggle, daemon=True) if flicker else None
    if toggler:
        toggler.start()
    try:
        yield len(procs)
    finally:
        done.set()
        if toggler:
            toggler.join()
            for p in procs:
                os.kill(p.pid, signal.SIGCONT)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def workloads() -> dict:
    """op name -> (shape, cpp call, reference name, reference call)."""
    from bench import bench_bilateral as bb
    from bench import bench_confusion_matrix as bc
    from bench import bench_copy_paste as bp

    out = {}
    have = (bb.VOC_MINI / "JPEGImages").is_dir()
    photos = bb.load_photos(bb.SIZE) if have else bb.synthetic_photos()
    photos = [p for p in photos if float(p[2].min()) != float(p[2].max())][:4]
    x, t = photos[0][1], photos[0][2]
    out["bilateral_solve"] = (
        f"1 photo {bb.SIZE[0]}x{bb.SIZE[1]}", lambda: ops.bilateral_solve(x, t, backend="cpp"), "scipy",
        lambda: bb.scipy_bilateral_solve(x.numpy(), t.numpy(), np.full(t.shape, 0.999), 16, 16, 8, 256.0,
                                         published_hash=True))
    xs, ts = [p[1] for p in photos], [p[2] for p in photos]
    out["bilateral_solve batch"] = (
        f"{len(photos)} photos, one call", lambda: ops.bilateral_solve_batch(xs, ts, backend="cpp"), "scipy",
        lambda: [bb.scipy_bilateral_solve(a.numpy(), b.numpy(), np.full(b.shape, 0.999), 16, 16, 8, 256.0,
                                          published_hash=True) for a, b in zip(xs, ts)])
    g = torch.Generator().manual_seed(0)
    labels, _ = bp.masks(16, 384, g)
    images = torch.randint(0, 256, (16, 3, 384, 384), generator=g, dtype=torch.uint8)
    sources, offsets = bp.pastes(labels, 2, g)
    arrays = images.numpy(), labels.numpy(), sources.numpy(), offsets.numpy()
    out["copy_paste"] = ("16x3x384x384 u8, P=2",
                         lambda: ops.copy_paste(images, labels, sources, offsets, backend="cpp"),
                         "numpy loop", lambda: bp.official_loop(*arrays))
    pred, target = bc.piecewise_workload(200, 375, 500, 21, g)
    out["confusion_matrix"] = ("200x375x500 u8, C=21", lambda: ops.confusion_matrix(pred, target, 21, backend="cpp"),
                               "numpy bincount", lambda: bc.numpy_bincount(pred.numpy(), target.numpy(), 21))
    return out


def measure(name: str, shape: str, call, ref_name: str, ref, condition: str, rounds: int, reps: int) -> Row:
    default = torch.get_num_threads()
    times = {"default": [], "1 thread": [], "ref": []}
    # Default and 1-thread calls alternate call by call, and each round starts with the other
    # one: under load the scheduler slows whatever runs right after a long burst (the reference,
    # ~0.1 s), and with the two in blocks the block after it paid for that alone (measured: both
    # "keys" at 1 thread gave a 2.0 ratio in block order).
    for r in range(rounds):
        order = ("default", "1 thread") if r % 2 == 0 else ("1 thread", "default")
        for _ in range(reps):
            for key in order:
                with threads(1 if key == "1 thread" else default):
                    t0 = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref()
        times["ref"].append(time.perf_counter() - t0)
        settle()
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = {f"{default} threads (default)": f"median {med['default'] * 1e3:.2f} ms, max {max(times['default']) * 1e3:.2f} ms",
             "1 thread": f"median {med['1 thread'] * 1e3:.2f} ms, max {max(times['1 thread']) * 1e3:.2f} ms",
             "default / 1 thread": f"{med['default'] / med['1 thread']:.2f}",
             f"vs {ref_name}": f"{med['ref'] / med['default']:.1f}x ({ref_name} {med['ref'] * 1e3:.1f} ms)"}
    return Row(name, f"cpp, {condition}", shape, med["default"], None, None, extra)


FLICKER_S = 0.02  # load on for 20 ms, off for 20 ms: a few switches per bilateral call
CONDITIONS = ("idle", "loaded", "flickering")


def run(conditions=CONDITIONS, rounds: int = 5, reps: int = 5) -> list[Row]:
    for _, call, _, _ in workloads().values():  # warm up (and load the library) before timing
        call()
    jobs = workloads()
    rows = []
    for condition in conditions:
        if condition == "idle":
            rows += [measure(n, *job, "idle", rounds, reps) for n, job in jobs.items()]
        elif condition == "flickering" and not hasattr(signal, "SIGSTOP"):
            continue  # not POSIX
        else:
            flicker = FLICKER_S if condition == "flickering" else None
            with busy_machine(flicker=flicker) as n:
                label = f"loaded ({n} busy)" if flicker is None else f"flickering ({n} busy {flicker * 1e3:.0f} ms on/off)"
                rows += [measure(name, *job, label, rounds, reps) for name, job in jobs.items()]
    return rows


# ------------------------------------------------------------------------------ whole stages

STAGE_NAMES = ("archive", "saliency", "experts", "train", "eval", "discover")
PIPELINE_STAGES = "archive,saliency,experts,train,eval"
DISCOVER_IMAGES = 6


def stages_world(cache: Path) -> Path:
    """A ci-size toy world with briefly trained CLIP and DINO (built once into `cache`)."""
    import subprocess
    import sys

    root = cache / "seed-0"
    if not (root / "run.yaml").is_file():
        subprocess.run([sys.executable, "-m", "namedmask", "-q", "--threads", "2", "toy-world", "--out", str(cache),
                        "--size", "ci", "--clip-steps", "60", "--dino-steps", "30"], check=True)
    return root


def stages_config(root: Path) -> Path:
    """The world's run.yaml with schedules fit for a benchmark round (~1 min idle on 2 cores)."""
    import yaml

    cfg = yaml.safe_load((root / "run.yaml").read_text())
    cfg["archive"]["k"] = 12
    cfg["experts"]["train"]["iterations"] = 30
    cfg["train"].update(iterations=100, log_every=20, checkpoint_every=50)
    cfg["predict_images"] = []
    path = root.parent / "bench-stages.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _stage_child(config: str, out: str, threads: str, stages: str = ",".join(STAGE_NAMES)) -> None:
    """In a fresh process: the pipeline's `stages` (of PIPELINE_STAGES; the ones before them are
    already in `out`), then discover on a few eval images if asked; prints one JSON line
    {"seconds": {stage: s}, "threads": record, "digests": {stage: sha256 of its outputs}}."""
    import hashlib
    import json
    from pathlib import Path as P

    from namedmask.pipeline import load_run_config, run_pipeline
    from namedmask.runtime import configure_threads

    os.environ["NAMEDMASK_THREADS"] = threads
    record = configure_threads(threads)
    wanted = stages.split(",")
    pipeline = [st for st in PIPELINE_STAGES.split(",") if st in wanted]
    run = P(out)
    seconds, digests = {}, {}
    if pipeline:
        cfg = load_run_config(config, {"out": out, "stages": pipeline})
        run_pipeline(cfg, progress=False)
        seconds = {st: json.loads((run / ".stages" / f"{st}.json").read_text())["seconds"] for st in pipeline}
    if "discover" in wanted:
        seconds["discover"], labels = _discover(P(config).parent / "seed-0")
        digests["discover"] = hashlib.sha256(labels).hexdigest()[:16]
    for name, files in (("archive", [run / "archive" / "archive.json"]),
                        ("saliency", sorted((run / "saliency").rglob("*.png"))),
                        ("experts", sorted((run / "refined").rglob("*.png"))),
                        ("train", [run / "train" / "model.safetensors"]),
                        ("eval", [run / "eval" / "metrics.json"])):
        if name not in wanted:
            continue
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes() if f.suffix != ".json" else _without_paths(f))
        digests[name] = h.hexdigest()[:16]
    print(json.dumps({"seconds": seconds, "threads": record, "digests": digests}))


def _without_paths(path: Path) -> bytes:
    """A JSON output without the keys that name folders (the runs live in different ones)."""
    import json

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("pool_root", "root", "archive", "out", "run_dir")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True).encode()


def _discover(root: Path) -> tuple:
    """Seconds of discover on DISCOVER_IMAGES eval images of the toy world (models loaded
    before the clock starts), and the label maps' bytes."""
    from bench.bench_discover import _toy_models
    from namedmask.config import DiscoverConfig
    from namedmask.data.decode import load_image
    from namedmask.stages.discover import discover_image
    from namedmask.toy.dino import VIT_KWARGS, VIT_NAME

    cfg = DiscoverConfig(model="nm-toy", pretrained=str(root / "clip" / "nm-toy.pt"), dino=VIT_NAME,
                         dino_weights=str(root / "dino" / "dino_toy_pretrain.pth"), vit_kwargs=dict(VIT_KWARGS),
                         size=96, templates="simple", device="cpu")
    models = _toy_models(root, cfg)
    images = sorted((root / "world" / "eval" / "multi" / "images").glob("*"))[:DISCOVER_IMAGES]
    out = b""
    t0 = time.perf_counter()
    with torch.no_grad():
        for path in images:
            labels, _, _ = discover_image(models, load_image(path), cfg)
            out += labels.to(torch.int64).numpy().tobytes()
    return time.perf_counter() - t0, out


# what each pipeline stage writes into the run folder (removed from a copy of the base run to time
# that stage again)
STAGE_OUTPUTS = {"archive": ["archive"], "saliency": ["saliency"], "experts": ["refined"], "train": ["train"],
                 "eval": ["eval"]}


def _base_run(config: Path, cache: Path) -> Path:
    """Every pipeline stage run once at 1 thread into cache/run-base (untimed): what `--only`
    stages start from (experts needs saliency, eval a trained model)."""
    import json
    import subprocess
    import sys

    base = cache / "run-base"
    if not all((base / ".stages" / f"{st}.json").is_file() for st in PIPELINE_STAGES.split(",")):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NAMEDMASK_THREADS")}
        subprocess.run([sys.executable, "-m", "namedmask", "-q", "--threads", "1", "run", "--config", str(config),
                        "--out", str(base), "--stages", PIPELINE_STAGES], env=env, check=True, capture_output=True)
    json.loads((base / ".stages" / "eval.json").read_text())
    return base


def _child(config: Path, out: Path, threads: str, stages=STAGE_NAMES, base: Path | None = None) -> dict:
    """One timed run in a fresh process: all stages from scratch, or (`base` given) a copy of the
    base run with `stages`' outputs removed, so that only they run."""
    import json
    import shutil
    import subprocess
    import sys

    shutil.rmtree(out, ignore_errors=True)
    if base is not None:
        shutil.copytree(base, out, ignore=shutil.ignore_patterns(".namedmask.lock"))
        for st in stages:
            for name in STAGE_OUTPUTS.get(st, []):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / ".stages" / f"{st}.json").unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NAMEDMASK_THREADS")}
    res = subprocess.run([sys.executable, "-m", "bench.bench_loaded", "--child", str(config), str(out), threads,
                          ",".join(stages)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"stage run failed ({threads} threads):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_stages(conditions=("idle", "loaded"), rounds: int = 1, cache: Path | None = None,
               stages=STAGE_NAMES) -> list[Row]:
    """Per stage and condition: seconds with automatic threads and with 1 thread, their ratio;
    whether the two settings' outputs were equal (digests of the stage's files). With a subset
    of `stages`, each timed run starts from a copy of a base run (_base_run) and runs only them."""
    cache = Path(cache or Path(__file__).resolve().parent / "results" / "stages-toy")
    root = stages_world(cache)
    config = stages_config(root)
    stages = [st for st in STAGE_NAMES if st in stages]
    base = None if set(stages) == set(STAGE_NAMES) else _base_run(config, cache)
    rows, equal, loads = [], {}, {}
    for condition in conditions:
        times = {"auto": {st: [] for st in stages}, "1": {st: [] for st in stages}}
        loads[condition] = [os.getloadavg()]
        with (busy_machine() if condition == "loaded" else _nothing()) as busy:
            label = f"loaded ({busy} busy)" if condition == "loaded" else "idle"
            for r in range(rounds):
                results = {}
                for setting in (("auto", "1") if r % 2 == 0 else ("1", "auto")):
                    results[setting] = _child(config, cache / f"run-{condition}-{setting}", setting, stages, base)
                    for st in stages:
                        times[setting][st].append(results[setting]["seconds"][st])
                for st in stages:
                    equal.setdefault(st, set()).add(results["auto"]["digests"][st] == results["1"]["digests"][st])
            loads[condition].append(os.getloadavg())
        auto_threads = results["auto"]["threads"]["intra_op"]
        load = "load average (1 min) {:.2f} before, {:.2f} after".format(loads[condition][0][0], loads[condition][1][0])
        for st in stages:
            a, one = statistics.median(times["auto"][st]), statistics.median(times["1"][st])
            rows.append(Row(f"stage {st}", f"{label}", "ci toy world", a, None, None, {
                f"auto ({auto_threads} threads)": f"{a:.2f} s", "1 thread": f"{one:.2f} s",
                "auto / 1 thread": f"{a / one:.2f}",
                "outputs equal (auto vs 1 thread)": "yes" if equal[st] == {True} else "no", "machine": load}))
    return rows


@contextmanager
def _nothing():
    yield 0


# A training step of a small conv net (forward, backward, Adam): many short OpenMP regions, like
# the stages' tiny DeepLabs. Run in a fresh process per setting: the OpenMP runtime reads its
# wait policy once, when torch loads it.
_PROBE = """
import os, sys, time
import torch, torch.nn as nn
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                    nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 2, 1))
opt = torch.optim.Adam(net.parameters(), 1e-3)
x, y = torch.randn(4, 3, 96, 96), torch.randint(0, 2, (4, 48, 48))
def step():
    loss = nn.functional.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step(); return loss
for _ in range(3): step()
t = time.perf_counter()
for _ in range(20): loss = step()
print((time.perf_counter() - t) / 20, loss.item())
"""


def run_wait_policy(conditions=("idle", "loaded"), rounds: int = 3) -> list[Row]:
    """Seconds per training step of _PROBE with 1 thread and with all cores, under OpenMP's
    default (spinning) wait policy and PASSIVE, idle and with one busy loop per core; and whether
    the loss is the same across the settings of one thread count (the policy never changes bits)."""
    import subprocess
    import sys

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = [(1, None), (1, "PASSIVE"), (cores, None), (cores, "PASSIVE")]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    rows = []
    for condition in conditions:
        times, losses = {s: [] for s in settings}, {s: set() for s in settings}
        with (busy_machine() if condition == "loaded" else _nothing()) as busy:
            for r in range(rounds):
                for threads, policy in (settings if r % 2 == 0 else settings[::-1]):
                    env = dict(base, **({"OMP_WAIT_POLICY": policy} if policy else {}))
                    out = subprocess.run([sys.executable, "-c", _PROBE, str(threads)], env=env, capture_output=True,
                                         text=True, check=True).stdout.split()
                    times[(threads, policy)].append(float(out[0]))
                    losses[(threads, policy)].add(out[1])
        label = f"loaded ({busy} busy)" if condition == "loaded" else "idle"
        one = statistics.median(times[(1, None)])
        for (threads, policy), t in times.items():
            med = statistics.median(t)
            rows.append(Row("train step (small conv net)", label, f"{threads} thread(s), wait {policy or 'default'}",
                            med, None, None, {"ms/step": f"{med * 1e3:.1f}", "vs 1 thread default": f"{med / one:.2f}",
                                              "loss": "/".join(sorted(losses[(threads, policy)]))}))
    return rows


if __name__ == "__main__":
    import sys

    if len(sys.argv) in (5, 6) and sys.argv[1] == "--child":
        _stage_child(*sys.argv[2:])
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=CONDITIONS)
    parser.add_argument("--stages", action="store_true", help="whole stages on a ci toy world (run_stages)")
    parser.add_argument("--rounds", type=int, default=1, help="--stages/--wait-policy: runs per setting and condition")
    parser.add_argument("--wait-policy", action="store_true", help="OpenMP wait policy: default vs PASSIVE")
    parser.add_argument("--stage", action="append", choices=STAGE_NAMES, default=None,
                        help="--stages: time only this stage (repeatable); the others run once, untimed, at 1 thread")
    args = parser.parse_args()
    if args.wait_policy:
        conditions = (args.only,) if args.only in ("idle", "loaded") else ("idle", "loaded")
        print_table(run_wait_policy(conditions, args.rounds), "OpenMP wait policy, a training step")
    elif args.stages:
        conditions = (args.only,) if args.only in ("idle", "loaded") else ("idle", "loaded")
        print_table(run_stages(conditions, args.rounds, stages=args.stage or STAGE_NAMES),
                    "whole stages, automatic threads vs 1 thread")
    else:
        print_table(run((args.only,) if args.only else CONDITIONS), "CPU ops, idle, loaded and flickering")
