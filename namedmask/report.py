"""The run report: one index.html in the run directory that shows, stage by stage, what a
person would rather look at than read: retrieved images per category, pseudo-masks before and
after refinement, training curves, per-class IoU, prediction overlays. It only links PNGs the
stages wrote (relative paths), so the folder can be copied or served as it is."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from namedmask import io

# (section title, folder inside the run dir, what it shows)
SECTIONS = (
    ("Category archives (CLIP retrieval)", "archive/report", "Top retrieved pool images per category, with scores."),
    ("Saliency pseudo-masks (DINO)", "saliency/report", "Class-agnostic object masks of archive images."),
    ("Refined pseudo-masks (category experts)", "refined/report", "Masks re-predicted by the category experts."),
    ("Training", "train", "Loss and validation mIoU curves."),
    ("Evaluation", "eval", "Per-class IoU and prediction overlays on the evaluation set."),
    ("Predictions", "predict/overlays", "Predicted segments named with the category set."),
)


def iou_bar_chart(metrics_json: str | Path, out_png: str | Path) -> Path:
    """Horizontal bar chart of per-class IoU from an eval metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(metrics_json).read_text())
    names = data.get("class_names") or [str(i) for i in range(data["num_classes"])]
    ious = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else 100 * v for v in data["per_class_iou"]]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    ax.barh(range(len(names)), ious, color="#3b7dd8")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"mIoU {100 * data['miou']:.1f}  ({data['num_images']} images)")
    fig.tight_layout()
    with io.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out_png)


def build_report(run_dir: str | Path, title: str = "namedmask run", warnings: list | None = None,
                 facts: dict | None = None, max_images: int = 12) -> Path:
    """Writes <run_dir>/index.html from the PNGs the stages left in the run directory."""
    run_dir = Path(run_dir)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "img{max-width:100%;border:1px solid #ccc;margin:4px}"
             ".warn{background:#fff3cd;border:3px solid #d39e00;padding:1em;font-size:1.4em;font-weight:bold}"
             "table{border-collapse:collapse}td{padding:2px 10px;border-bottom:1px solid #eee}"
             ".grid{display:flex;flex-wrap:wrap;align-items:flex-start}.grid img{max-width:440px}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for w in warnings or []:
        parts.append(f"<div class='warn'>{html.escape(w)}</div>")
    if facts:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
        parts.append(f"<table>{rows}</table>")
    for heading, folder, caption in SECTIONS:
        pngs = sorted((run_dir / folder).glob("*.png")) if (run_dir / folder).is_dir() else []
        if not pngs:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(caption)}</p><div class='grid'>")
        for p in pngs[:max_images]:
            rel = p.relative_to(run_dir).as_posix()
            parts.append(f"<a href='{html.escape(rel)}'><img src='{html.escape(rel)}' title='{html.escape(p.name)}'></a>")
        if len(pngs) > max_images:
            parts.append(f"<p>... and {len(pngs) - max_images} more in {html.escape(folder)}/</p>")
        parts.append("</div>")
    out = run_dir / "index.html"
    io.write_text(out, "\n".join(parts) + "\n")
    return out
