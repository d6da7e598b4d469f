"""`namedmask discover` end to end on tiny random models: outputs, resumability, a one-colour
image, bad inputs as one error line."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli

ARGS = ["--model", "nm-tiny", "--dino", "vit_tiny_patch16_224", "--random-weights", "--size", "64",
        "--templates", "simple", "--k", "4"]


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    a = np.zeros((60, 80, 3), np.uint8)
    a[:, 40:] = 200
    a[:20, :, 2] = 255
    Image.fromarray(a).save(d / "two.png")
    Image.fromarray(np.full((50, 50, 3), 90, np.uint8)).save(d / "flat.png")
    return d


def test_discover_writes_resumes_and_handles_flat_images(tmp_path, images, monkeypatch):
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat | kitty\ndog\nsky\ngrass\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["discover", str(images), "--out", str(out), "--vocabulary", str(vocab),
                                 "--min-score", "-1", *ARGS])
    assert r.exit_code == 0, r.output
    for stem in ("two", "flat"):
        label = np.array(Image.open(out / "labels" / f"{stem}.png"))
        info = json.loads((out / "segments" / f"{stem}.json").read_text())
        ids = sorted(s["id"] for s in info["segments"])
        assert label.shape == np.array(Image.open(images / f"{stem}.png")).shape[:2]
        assert sorted(np.unique(label).tolist()) == ids
        assert abs(sum(s["area"] for s in info["segments"]) - 1) < 1e-3
        assert all(s["name"] in ("cat", "dog", "sky", "grass") and len(s["runner_ups"]) == 2 for s in info["segments"])
        assert (out / "overlays" / f"{stem}.png").is_file()
    flat = json.loads((out / "segments" / "flat.json").read_text())["segments"]
    assert len(flat) == 1 and flat[0]["area"] == 1.0
    # the report section: every image's overlay and segment rows, the names with their counts
    report = (out / "report.html").read_text()
    every = [s for stem in ("two", "flat") for s in json.loads((out / "segments" / f"{stem}.json").read_text())["segments"]]
    assert "src='overlays/two.png'" in report and "src='overlays/flat.png'" in report
    assert f"2 images, {len(every)} segments ({len(every)} named, 0 without a name)" in report
    for name in {s["name"] for s in every}:
        n = sum(s["name"] == name for s in every)
        holding = sum(any(s["name"] == name for s in json.loads((out / "segments" / f"{stem}.json").read_text())["segments"])
                     for stem in ("two", "flat"))
        assert f"<tr><td>{name}</td><td>{n}</td><td>{holding}</td></tr>" in report
    assert report.count("<td>1</td><td>") >= 2                              # a segment row per image at least
    sheet = Image.open(out / "summary.png")
    assert sheet.size == (2 * 256, 256 + 14)                                # two overlays, one row
    assert set(json.loads((out / "segments.json").read_text())) == {"two", "flat"}
    # resumed: nothing recomputed (models are not even loaded)
    import namedmask.stages.discover as stage
    monkeypatch.setattr(stage, "load_models", lambda *a, **k: pytest.fail("models loaded on a finished folder"))
    r = CliRunner().invoke(cli, ["discover", str(images), "--out", str(out), "--vocabulary", str(vocab),
                                 "--min-score", "-1", *ARGS])
    assert r.exit_code == 0 and "0 images segmented (2 already done)" in r.output, r.output
    # other settings in the same folder are refused
    r = CliRunner().invoke(cli, ["discover", str(images), "--out", str(out), "--vocabulary", str(vocab), *ARGS])
    assert r.exit_code == 1 and "other settings" in r.output


def test_high_min_score_gives_no_names(tmp_path, images):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["discover", str(images / "flat.png"), "--out", str(out), "--min-score", "1",
                                 "--vocabulary", "builtin", *ARGS])
    assert r.exit_code == 0, r.output
    segs = json.loads((out / "segments" / "flat.json").read_text())["segments"]
    assert [s["name"] for s in segs] == [None]


@pytest.mark.parametrize("extra, message", [
    (["--vocabulary", "missing.txt"], "--vocabulary missing.txt: not 'builtin' and not a file"),
    (["--mask-prompts", "nope.safetensors", "--embed", "crop"], "--mask-prompts nope.safetensors: no such file"),
    (["--mask-prompts", "nope.safetensors"], "mask_prompts work on masked crops"),
    (["--k", "0"], "k must be in [1, 255], got 0"),
])
def test_bad_inputs_one_line(tmp_path, images, extra, message):
    r = CliRunner().invoke(cli, ["discover", str(images), "--out", str(tmp_path / "o"), *ARGS, *extra])
    assert r.exit_code == 1 and message in r.output and r.output.count("\n") == 1, r.output


def test_discover_paper_preset_end_to_end(tmp_path, images):
    """--preset paper with tiny random models: the cluster tree, soft-area attention with global
    subtraction, the tree merge; names from a vocabulary (the fast namer) and the bilateral
    solver where pydensecrf2 is absent. Resumable like the default."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        refine = "densecrf"
    except ImportError:
        refine = "bilateral"
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\ndog\nsky\n")
    out = tmp_path / "out"
    args = ["discover", str(images), "--out", str(out), "--vocabulary", str(vocab), "--preset", "paper",
            "--model", "nm-tiny", "--dino", "vit_tiny_patch16_224", "--random-weights", "--size", "64",
            "--templates", "simple", "--namer", "vocabulary", "--refine-method", refine,
            "--set", "dino_stride=8", "--set", "tree_leaves=6"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "discover.json").read_text())
    assert (settings["cluster"], settings["embed"], settings["merge_rule"], settings["mask_layers"],
            settings["tree_leaves"], settings["dino_stride"], settings["merge_threshold"]) == \
        ("tree", "zero-guidance", "tree", None, 6, 8, 0.8)
    for stem in ("two", "flat"):
        label = np.array(Image.open(out / "labels" / f"{stem}.png"))
        segs = json.loads((out / "segments" / f"{stem}.json").read_text())["segments"]
        assert sorted(np.unique(label).tolist()) == [s["id"] for s in segs]
        assert all(s["name"] in ("cat", "dog", "sky") and "tree_id" in s for s in segs)
        # tree ids of the final segments: no one is an ancestor of another
        ids = [s["tree_id"] for s in segs]
        for t in ids:
            a = t
            while a > 0:
                a = (a - 1) // 2
                assert a not in ids
        from safetensors.torch import load_file
        emb = load_file(str(out / "embeddings" / f"{stem}.safetensors"))
        assert emb["image"].shape[0] == len(segs) == emb["text"].shape[0]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "0 images segmented (2 already done)" in r.output, r.output


def test_densecrf_missing_is_one_line(tmp_path, images, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_crf(name, *a, **kw):
        if name.startswith("pydensecrf"):
            raise ImportError("no pydensecrf")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    r = CliRunner().invoke(cli, ["discover", str(images), "--out", str(tmp_path / "o"), "--refine-method", "densecrf",
                                 *ARGS])
    assert r.exit_code != 0
    assert "namedmask[densecrf]" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_folder_of_an_older_version_still_resumes(tmp_path, images):
    """discover.json written before the paper's settings existed: the new settings at their
    defaults count as the same settings; a changed one does not."""
    out = tmp_path / "out"
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\ndog\n")
    r = CliRunner().invoke(cli, ["discover", str(images / "flat.png"), "--out", str(out), "--vocabulary", str(vocab),
                                 "--min-score", "-1", *ARGS[:-2], "--k", "2"])
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "discover.json").read_text())
    for key in ("cluster", "tree_leaves", "tree_cut", "dino_stride", "refine_method", "subtraction_sd", "merge_rule",
                "merge_weight", "namer", "captioner", "caption_prompt", "caption_beam", "caption_length"):
        settings.pop(key)
    (out / "discover.json").write_text(json.dumps(settings))
    r = CliRunner().invoke(cli, ["discover", str(images / "flat.png"), "--out", str(out), "--vocabulary", str(vocab),
                                 "--min-score", "-1", *ARGS[:-2], "--k", "2"])
    assert r.exit_code == 0 and "1 already done" in r.output, r.output
    r = CliRunner().invoke(cli, ["discover", str(images / "flat.png"), "--out", str(out), "--vocabulary", str(vocab),
                                 "--min-score", "-1", *ARGS[:-2], "--k", "2", "--cluster", "tree"])
    assert r.exit_code != 0 and "other settings" in r.output


def test_eval_discover_command(tmp_path, images):
    """discover on a folder set, then `eval --discover` on it (both matching modes): the metrics
    JSON, and one-line errors for a folder that is not discover's."""
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\ndog\nsky\n")
    ds = tmp_path / "set"
    (ds / "labels").mkdir(parents=True)
    import shutil
    shutil.copytree(images, ds / "images")
    two = np.zeros((60, 80), np.uint8)
    two[:, 40:] = 1
    two[:20] = 2
    Image.fromarray(two).save(ds / "labels" / "two.png")
    Image.fromarray(np.full((50, 50), 3, np.uint8)).save(ds / "labels" / "flat.png")
    out = tmp_path / "disc"
    r = CliRunner().invoke(cli, ["discover", str(ds / "images"), "--out", str(out), "--vocabulary", str(vocab),
                                 "--min-score", "-1", *ARGS])
    assert r.exit_code == 0, r.output
    for mode in ("t-t", "i-t"):
        m = tmp_path / f"{mode}.json"
        r = CliRunner().invoke(cli, ["eval", "--discover", str(out), "--dataset", "folder", "--root", str(ds),
                                     "--class-names", str(vocab), "--discover-mode", mode, "--out", str(m)])
        assert r.exit_code == 0, r.output
        res = json.loads(m.read_text())
        assert res["images"] == 2 and res["classes"] == 3 and res["mode"] == mode
        for key in ("iou_union", "iou_argmax", "recall_union", "recall_argmax", "recall_allseg"):
            assert 0.0 <= res[key] <= 1.0
    r = CliRunner().invoke(cli, ["eval", "--discover", str(ds), "--dataset", "folder", "--root", str(ds),
                                 "--class-names", str(vocab)])
    assert r.exit_code != 0 and "discover.json" in r.output and len(r.output.strip().splitlines()) == 1
