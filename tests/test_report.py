"""The run report (index.html) from a small run folder made of the stages' own writers: readable
archive sheets, pseudo-mask sheets with a legend whose outline shows on red objects, prediction
beside ground truth, the validation curve, stage timings, ablation tables, and the toy-world
disclaimer exactly when the archive came from the toy CLIP."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from namedmask import io
from namedmask.data.archive import Archive
from namedmask.data.synthetic import CLASSES, write_dataset
from namedmask.report import (MASK_LEGEND, TOY_WARNING, build_report, comparison_image, label_colours,
                              mask_overlay, plot_curves, stage_timings, toy_clip)
from namedmask.stages.archive import write_contact_sheets
from namedmask.stages.saliency import write_report as write_mask_report
from namedmask.toy.clip import MODEL as TOY_CLIP

CYAN = (0, 255, 255)


def _run_folder(root, data, clip_name: str, validation: bool = True):
    """A run folder as the pipeline leaves it, written by the stages' report functions."""
    run = root / "run"
    pool = sorted(p.name for p in (data / "pool").glob("*.jpg"))
    archives = {name: [{"path": p, "score": 0.3 - 0.01 * k} for k, p in enumerate(pool[i::len(CLASSES)][:3])]
                for i, name in enumerate(CLASSES)}
    archive = Archive(data / "pool", {n: i + 1 for i, n in enumerate(CLASSES)}, archives,
                      {e["path"]: n for n, es in archives.items() for e in es},
                      {"model": {"name": clip_name}, "prompt_words": {n: [n, f"{n}-synonym"] for n in CLASSES}})
    io.write_json(run / "archive" / "archive.json", archive.to_dict())
    write_contact_sheets(archive, run / "archive" / "report")
    masks = {}
    for entries in archives.values():
        for e in entries:
            h, w = np.asarray(Image.open(data / "pool" / e["path"])).shape[:2]
            m = np.zeros((h, w), np.uint8)
            m[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
            io.save_png(run / "saliency" / "masks" / f"{e['path']}.png", m)
            masks[e["path"]] = {"mask": f"masks/{e['path']}.png"}
    write_mask_report(run / "saliency", archive, {"masks": masks})
    records = [{"iteration": i, "loss": 2.0 / i} for i in (2, 4, 6)]
    if validation:
        records += [{"iteration": 4, "val_miou": 0.2, "val_pixel_acc": 0.5},
                    {"iteration": 6, "val_miou": 0.3, "val_pixel_acc": 0.6}]
    io.write_text(run / "train" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    plot_curves(run / "train")
    for k, stage in enumerate(("archive", "saliency", "train")):
        io.write_json(run / ".stages" / f"{stage}.json", {"fingerprint": "x", "settings": {}, "seconds": 1.5 * (k + 1),
                                                          "finished": f"2026-01-01 00:00:0{k}"})
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), pool_per_class=3, eval_images=2)


def test_toy_run_report_shows_every_piece(tmp_path, data):
    run = _run_folder(tmp_path, data, TOY_CLIP)
    io.write_json(run / "ablations" / "copy_paste.json", {
        "title": "Copy-paste augmentation", "metric": "mIoU (%)", "columns": ["eval/single", "eval/multi"],
        "rows": [{"name": "without copy-paste", "values": [61.5, 40.25]}, {"name": "with copy-paste", "values": [62, 41]}],
        "reference": [{"name": "paper, with", "values": [68.0, 53.6]}], "notes": "same seed"})
    page = build_report(run, title="t").read_text()
    assert TOY_WARNING.format(clip=TOY_CLIP) in page.replace("&#x27;", "'")
    assert "ViT-L/14" in page
    # stage timings, in the order they finished, with their seconds
    assert [t["stage"] for t in stage_timings(run)] == ["archive", "saliency", "train"]
    timings = page.split("<h3>Stage timings</h3>")[1].split("</table>")[0]
    assert "<td>saliency</td><td class='num'>3.0</td>" in timings and "Total 9.0 s" in page
    # the ablation table with measured rows and the reference rows marked as such
    ablation = page.split("<h3>Ablations</h3>")[1]
    assert "Copy-paste augmentation" in ablation and "<td class='num'>40.25</td>" in ablation
    assert "(paper, with)" in ablation and "same seed" in ablation
    # the training caption promises validation only because validation ran
    assert "validation mIoU" in page and (run / "train" / "curves.png").is_file()
    curves = Image.open(run / "train" / "curves.png")
    assert curves.width > 2 * curves.height  # two panels: loss and validation mIoU
    # archive sheets: one per category, folded to their first strip, the whole sheet behind a link
    sheets = sorted((run / "archive" / "report").glob("*.png"))
    assert len(sheets) == len(CLASSES) and Image.open(sheets[0]).width >= 1000
    assert "<div class='fold'>\n<a class='fold' href='archive/report/" in page
    assert MASK_LEGEND in page and "saliency/report/" in page


def test_no_disclaimer_without_the_toy_clip_nor_validation_claim_without_validation(tmp_path, data):
    run = _run_folder(tmp_path, data, "ViT-L-14-336", validation=False)
    page = build_report(run).read_text()
    assert toy_clip(run) is None and "TOY MODELS" not in page
    assert "no validation ran" in page and "Ablations" not in page
    assert Image.open(run / "train" / "curves.png").width < 2 * Image.open(run / "train" / "curves.png").height


def test_toy_signal_from_the_config_before_the_archive_exists(tmp_path):
    io.write_text(tmp_path / "config.yaml", f"archive:\n  model: {TOY_CLIP}\n")
    assert toy_clip(tmp_path) == TOY_CLIP
    io.write_text(tmp_path / "config.yaml", "archive:\n  model: nm-tiny\n")
    assert toy_clip(tmp_path) is None
    assert toy_clip(tmp_path / "missing") is None


def test_mask_overlay_outline_shows_on_a_red_object():
    image = torch.zeros(40, 40, 3, dtype=torch.uint8)
    image[..., 0] = 255  # all red: a red tint would be invisible
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 1
    out = np.asarray(mask_overlay(image, mask, height=40))
    assert tuple(out[10, 20]) == CYAN and tuple(out[11, 20]) == CYAN   # 2-px outline
    assert tuple(out[20, 20]) == (255, 0, 0)                           # inside untouched
    assert tuple(out[0, 0]) == (round(255 * 0.3), 0, 0)                # background dimmed


def test_comparison_shows_prediction_beside_ground_truth_with_a_legend():
    names = ["background", "disc", "square", "triangle"]
    image = torch.full((16, 16, 3), 100, dtype=torch.uint8)
    pred = torch.zeros(16, 16, dtype=torch.int64)
    pred[4:12, 4:12] = 1
    gt = torch.zeros(16, 16, dtype=torch.int64)
    gt[4:12, 4:12] = 3
    gt[0, 0] = 255
    out = np.asarray(comparison_image(image, pred, gt, names, height=32))
    colours = label_colours(np.arange(4))
    top, width = 24, 32
    assert tuple(out[top + 16, 16]) == (100, 100, 100)                          # the image
    assert tuple(out[top + 16, width + 4 + 16]) == tuple(colours[1])            # prediction: disc
    assert tuple(out[top + 16, 2 * (width + 4) + 16]) == tuple(colours[3])      # ground truth: triangle
    assert tuple(out[top, 2 * (width + 4)]) == (255, 255, 255)                  # ignore is white
    legend = out[:, 3 * (width + 4):].reshape(-1, 3)
    for c in (0, 1, 3):  # every class of either map has its swatch; square appears in neither
        assert (legend == colours[c]).all(axis=1).any(), c
    assert not (legend == colours[2]).all(axis=1).any()


def test_the_report_leads_with_results(tmp_path, data):
    """The final mIoU, the per-class IoU as numbers and the examples come before any stage."""
    run = _run_folder(tmp_path, data, TOY_CLIP)
    names = ["background", "ball", "box"]
    io.write_json(run / "eval" / "metrics.json", {"miou": 0.6466, "per_class_iou": [0.9, 0.5, float("nan")],
                                                   "per_class_acc": [0.95, 0.6, float("nan")], "num_images": 7,
                                                   "num_classes": 3, "class_names": names})
    image = torch.full((16, 16, 3), 90, dtype=torch.uint8)
    io.save_png(run / "eval" / "0000.png", comparison_image(image, torch.ones(16, 16, dtype=torch.int64),
                                                           torch.ones(16, 16, dtype=torch.int64), names))
    page = build_report(run, title="t").read_text()
    results, stages = page.split("<h2>How the run got there</h2>")
    assert "mIoU 0.647" in results                                  # one unit: a fraction, as metrics.json
    assert "<td>ball</td><td class='num'>0.500</td><td class='num'>0.600</td>" in results
    assert "<td>box</td><td>-</td><td>-</td>" in results            # absent class: no number, not 0
    assert "eval/0000.png" in results and "archive/report/" not in results
    assert "Stage timings" in stages and "archive/report/" in stages


def test_report_palette_neighbours_differ():
    """Classes next to each other differ clearly (the VOC palette drew ball and moon, ids 1 and 8,
    as two dark reds on black), and no class looks like background or ignore."""
    from namedmask.report import report_palette

    colours = report_palette().astype(int)
    assert tuple(colours[0]) == (0, 0, 0) and tuple(colours[255]) == (255, 255, 255)
    for c in range(1, 21):
        assert np.abs(colours[c] - colours[c + 1]).sum() >= 100, c
        for step in (2, 3):  # ids close together are often in one picture
            assert np.abs(colours[c] - colours[c + step]).sum() >= 60, (c, step)
        assert colours[c].sum() >= 100 and np.abs(colours[c] - 255).sum() >= 60, c
    assert np.abs(colours[1] - colours[8]).sum() >= 300  # the toy world's ball and moon
    classes = colours[1:21]
    distances = np.abs(classes[:, None] - classes[None]).sum(-1) + 1000 * np.eye(20, dtype=int)
    assert distances.min() >= 30  # no two of the first 20 classes alike (Kelly's yellows 1 and 13 are the closest)


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_first_screen_shows_the_results(tmp_path, data):
    """As a person opens it: headless Chromium renders index.html at 1400 x 900, and that first
    screen holds the evaluation example (its prediction panel's colour), not archive sheets."""
    import subprocess

    from namedmask.report import report_palette

    run = _run_folder(tmp_path, data, TOY_CLIP)
    names = ["background", "ball"]
    io.write_json(run / "eval" / "metrics.json", {"miou": 0.5, "per_class_iou": [0.9, 0.1], "per_class_acc": [1, 0.2],
                                                   "num_images": 1, "num_classes": 2, "class_names": names})
    label = torch.ones(64, 64, dtype=torch.int64)
    io.save_png(run / "eval" / "0000.png", comparison_image(torch.zeros(64, 64, 3, dtype=torch.uint8), label, label,
                                                           names, height=160))
    page = build_report(run, title="t")
    shot = tmp_path / "screen.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", f"--screenshot={shot}",
                    "--window-size=1400,900", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=300)
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert screen.shape[:2] == (900, 1400)
    ball = report_palette()[1].astype(int)
    shown = (np.abs(screen - ball).sum(-1) <= 6).sum()
    assert shown >= 2 * 100 * 100, shown   # two 160-px panels of the class colour, at least
