"""What a person would rather look at than read: prediction overlays with a legend, training
curves, per-class IoU bars, and the run report, one index.html in the run directory that
shows them stage by stage (retrieved images per category, pseudo-masks before and after
refinement, curves, per-class IoU, overlays). index.html only links PNGs the stages wrote
(relative paths), so the folder can be copied or served as it is."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from namedmask import io
from namedmask.data.categories import voc_palette

METRICS_FILE = "metrics.jsonl"   # a training run's log: one JSON object per logged iteration / validation

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


# ------------------------------------------------------------------------------- overlays

def _colours() -> np.ndarray:
    return np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def overlay_image(image: torch.Tensor, label: torch.Tensor, class_names: list, alpha: float = 0.5) -> Image.Image:
    """RGB image with non-background classes tinted by the VOC palette and, on the right,
    a legend (colour swatch + name) of the classes present."""
    img = image.numpy().astype(np.float32)
    lab = label.numpy().astype(np.int64)
    colours = _colours()
    fg = (lab > 0) & (lab < 256)
    tinted = img.copy()
    tinted[fg] = (1 - alpha) * img[fg] + alpha * colours[lab[fg] % 256]
    base = Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8))
    present = [int(c) for c in np.unique(lab) if 0 <= c < len(class_names)]
    row, width = 14, 10 + 7 * max([len(class_names[c]) for c in present] + [4]) + 24
    canvas = Image.new("RGB", (base.width + width, max(base.height, row * len(present) + 8)), (255, 255, 255))
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, c in enumerate(present):
        y = 4 + k * row
        draw.rectangle([base.width + 6, y, base.width + 16, y + 10], fill=tuple(int(v) for v in colours[c % 256]),
                       outline=(0, 0, 0))
        draw.text((base.width + 22, y - 1), class_names[c], fill=(0, 0, 0))
    return canvas


def save_overlay(path, image: torch.Tensor, label: torch.Tensor, class_names: list) -> None:
    io.save_png(path, overlay_image(image, label, class_names))


# --------------------------------------------------------------------------------- curves

def read_metrics(run_dir) -> list:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(run_dir) -> Path | None:
    """curves.png: training loss and validation mIoU against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    loss = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    val = [(r["iteration"], 100 * r["val_miou"]) for r in records if "val_miou" in r]
    if not loss:
        return None
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 5, 3.5), squeeze=False)
    axes[0][0].plot(*zip(*loss))
    axes[0][0].set(xlabel="iteration", ylabel="loss", title="training loss")
    if val:
        axes[0][1].plot(*zip(*val), marker="o")
        axes[0][1].set(xlabel="iteration", ylabel="mIoU (%)", title="validation mIoU")
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
