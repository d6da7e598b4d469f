"""`namedmask refine --method bilateral-solver` over folders: outputs, resumption, bad pairs."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from namedmask import ops
from namedmask.cli import cli
from namedmask.stages.refine import RefineError, refine_folder


def make_pair(root, stem, h, w, seed, mask_values=(0, 255)):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 3:, : w // 2] //= 5
    mask = np.full((h, w), mask_values[0], np.uint8)
    mask[h // 3 - 2:, : w // 2 + 3] = mask_values[1]
    (root / "images" / stem).parent.mkdir(parents=True, exist_ok=True)
    (root / "masks" / stem).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return torch.from_numpy(img), torch.from_numpy(mask != 0).float()


@pytest.fixture
def folders(tmp_path):
    pairs = {"a": make_pair(tmp_path, "a", 40, 52, 0), "sub/b": make_pair(tmp_path, "sub/b", 33, 61, 1, (0, 1)),
             "c": make_pair(tmp_path, "c", 25, 25, 2)}
    return tmp_path, pairs


def run(args):
    return CliRunner().invoke(cli, ["refine", "--method", "bilateral-solver"] + args, catch_exceptions=False)


def test_refines_folder_like_the_op(folders):
    root, pairs = folders
    res = run(["--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(root / "out"),
               "--preset", "tokencut", "--sigma-luma", "6"])
    assert res.exit_code == 0, res.output
    assert "refined 3" in res.output
    for stem, (img, target) in pairs.items():
        got = np.array(Image.open(root / "out" / f"{stem}.png"))
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
        want = ops.bilateral_solve(img, target, preset="tokencut", sigma_luma=6) > 0.5
        assert np.array_equal(got, want.numpy().astype(np.uint8))
    config = json.loads((root / "out" / "refine.json").read_text())
    assert config["sigma_luma"] == 6 and config["sigma_spatial"] == 16 and config["threshold"] == 0.5
    assert not list((root / "out").rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_resumes_and_refuses_mixed_settings(folders):
    root, _ = folders
    args = ["--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(root / "out")]
    assert run(args).exit_code == 0
    (root / "out" / "a.png").unlink()  # as if interrupted before writing a
    before = (root / "out" / "c.png").stat().st_mtime_ns
    res = run(args)
    assert res.exit_code == 0 and "refined 1, already done 2" in res.output
    assert (root / "out" / "a.png").exists() and (root / "out" / "c.png").stat().st_mtime_ns == before
    res = CliRunner().invoke(cli, ["refine"] + args + ["--lam", "4"])
    assert res.exit_code != 0 and "other settings" in res.output
    res = run(args + ["--lam", "4", "--overwrite"])
    assert res.exit_code == 0 and "refined 3" in res.output


def test_bad_pairs_are_named_and_the_rest_refined(folders):
    root, _ = folders
    (root / "images" / "c.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "orphan.png")
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(root / "masks" / "a.png")  # wrong size
    with pytest.raises(RefineError) as err:
        refine_folder(root / "images", root / "masks", root / "out", progress=False)
    msg = str(err.value)
    assert "3 bad or missing" in msg and "c.png" in msg and "orphan" in msg and "differs from image" in msg
    assert (root / "out" / "sub" / "b.png").exists()  # the good pair was still refined
    report = refine_folder(root / "images", root / "masks", root / "out", skip_bad=True, progress=False)
    assert report.skipped_done == 1 and len(report.failed) == 3
    res = CliRunner().invoke(cli, ["refine", "--images", str(root / "images"), "--masks", str(root / "masks"),
                                   "--out", str(root / "out2")])
    assert res.exit_code != 0 and "bad or missing" in res.output


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(cli, ["refine", "--images", str(tmp_path / "nope"), "--masks", str(tmp_path),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "not a directory" in res.output
    res = CliRunner().invoke(cli, ["refine", "--method", "experts", "--images", str(tmp_path), "--masks",
                                   str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bilateral-solver" in res.output


@pytest.mark.parametrize("given", ["folder", "masks_subfolder"])
def test_refined_pseudo_mask_folder_is_a_training_input(tmp_path, given):
    """refine of a pseudo-mask folder writes the same manifest schema, so train takes it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import write_archive

    from namedmask.data.pseudo_masks import load_manifest, mask_paths
    from namedmask.data.training import archive_items

    archive, masks, _ = write_archive(tmp_path, per_class=2, size=32)
    src = masks if given == "folder" else masks / "masks"
    res = run(["--images", str(tmp_path / "pool"), "--masks", str(src), "--out", str(tmp_path / "refined")])
    assert res.exit_code == 0, res.output
    source, refined = load_manifest(masks), load_manifest(tmp_path / "refined")
    assert set(refined["masks"]) == set(source["masks"]) and refined["refine"] == "bilateral-solver"
    for image, path in mask_paths(tmp_path / "refined").items():
        assert path.is_file() and path.parent.is_relative_to(tmp_path / "refined")
        mask = np.array(Image.open(path))
        assert refined["masks"][image]["fg_fraction"] == round(float(mask.mean()), 6)
    items, names = archive_items(archive, tmp_path / "refined")
    assert len(items) == len(source["masks"]) and names[0] == "background"
    assert all(str(it.mask).startswith(str(tmp_path / "refined")) for it in items)


def test_refine_reads_its_config_and_options_win(folders):
    root, _ = folders
    cfg = root / "refine.yaml"
    cfg.write_text(f"images: {root / 'images'}\nmasks: {root / 'masks'}\nout: {root / 'out'}\n"
                   "preset: tokencut\nsigma_luma: 6\nthreshold: 0.4\n")
    res = CliRunner().invoke(cli, ["refine", "--config", str(cfg), "--set", "sigma_chroma=3", "--threshold", "0.5"])
    assert res.exit_code == 0, res.output
    written = json.loads((root / "out" / "refine.json").read_text())
    assert (written["preset"], written["sigma_spatial"], written["sigma_luma"], written["sigma_chroma"],
            written["threshold"]) == ("tokencut", 16, 6, 3, 0.5)


def test_image_over_the_memory_bound_is_listed_and_its_batch_refined(folders, monkeypatch):
    """An image whose bilateral grid exceeds max_vertices (here lowered to what the two smaller
    photos need) is one named failure; the other photos of its batch are still refined."""
    import functools

    from namedmask.stages import refine as refine_stage

    root, pairs = folders
    img, target = pairs["a"]  # 40x52, the largest i.i.d.-noise photo: the most vertices
    cap = max(_vertices(pairs[s][0]) for s in ("sub/b", "c"))
    assert _vertices(img) > cap
    monkeypatch.setattr(refine_stage, "bilateral_solve_batch",
                        functools.partial(refine_stage.bilateral_solve_batch, max_vertices=cap))
    with pytest.raises(RefineError) as err:
        refine_folder(root / "images", root / "masks", root / "out", progress=False)
    assert "1 bad or missing" in str(err.value) and "a.png" in str(err.value) and "max_vertices" in str(err.value)
    assert (root / "out" / "c.png").exists() and (root / "out" / "sub" / "b.png").exists()
    assert not (root / "out" / "a.png").exists()


def _vertices(image):
    """The number of occupied bilateral-grid vertices of `image` under the namedmask preset."""
    from namedmask.ops.bilateral import PRESETS
    from namedmask.ops.reference import bilateral_vertex_coordinates

    p = PRESETS["namedmask"]
    return len(torch.unique(bilateral_vertex_coordinates(image, p.sigma_spatial, p.sigma_luma, p.sigma_chroma), dim=0))
