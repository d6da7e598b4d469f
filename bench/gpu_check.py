"""`make gpu-check`: everything a first lent GPU should confirm, in one run of at most ~8 min on
one H100, written to one JSON (+ a text summary):

  build        the CUDA kernels compile for this GPU (setup.py build_ext --inplace)
  ops          `namedmask info`: every op's cuda backend is live
  cuda-tests   the cuda-marked tests (kernels equal the CPU backends bit for bit where integer,
               within their stated tolerances otherwise) and the GPU data path tests
  dali         DALI GPU decoding ("mixed") vs PIL on the real photos: images/s, pixel difference
  toy-chain    a ci-size toy world and `namedmask run` on it with device=cuda (mIoU, stage times)
  kernels      the kernel benchmarks' GPU rows (vs the CPU backend and the PyTorch fallback)
  archive      CLIP image-embedding throughput with random weights at ViT-B/16 (224) and
               ViT-L/14 (224 and 336) shapes, bf16, uint8 batches already on the GPU, and the
               paper-scale estimate it feeds (docs/gpu.md)

  python bench/gpu_check.py [--out DIR] [--only STEP ...]
  python bench/gpu_check.py --dry-run     the plan and the commands, nothing run (any machine)
  python bench/gpu_check.py --cpu         the steps' own code on the CPU at toy sizes (plumbing)

Each step runs in its own process with its own time limit; a step that fails or times out is
recorded and the others still run."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: this checkout's namedmask and bench, not an installed one
    sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("NAMEDMASK_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k train: the paper's archive pool
BUDGET_S = {"build": 240, "ops": 60, "cuda-tests": 180, "dali": 60, "toy-chain": 240, "kernels": 150,
            "archive": 120}
STEPS = tuple(BUDGET_S)


def _cuda_home() -> str | None:
    """The toolkit root: $CUDA_HOME, else derived from the nvcc on PATH (a wrapper script that
    execs the real one is followed, docs/ENV), else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    from shutil import which

    nvcc = which("nvcc")
    if nvcc:
        text = Path(nvcc).read_text(errors="ignore") if Path(nvcc).stat().st_size < 4096 else ""
        m = re.search(r"^exec (\S+)", text, re.M)
        real = Path(m.group(1) if m else nvcc).resolve()
        return str(real.parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda").is_dir() else None


def _arch() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - no torch / no driver: the H100's
        pass
    return "9.0"


def commands(out: Path, cpu: bool = False) -> dict:
    """step -> argv (each run with cwd = the repository)."""
    py = sys.executable
    me = [py, str(Path(__file__).resolve())]
    return {
        "build": [py, "setup.py", "build_ext", "--inplace"],
        "ops": [py, "-m", "namedmask", "info", "--json"],
        # the cuda-marked kernel tests, and the GPU data path's (skipped without a GPU, no mark)
        "cuda-tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda or not slow",
                       "tests/test_confusion_matrix.py", "tests/test_bilateral.py", "tests/test_copy_paste.py",
                       "tests/test_gpu_data_path.py", "-k", "cuda or gpu"],
        "dali": me + ["--step", "dali", "--out", str(out)] + (["--cpu"] if cpu else []),
        "toy-chain": me + ["--step", "toy-chain", "--out", str(out)] + (["--cpu"] if cpu else []),
        "kernels": [py, "-m", "bench", "confusion_matrix", "copy_paste", "bilateral", "--json",
                    str(out / "kernels.json")],
        "archive": me + ["--step", "archive", "--out", str(out)] + (["--cpu"] if cpu else []),
    }


# ------------------------------------------------------------------------- in-process steps

def step_archive(out: Path, cpu: bool) -> dict:
    """images/s of the CLIP image tower (random weights) on uint8 batches already on the device,
    bf16 autocast, batch 64 (the embedding half of build-archive; decoding is the dali step)."""
    import torch

    from namedmask.models.clip import RANDOM, load_clip

    device = torch.device("cpu" if cpu else "cuda")
    shapes = [("nm-tiny", 2, 2)] if cpu else [("ViT-B-16", 64, 20), ("ViT-L-14", 64, 10), ("ViT-L-14-336", 32, 10)]
    rows = {}
    for model, batch, reps in shapes:
        clip = load_clip(model, RANDOM, device=device)
        size = clip.image_size
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu):
            clip.encode_images(images)  # warm-up (and cuDNN/cuBLAS choices)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                clip.encode_images(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows[model] = {"image_size": size, "batch": batch, "images_per_s": round(batch * reps / seconds, 1)}
        del clip
    estimate = None
    if "ViT-L-14-336" in rows:
        rate = rows["ViT-L-14-336"]["images_per_s"]
        estimate = {"imagenet_train_images": IMAGENET_TRAIN, "vit_l14_336_images_per_s": rate,
                    "embedding_minutes": round(IMAGENET_TRAIN / rate / 60, 1),
                    "target_minutes": 30}
    return {"device": str(device), "rows": rows, "paper_scale_estimate": estimate}


def step_dali(out: Path, cpu: bool) -> dict:
    """DALI's GPU decoding (`dali`) against PIL on the real photos: the same resize, images/s of
    each, and the largest pixel difference (JPEG decoders differ by design; stated, not asserted)."""
    import torch

    from namedmask.data.decode import Resize, iter_image_batches, why_not

    photos = sorted(p for p in (SHARED_DATA / "pool").glob("*.jpg"))[:64 if not cpu else 8]
    if not photos:
        return {"skipped": f"no photos in {SHARED_DATA / 'pool'}"}
    backend = "dali-cpu" if cpu else "dali"
    if why_not(backend):
        return {"skipped": f"{backend}: {why_not(backend)}"}
    device = "cpu" if cpu else "cuda"
    resize = Resize(224, 224, "bilinear")
    res = {}
    decoded = {}
    for name, dev in ((backend, device), ("pil", "cpu")):
        list(iter_image_batches(photos[:8], 8, resize=resize, backend=name, device=dev))  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batches = [b.images for b in iter_image_batches(photos, 32, resize=resize, backend=name, device=dev)]
        if dev == "cuda":
            torch.cuda.synchronize()
        res[name] = {"images_per_s": round(len(photos) / (time.perf_counter() - t0), 1)}
        decoded[name] = torch.cat([b.cpu() for b in batches])
    diff = (decoded[backend].int() - decoded["pil"].int()).abs()
    res["max_abs_pixel_diff"] = int(diff.max())
    res["mean_abs_pixel_diff"] = round(float(diff.float().mean()), 3)
    res["images"] = len(photos)
    return res


def step_toy_chain(out: Path, cpu: bool) -> dict:
    """A ci-size toy world (CLIP/DINO trained on the device) and the whole `namedmask run` on it
    with device=cuda; its mIoU and the stages' times from the run's JSON."""
    import yaml

    dev = "cpu" if cpu else "cuda"
    toy = out / "toy"
    steps = ["--clip-steps", "4", "--dino-steps", "2"] if cpu else []
    subprocess.run([sys.executable, "-m", "namedmask", "-q", "toy-world", "--out", str(toy), "--size", "ci", *steps],
                   check=True, cwd=REPO)
    cfg = yaml.safe_load((toy / "seed-0" / "run.yaml").read_text())
    for section in ("archive", "saliency", "eval", "predict"):
        if isinstance(cfg.get(section), dict) and section != "predict":
            cfg[section]["device"] = dev
    cfg["experts"]["train"]["device"] = dev
    cfg["train"]["device"] = dev
    cfg["predict_images"] = []
    if cpu:
        cfg["archive"]["k"] = 4
        cfg["experts"]["train"]["iterations"] = 2
        cfg["train"].update(iterations=4, log_every=2, checkpoint_every=4)
    config = out / "toy-run.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = out / "toy-run"
    subprocess.run([sys.executable, "-m", "namedmask", "-q", "run", "--config", str(config), "--out", str(run),
                    "--stages", "archive,saliency,experts,train,eval"], check=True, cwd=REPO)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    times = {p.stem: json.loads(p.read_text())["seconds"] for p in (run / ".stages").glob("*.json")}
    return {"device": dev, "miou": metrics["miou"], "stage_seconds": times}


IN_PROCESS = {"archive": step_archive, "dali": step_dali, "toy-chain": step_toy_chain}


# ----------------------------------------------------------------------------------- driver

def _parse(step: str, stdout: str, out: Path) -> dict | None:
    if step in IN_PROCESS:
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    if step == "ops":
        info = json.loads(stdout[stdout.index("{"):])
        return {"cuda_live": {op: b.get("cuda") == "live" for op, b in info.get("ops", {}).items()},
                "gpus": info.get("gpus")}
    if step == "cuda-tests":
        m = re.findall(r"(\d+) (passed|failed|skipped|error)", stdout)
        return {k: int(v) for v, k in m}
    if step == "kernels" and (out / "kernels.json").is_file():
        rows = json.loads((out / "kernels.json").read_text())
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
        return {"gpu_rows": [r for r in rows if "cuda" in json.dumps(r).lower()]}
    return None


def run_steps(out: Path, only=None, dry_run: bool = False, cpu: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(out, cpu)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not cpu:
        env.setdefault("TORCH_CUDA_ARCH_LIST", _arch())
        home = _cuda_home()
        if home:
            env.setdefault("CUDA_HOME", home)
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "mode": "dry-run" if dry_run else
              ("cpu" if cpu else "gpu"), "budget_s": sum(BUDGET_S[s] for s in (only or STEPS)), "steps": {}}
    for step in only or STEPS:
        entry = {"command": " ".join(cmds[step]), "limit_s": BUDGET_S[step]}
        result["steps"][step] = entry
        if dry_run or (cpu and step in ("build", "cuda-tests", "kernels")):
            entry["status"] = "planned" if dry_run else "skipped (--cpu: needs a GPU or rebuilds the extension)"
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmds[step], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=BUDGET_S[step])
            entry["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            entry["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
            try:
                entry["result"] = _parse(step, proc.stdout, out)
            except (ValueError, KeyError) as exc:
                entry["result"] = None
                entry["parse_error"] = str(exc)
        except subprocess.TimeoutExpired:
            entry["status"] = f"timed out after {BUDGET_S[step]} s"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
    result["seconds"] = round(sum(s.get("seconds", 0) for s in result["steps"].values()), 1)
    from namedmask import envinfo

    result["environment"] = envinfo.environment()
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.txt").write_text(summary(result))
    return result


def summary(result: dict) -> str:
    lines = [f"gpu-check ({result['mode']}), {result.get('seconds', 0)} s of a {result['budget_s']} s budget"]
    for step, e in result["steps"].items():
        line = f"  {step:<11} {e.get('status', '?'):<12} {e.get('seconds', '')}"
        r = e.get("result") or {}
        if step == "archive" and r.get("rows"):
            line += "  " + ", ".join(f"{m} {v['images_per_s']} img/s" for m, v in r["rows"].items())
            if r.get("paper_scale_estimate"):
                line += f"  -> ImageNet-1k at ViT-L/14@336: {r['paper_scale_estimate']['embedding_minutes']} min"
        elif step == "toy-chain" and "miou" in r:
            line += f"  mIoU {r['miou']:.4f}"
        elif step == "dali" and "max_abs_pixel_diff" in r:
            line += "  " + ", ".join(f"{k} {v['images_per_s']} img/s" for k, v in r.items() if isinstance(v, dict))
            line += f", max |diff| {r['max_abs_pixel_diff']}"
        elif step == "cuda-tests" and r:
            line += "  " + ", ".join(f"{v} {k}" for k, v in r.items())
        elif step == "ops" and r:
            line += f"  cuda live for {sum(r['cuda_live'].values())}/{len(r['cuda_live'])} ops"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu-check")
    parser.add_argument("--only", nargs="*", choices=STEPS)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="the steps' code on the CPU at toy sizes")
    parser.add_argument("--step", choices=sorted(IN_PROCESS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child: one in-process step, its result as the last JSON line
        args.out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(IN_PROCESS[args.step](args.out, args.cpu)))
        return 0
    result = run_steps(args.out, args.only, args.dry_run, args.cpu)
    print(summary(result), end="")
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'summary.txt'}")
    return 0 if all(e.get("status") in ("ok", "planned") or e.get("status", "").startswith("skipped")
                    for e in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
