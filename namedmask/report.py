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

TOY_WARNING = ("TOY MODELS: this run's CLIP ({clip}) and DINO are tiny models trained here on generated images "
               "(namedmask toy-world). Its numbers show that the stages compose into a segmenter that names "
               "objects in that world; they are not comparable with the paper's, which need the real ViT-L/14 "
               "CLIP and DINO weights.")
MASK_LEGEND = "pseudo-mask foreground in full colour, outlined in cyan; background dimmed"

# (section title, folder inside the run dir, what it shows, css class of its images)
SECTIONS = (
    ("Category archives (CLIP retrieval)", "archive/report",
     "Top retrieved pool images per category, best first, each with its rank and cosine score.", "wide"),
    ("Saliency pseudo-masks (DINO)", "saliency/report", f"Class-agnostic object masks of archive images: {MASK_LEGEND}.",
     "grid"),
    ("Refined pseudo-masks (category experts)", "refined/report",
     f"Masks re-predicted by the category experts: {MASK_LEGEND}.", "grid"),
    ("Training", "train", None, "grid"),
    ("Evaluation", "eval", "Per-class IoU, and image | prediction | ground truth for the first evaluation images.",
     "grid"),
    ("Predictions", "predict/overlays", "Predicted segments named with the category set.", "grid"),
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
    """Writes <run_dir>/index.html from what the stages left in the run directory: the PNGs of
    each stage, the stage timings (.stages/*.json), the final mIoU (eval/metrics.json), the
    ablation tables (ablations/*.json) and, for a toy-world run, what its numbers do not mean."""
    run_dir = Path(run_dir)
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "img{max-width:100%;border:1px solid #ccc;margin:4px}"
             ".warn{background:#fff3cd;border:3px solid #d39e00;padding:1em;font-size:1.4em;font-weight:bold}"
             ".toy{background:#e8f1fb;border:3px solid #3b7dd8;padding:1em;font-size:1.2em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #eee;"
             "text-align:left}td.num{text-align:right}"
             ".grid{display:flex;flex-wrap:wrap;align-items:flex-start}.grid img{max-width:680px}"
             ".wide img{display:block}</style>",
             f"<h1>{e(title)}</h1>"]
    clip = toy_clip(run_dir)
    if clip:
        parts.append(f"<div class='toy'>{e(TOY_WARNING.format(clip=clip))}</div>")
    for w in warnings or []:
        parts.append(f"<div class='warn'>{e(w)}</div>")
    facts = dict(facts or {})
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.is_file() and "mIoU" not in facts:
        facts["mIoU"] = f"{100 * json.loads(metrics.read_text())['miou']:.2f}"
    if facts:
        parts.append(_table(None, [[k, v] for k, v in facts.items()]))
    timings = stage_timings(run_dir)
    if timings:
        rows = [[t["stage"], f"{t['seconds']:.1f}", t["parts"], t["finished"]] for t in timings]
        parts.append("<h2>Stage timings</h2>" + _table(["stage", "wall time (s)", "parts", "finished (UTC)"], rows)
                     + f"<p>Total {sum(t['seconds'] for t in timings):.1f} s. A stage's time is the sum of all "
                       "its parts: a stage interrupted and resumed counts every part, not only the last "
                       "(a part ended by a hard kill counts up to its last save, at most 30 s short). A stage "
                       "skipped on a later run keeps the time of the run that made it.</p>")
        envs = {t["stage"]: t["environment"] for t in timings if t.get("environment")}
        if envs:
            from namedmask.envinfo import format_environment

            lines = sorted({format_environment(env) for env in envs.values()})
            parts.append("<h2>Environment</h2><p>What these numbers depend on besides the config and seed "
                         "(docs/reproducibility.md):</p><ul>"
                         + "".join(f"<li>{e(line)}" + (" &mdash; " + e(", ".join(
                             st for st, env in envs.items() if format_environment(env) == line))
                             if len(lines) > 1 else "") + "</li>" for line in lines) + "</ul>")
    for heading, folder, caption, css in SECTIONS:
        pngs = sorted((run_dir / folder).glob("*.png")) if (run_dir / folder).is_dir() else []
        if not pngs:
            continue
        if caption is None:
            caption = _training_caption(run_dir / folder)
        parts.append(f"<h2>{e(heading)}</h2><p>{e(caption)}</p><div class='{css}'>")
        for p in pngs[:max_images]:
            rel = p.relative_to(run_dir).as_posix()
            parts.append(f"<a href='{e(rel)}'><img src='{e(rel)}' title='{e(p.name)}'></a>")
        if len(pngs) > max_images:
            parts.append(f"<p>... and {len(pngs) - max_images} more in {e(folder)}/</p>")
        parts.append("</div>")
    ablations = sorted((run_dir / "ablations").glob("*.json")) if (run_dir / "ablations").is_dir() else []
    if ablations:
        parts.append("<h2>Ablations</h2>")
        for path in ablations:
            parts.append(_ablation_table(json.loads(path.read_text())))
    out = run_dir / "index.html"
    io.write_text(out, "\n".join(parts) + "\n")
    return out


def _table(header: list | None, rows: list) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td class='num'>{e(str(v))}</td>" if isinstance(v, (int, float)) or
                                    str(v).replace(".", "", 1).isdigit() else f"<td>{e(str(v))}</td>" for v in row)
                   + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _ablation_table(data: dict) -> str:
    """One ablations/<name>.json: {title, metric, columns, rows: [{name, values}], reference
    (the same shape, shown in grey: numbers from elsewhere), notes}."""
    e = html.escape
    rows = [[r["name"], *r["values"]] for r in data["rows"]]
    rows += [[f"({r['name']})", *r["values"]] for r in data.get("reference", [])]
    return (f"<h3>{e(data['title'])}</h3>" + _table([data.get("metric", ""), *data["columns"]], rows)
            + (f"<p>{e(data['notes'])}</p>" if data.get("notes") else ""))


def _training_caption(train_dir: Path) -> str:
    records = read_metrics(train_dir)
    if any("val_miou" in r for r in records):
        return ("Training loss, and validation mIoU on the run's evaluation set during training (monitoring only: "
                "the model kept is the last iteration's).")
    return "Training loss (no validation ran: set train.val, or an evaluation set in the run config)."


def stage_timings(run_dir: str | Path) -> list:
    """[{stage, seconds, parts, finished, environment}] from the markers the pipeline writes
    (.stages/<stage>.json), in the order the stages finished. `seconds` sums all the parts of a
    stage that was interrupted and resumed."""
    rows = []
    for path in (Path(run_dir) / ".stages").glob("*.json") if (Path(run_dir) / ".stages").is_dir() else []:
        marker = json.loads(path.read_text())
        if "seconds" in marker:
            rows.append({"stage": path.stem, "seconds": float(marker["seconds"]),
                         "parts": len(marker.get("parts") or [None]), "finished": marker.get("finished", ""),
                         "environment": marker.get("environment")})
    return sorted(rows, key=lambda r: (r["finished"], r["stage"]))


def toy_clip(run_dir: str | Path) -> str | None:
    """The CLIP's name when the run's archive was retrieved with the toy world's tiny CLIP (the
    archive's own record, else the run's config), else None."""
    import yaml

    from namedmask.toy.clip import MODEL as TOY_CLIP

    run_dir = Path(run_dir)
    archive, config = run_dir / "archive" / "archive.json", run_dir / "config.yaml"
    if archive.is_file():
        name = (json.loads(archive.read_text()).get("model") or {}).get("name")
    elif config.is_file():
        name = ((yaml.safe_load(config.read_text()) or {}).get("archive") or {}).get("model")
    else:
        return None
    return name if name == TOY_CLIP else None


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


def save_overlay(path, image: torch.Tensor, label: torch.Tensor, class_names: list,
                 gt: torch.Tensor | None = None) -> None:
    """The tinted overlay with its legend; with `gt`, image | prediction | ground truth instead."""
    io.save_png(path, overlay_image(image, label, class_names) if gt is None
                else comparison_image(image, label, gt, class_names))


def font(size: int):
    """Pillow's scalable default font (FreeType), so report text is readable at any size."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_colours(label: torch.Tensor | np.ndarray) -> np.ndarray:
    """H x W x 3 uint8: each class in its VOC palette colour, ignore (255) white."""
    lab = np.asarray(label).astype(np.int64)
    out = _colours()[lab.clip(0, 255)]
    out[lab == 255] = 255
    return out


def comparison_image(image: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor, class_names: list,
                     height: int = 192) -> Image.Image:
    """image | prediction | ground truth side by side, labels as solid colours (a tint would vanish
    on an object of the class colour), titled, with a legend of every class in either map."""
    panels = [("image", np.asarray(image, dtype=np.uint8)), ("prediction", label_colours(pred)),
              ("ground truth", label_colours(gt))]
    scale = height / panels[0][1].shape[0]
    width = max(1, round(panels[0][1].shape[1] * scale))
    present = sorted({int(c) for c in np.unique(np.asarray(pred))} | {int(c) for c in np.unique(np.asarray(gt))}
                     - {255})
    present = [c for c in present if c < len(class_names)]
    title, legend_font, top, row = font(16), font(14), 24, 20
    legend_w = 34 + max([int(legend_font.getlength(class_names[c])) for c in present] + [40])
    canvas = Image.new("RGB", (3 * (width + 4) + legend_w, max(top + height, top + row * len(present) + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (name, array) in enumerate(panels):
        x = k * (width + 4)
        resample = Image.BILINEAR if k == 0 else Image.NEAREST
        canvas.paste(Image.fromarray(array).resize((width, height), resample), (x, top))
        draw.text((x + 2, 3), name, fill=(0, 0, 0), font=title)
    x0, colours = 3 * (width + 4) + 6, _colours()
    for k, c in enumerate(present):
        y = top + 2 + k * row
        draw.rectangle([x0, y, x0 + 16, y + 14], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        draw.text((x0 + 22, y), class_names[c], fill=(0, 0, 0), font=legend_font)
    return canvas


def mask_overlay(image: torch.Tensor, mask: np.ndarray, height: int = 160) -> Image.Image:
    """A pseudo-mask shown so it reads on any object colour: the foreground in full colour with a
    cyan outline, the background dimmed (MASK_LEGEND); resized to `height`."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    width = max(1, round(img.width * height / img.height))
    img = np.asarray(img.resize((width, height), Image.BILINEAR)).astype(np.float32)
    fg = np.asarray(Image.fromarray(np.asarray(mask).astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
    img[~fg] *= 0.3
    edge = np.zeros_like(fg)  # foreground pixels with a background 4-neighbour, 2 px thick
    for _ in range(2):
        inner = fg & ~edge
        padded = np.pad(inner, 1, constant_values=False)
        eroded = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        edge |= inner & ~eroded
    img[edge] = (0, 255, 255)
    return Image.fromarray(img.round().astype(np.uint8))


def mask_sheet(tiles: list, title: str, legend: str = MASK_LEGEND, gap: int = 4) -> Image.Image:
    """Tiles side by side under a title line and a legend line."""
    title_font, legend_font = font(18), font(13)
    draw_w = max(int(title_font.getlength(title)), int(legend_font.getlength(legend))) + 8
    width = max(sum(t.width for t in tiles) + gap * (len(tiles) - 1), draw_w)
    sheet = Image.new("RGB", (width, 46 + max(t.height for t in tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 2), title, fill=(0, 0, 0), font=title_font)
    draw.text((2, 26), legend, fill=(60, 60, 60), font=legend_font)
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 46))
        x += t.width + gap
    return sheet


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
    axes[0][0].set(xlabel="iteration", ylabel="loss", title="training loss (mean over each logging window)")
    if val:
        axes[0][1].plot(*zip(*val), marker="o")
        axes[0][1].set(xlabel="iteration", ylabel="mIoU (%)", title="validation mIoU")
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
