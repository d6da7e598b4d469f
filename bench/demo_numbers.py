"""The README's demo number and its spread, from the runs' own JSON (never typed by hand).

  python -m bench.demo_numbers RUN [RUN ...]

Each RUN is a `namedmask run` folder (runs/demo after `make demo`). Per run: the evaluation set's
mIoU (eval/metrics.json), the toy-world seed (from the pool path in config.yaml), the threads
each stage ran with (.stages/<stage>.json `environment.threads`, the process's setting; the
training's own from train/summary.json, the experts' from refined/manifest.json; a tiny model's
forward passes in eval run on one thread whatever the setting) and the commit. Then one line per spread: the
runs of one world that differ only in their thread setting, and the runs of one thread setting on
different worlds. The first RUN is the headline number.

Regenerate the README's numbers (2-core machine, no GPU; docs/reproducibility.md):

  make demo                                                   # runs/demo: automatic threads
  namedmask --threads 1 run --out runs/demo-t1                # the same world, 1 thread
  namedmask --threads 2 run --out runs/demo-t2                # the same world, 2 threads
  python -m bench.demo_numbers runs/demo runs/demo-t1 runs/demo-t2
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml


def describe(run: Path) -> dict:
    """What one run's files say: mIoU, evaluation set, world seed, threads per stage, commit."""
    run = Path(run)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = re.search(r"seed-(\d+)", str(cfg.get("pool") or ""))
    threads, commit = {}, None
    for stage in ("experts", "train", "eval"):
        marker = run / ".stages" / f"{stage}.json"
        if marker.is_file():
            env = json.loads(marker.read_text()).get("environment") or {}
            threads[stage] = (env.get("threads") or {}).get("intra_op")
            commit = commit or env.get("commit")
    summary = run / "train" / "summary.json"   # what the training itself ran on (a tiny model: 1 thread)
    if summary.is_file():
        trained = ((json.loads(summary.read_text()).get("environment") or {}).get("threads") or {}).get("intra_op")
        threads["train"] = trained or threads.get("train")
    manifest = run / "refined" / "manifest.json"
    if manifest.is_file():
        per_expert = set((json.loads(manifest.read_text()).get("training_threads") or {}).values())
        if per_expert:
            threads["experts"] = "/".join(str(t) for t in sorted(per_expert))
    return {"run": str(run), "miou": float(metrics["miou"]), "images": metrics.get("num_images"),
            "eval_set": Path(str(cfg.get("eval_root") or "")).name, "seed": int(seed.group(1)) if seed else None,
            "threads": threads, "commit": (commit or "")[:7]}


def _setting(d: dict) -> str:
    return ", ".join(f"{stage} {n}" for stage, n in d["threads"].items())


def summary(runs: list) -> str:
    """A Markdown table of the runs, then the headline and the spreads as sentences."""
    rows = [describe(r) for r in runs]
    lines = ["| run | world seed | eval set | threads (intra-op per stage) | commit | mIoU |", "|---|---|---|---|---|---|"]
    lines += [f"| {d['run']} | {d['seed']} | {d['eval_set']} ({d['images']} images) | {_setting(d)} | {d['commit']} | "
              f"{d['miou']:.4f} |" for d in rows]
    head = rows[0]
    lines += ["", f"headline: eval/{head['eval_set']} mIoU {head['miou']:.4f} (world seed {head['seed']}, "
                  f"threads: {_setting(head)})"]
    same_world = [d for d in rows if d["seed"] == head["seed"] and d["eval_set"] == head["eval_set"]]
    if len({_setting(d) for d in same_world}) > 1:
        values = [d["miou"] for d in same_world]
        lines.append(f"thread spread (seed {head['seed']}): " + ", ".join(
            f"{d['miou']:.4f} ({_setting(d)})" for d in same_world) + f"; range {max(values) - min(values):.4f}")
    same_setting = [d for d in rows if _setting(d) == _setting(head) and d["eval_set"] == head["eval_set"]]
    if len({d["seed"] for d in same_setting}) > 1:
        values = [d["miou"] for d in same_setting]
        lines.append(f"seed spread ({_setting(head)}): " + ", ".join(
            f"seed {d['seed']} {d['miou']:.4f}" for d in same_setting) + f"; range {max(values) - min(values):.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    print(summary(sys.argv[1:]))
