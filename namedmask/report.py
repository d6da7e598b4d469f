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

METRICS_FILE = "metrics.jsonl"   # a training run's log: one JSON object per logged iteration / validation

TOY_WARNING = ("TOY MODELS: this run's CLIP ({clip}) and DINO are tiny models trained here on generated images "
               "(namedmask toy-world). Its numbers show that the stages compose into a segmenter that names "
               "objects in that world; they are not comparable with the paper's, which need the real ViT-L/14 "
               "CLIP and DINO weights.")
MASK_LEGEND = "pseudo-mask foreground in full colour, outlined in cyan; background dimmed"

# (section title, folder inside the run dir, what it shows, css class of its images): results first,
# then the stages that made them.
RESULT_SECTIONS = (
    ("Evaluation examples", "eval", "Image | prediction | ground truth, labels in solid colours with a legend of the "
                                    "classes in either map.", "grid"),
    ("Predictions", "predict/overlays", "Predicted segments named with the category set.", "grid"),
)
STAGE_SECTIONS = (
    ("Category archives (CLIP retrieval)", "archive/report",
     "The first retrieved pool images per category, best first, each with its rank and cosine score "
     "(click a strip for the whole sheet).", "fold"),
    ("Saliency pseudo-masks (DINO)", "saliency/report", f"Class-agnostic object masks of archive images: {MASK_LEGEND}.",
     "grid"),
    ("Refined pseudo-masks (category experts)", "refined/report",
     f"Masks re-predicted by the category experts: {MASK_LEGEND}.", "grid"),
    ("Training", "train", None, "grid"),
)
NOT_EXAMPLES = {"per_class_iou.png"}   # shown beside the per-class table, not among the examples


def iou_bar_chart(metrics_json: str | Path, out_png: str | Path) -> Path:
    """Horizontal bar chart of per-class IoU from an eval metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(metrics_json).read_text())
    names = data.get("class_names") or [str(i) for i in range(data["num_classes"])]
    ious = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in data["per_class_iou"]]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    ax.barh(range(len(names)), ious, color="#3b7dd8")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(f"mIoU {data['miou']:.3f}  ({data['num_images']} images)")
    fig.tight_layout()
    with io.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out_png)


def build_report(run_dir: str | Path, title: str = "namedmask run", warnings: list | None = None,
                 facts: dict | None = None, max_images: int = 24) -> Path:
    """Writes <run_dir>/index.html from what the stages left in the run directory. Results come
    first (the final mIoU and other facts, the per-class IoU table with numbers, many image |
    prediction | ground truth examples, predictions), then how the run got there (stage timings,
    archive sheets folded to their first row of thumbnails with the full sheet one click away,
    pseudo-masks, training curves, ablations). mIoU is a fraction in [0, 1] everywhere (report,
    logs, metrics.json), as in eval/metrics.json."""
    run_dir = Path(run_dir)
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "img{max-width:100%;border:1px solid #ccc;margin:4px}"
             ".warn{background:#fff3cd;border:3px solid #d39e00;padding:1em;font-size:1.4em;font-weight:bold}"
             ".toy{background:#e8f1fb;border:2px solid #3b7dd8;padding:0.6em;font-size:1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #eee;"
             "text-align:left}td.num{text-align:right}"
             ".headline{font-size:2em;font-weight:bold;margin:0.3em 0}"
             ".grid{display:flex;flex-wrap:wrap;align-items:flex-start}.grid img{max-width:680px}"
             ".fold{display:block;max-height:150px;overflow:hidden;margin-bottom:6px}.fold img{display:block}"
             "</style>",
             f"<h1>{e(title)}</h1>"]
    for w in warnings or []:
        parts.append(f"<div class='warn'>{e(w)}</div>")
    facts = dict(facts or {})
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if metrics is not None and "mIoU" not in facts:
        facts["mIoU"] = f"{metrics['miou']:.3f}"
    parts.append("<h2>Results</h2>")
    if "mIoU" in facts:
        parts.append(f"<p class='headline'>mIoU {e(str(facts['mIoU']))}</p>")
    if facts:
        parts.append(_table(None, [[k, v] for k, v in facts.items()]))
    if metrics is not None:
        parts.append(_per_class_table(metrics))
    clip = toy_clip(run_dir)
    if clip:
        parts.append(f"<div class='toy'>{e(TOY_WARNING.format(clip=clip))}</div>")
    for heading, folder, caption, css in RESULT_SECTIONS:
        parts += _image_section(run_dir, heading, folder, caption, css, max_images)
    parts.append("<h2>How the run got there</h2>")
    timings = stage_timings(run_dir)
    if timings:
        rows = [[t["stage"], f"{t['seconds']:.1f}", t["parts"], t["finished"]] for t in timings]
        parts.append("<h3>Stage timings</h3>" + _table(["stage", "wall time (s)", "parts", "finished (UTC)"], rows)
                     + f"<p>Total {sum(t['seconds'] for t in timings):.1f} s. A stage's time is the sum of all "
                       "its parts: a stage interrupted and resumed counts every part, not only the last "
                       "(a part ended by a hard kill counts up to its last save, at most 30 s short). A stage "
                       "skipped on a later run keeps the time of the run that made it.</p>")
        envs = {t["stage"]: t["environment"] for t in timings if t.get("environment")}
        if envs:
            from namedmask.envinfo import format_environment

            lines = sorted({format_environment(env) for env in envs.values()})
            parts.append("<h3>Environment</h3><p>What these numbers depend on besides the config and seed "
                         "(docs/reproducibility.md):</p><ul>"
                         + "".join(f"<li>{e(line)}" + (" &mdash; " + e(", ".join(
                             st for st, env in envs.items() if format_environment(env) == line))
                             if len(lines) > 1 else "") + "</li>" for line in lines) + "</ul>")
    for heading, folder, caption, css in STAGE_SECTIONS:
        parts += _image_section(run_dir, heading, folder, caption, css, max_images)
    ablations = sorted((run_dir / "ablations").glob("*.json")) if (run_dir / "ablations").is_dir() else []
    if ablations:
        parts.append("<h3>Ablations</h3>")
        for path in ablations:
            parts.append(_ablation_table(json.loads(path.read_text())))
    out = run_dir / "index.html"
    io.write_text(out, "\n".join(parts) + "\n")
    return out


def _image_section(run_dir: Path, heading: str, folder: str, caption: str | None, css: str, max_images: int) -> list:
    """The HTML of one section of PNGs (none when the folder has none); `fold` shows each PNG's
    top strip, linked to the whole picture."""
    e = html.escape
    pngs = sorted(p for p in (run_dir / folder).glob("*.png") if p.name not in NOT_EXAMPLES) \
        if (run_dir / folder).is_dir() else []
    if not pngs:
        return []
    if caption is None:
        caption = _training_caption(run_dir / folder)
    parts = [f"<h3>{e(heading)}</h3><p>{e(caption)}</p><div class='{css}'>"]
    for p in pngs[:max_images]:
        rel = e(p.relative_to(run_dir).as_posix())
        parts.append(f"<a class='fold' href='{rel}'><img src='{rel}' title='{e(p.name)}'></a>" if css == "fold"
                     else f"<a href='{rel}'><img src='{rel}' title='{e(p.name)}'></a>")
    if len(pngs) > max_images:
        parts.append(f"<p>... and {len(pngs) - max_images} more in {e(folder)}/</p>")
    parts.append("</div>")
    return parts


def _per_class_table(metrics: dict) -> str:
    """Per-class IoU and accuracy as numbers (a bar chart alone hides them), classes absent from
    both prediction and ground truth shown as '-'."""
    names = metrics.get("class_names") or [str(i) for i in range(metrics["num_classes"])]
    accs = metrics.get("per_class_acc") or [None] * len(names)

    def number(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    rows = [[name, number(iou), number(acc)] for name, iou, acc in zip(names, metrics["per_class_iou"], accs)]
    chart = "eval/per_class_iou.png"
    return ("<div class='grid'><div>" + _table(["class", "IoU", "accuracy"], rows)
            + f"<p>{metrics.get('num_images', '?')} images, one confusion matrix over all of them.</p></div>"
            + f"<a href='{chart}'><img src='{chart}' style='max-width:520px'></a></div>")


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

    from namedmask.models.clip import TOY_MODEL as TOY_CLIP

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

# Kelly's colours of maximum contrast, in his order: classes next to each other in a list (and so
# often in one picture) get colours far apart, and none of them is close to background black.
# Label PNGs on disk keep the VOC palette (the datasets' convention); pictures for people use this.
_KELLY = ("F3C300 875692 F38400 A1CAF1 BE0032 C2B280 848482 008856 E68FAC 0067A5 F99379 604E97 F6A600 "
          "B3446C DCD300 882D17 8DB600 654522 E25822 2B3D26").split()


def report_palette() -> np.ndarray:
    """256 x 3 uint8 colours for pictures: 0 (background) black, 255 (ignore) white, classes 1-20
    Kelly's colours, beyond them hues stepped by the golden ratio at alternating lightness."""
    import colorsys

    colours = np.zeros((256, 3), np.uint8)
    for c in range(1, 255):
        if c <= len(_KELLY):
            colours[c] = [int(_KELLY[c - 1][i:i + 2], 16) for i in (0, 2, 4)]
        else:
            r, g, b = colorsys.hls_to_rgb((c * 0.618033988749895) % 1.0, (0.45, 0.65)[c % 2], 0.75)
            colours[c] = [round(255 * v) for v in (r, g, b)]
    colours[255] = 255
    return colours


def _colours() -> np.ndarray:
    return report_palette()


def overlay_image(image: torch.Tensor, label: torch.Tensor, class_names: list, alpha: float = 0.5) -> Image.Image:
    """RGB image with non-background classes tinted by the report palette and, on the right,
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
    """H x W x 3 uint8: each class in its report-palette colour, ignore (255) white."""
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
    val = [(r["iteration"], r["val_miou"]) for r in records if "val_miou" in r]
    if not loss:
        return None
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 5, 3.5), squeeze=False)
    axes[0][0].plot(*zip(*loss))
    axes[0][0].set(xlabel="iteration", ylabel="loss", title="training loss (mean over each logging window)")
    if val:
        axes[0][1].plot(*zip(*val), marker="o")
        axes[0][1].set(xlabel="iteration", ylabel="mIoU", title="validation mIoU")
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
