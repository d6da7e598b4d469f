"""The README's demo number and its spread, from the runs' own JSON (never typed by hand).

  python -m bench.demo_numbers RUN [RUN ...]

Each RUN is a `namedmask run` folder (runs/demo after `make demo`). Per run: the evaluation set's
mIoU (eval/metrics.json), the toy-world seed (from the pool path in config.yaml), the CPU and the
instruction sets torch and NumPy dispatched to with any cap on them (`environment`, as
envinfo.format_machine writes it), the threads each stage ran with (.stages/<stage>.json
`environment.threads`, the process's setting; the training's own from train/summary.json, the
experts' from refined/manifest.json; a tiny model's forward passes in eval run on one thread
whatever the setting) and the commit. Then one line per spread, each against the
first RUN (the headline): runs of its world and CPU that differ only in their thread setting; runs
of its thread setting and CPU on other worlds; runs of its world and thread setting on another CPU
or instruction set (a result's bits depend on it: docs/reproducibility.md). Two hosts with the same
CPU name and instruction sets count as one machine: compare runs of one host where it matters.

Regenerate the README's numbers (2-core machine, no GPU; docs/reproducibility.md):

  make demo                                                   # runs/demo: automatic threads
  namedmask --threads 1 run --out runs/demo-t1                # the same world, 1 thread
  namedmask --threads 2 run --out runs/demo-t2                # the same world, 2 threads
  namedmask toy-world --out runs/toy --seed 1                 # other worlds (and seed 2 likewise)
  namedmask run --config runs/toy/seed-1/run.yaml --out runs/demo-s1
  python -m bench.demo_numbers runs/demo runs/demo-t1 runs/demo-t2 runs/demo-s1 runs/demo-s2
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from namedmask.envinfo import format_machine


def describe(run: Path) -> dict:
    """What one run's files say: mIoU, evaluation set, world seed, threads per stage, commit."""
    run = Path(run)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = re.search(r"seed-(\d+)", str(cfg.get("pool") or ""))
    threads, commit, cpu = {}, None, None
    for stage in ("experts", "train", "eval"):
        marker = run / ".stages" / f"{stage}.json"
        if marker.is_file():
            env = json.loads(marker.read_text()).get("environment") or {}
            threads[stage] = (env.get("threads") or {}).get("intra_op")
            commit = commit or env.get("commit")
            cpu = cpu or (format_machine(env) if env.get("cpu") else None)
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
            "cpu": cpu, "threads": threads, "commit": (commit or "")[:7]}


def _setting(d: dict) -> str:
    return ", ".join(f"{stage} {n}" for stage, n in d["threads"].items())


def summary(runs: list) -> str:
    """A Markdown table of the runs, then the headline and the spreads as sentences."""
    rows = [describe(r) for r in runs]
    lines = ["| run | world seed | eval set | CPU [instruction set] | threads (intra-op per stage) | commit | mIoU |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {d['run']} | {d['seed']} | {d['eval_set']} ({d['images']} images) | {d['cpu']} | {_setting(d)} | "
              f"{d['commit']} | {d['miou']:.4f} |" for d in rows]
    head = rows[0]
    lines += ["", f"headline: eval/{head['eval_set']} mIoU {head['miou']:.4f} (world seed {head['seed']}, "
                  f"{head['cpu']}, threads: {_setting(head)})"]
    comparable = [d for d in rows if d["eval_set"] == head["eval_set"]]
    spreads = (  # (name, the runs that differ from the headline in that one respect, how to label each)
        (f"thread spread (seed {head['seed']}, {head['cpu']})",
         [d for d in comparable if d["seed"] == head["seed"] and d["cpu"] == head["cpu"]], _setting),
        (f"seed spread ({_setting(head)}, {head['cpu']})",
         [d for d in comparable if _setting(d) == _setting(head) and d["cpu"] == head["cpu"]],
         lambda d: f"seed {d['seed']}"),
        (f"machine spread (seed {head['seed']}, {_setting(head)})",
         [d for d in comparable if d["seed"] == head["seed"] and _setting(d) == _setting(head)],
         lambda d: str(d["cpu"])),
    )
    for name, same, label in spreads:
        if len({label(d) for d in same}) > 1:
            values = [d["miou"] for d in same]
            lines.append(f"{name}: " + ", ".join(f"{d['miou']:.4f} ({label(d)})" for d in same)
                         + f"; range {max(values) - min(values):.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    print(summary(sys.argv[1:]))
