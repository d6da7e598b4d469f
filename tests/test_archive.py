"""Stage (A) build-archive with the tiny CLIP (random weights) on a subset of the real pool:
schema, exact top-K vs brute force, resumption after kill -9 (byte-identical), 2-process gloo
run == 1-process run, bad images skipped and listed, contact sheets, synonyms."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from namedmask.cli import cli
from namedmask.data.archive import SCHEMA_VERSION, load_archive
from namedmask.models.clip import load_clip
from namedmask.stages.archive import (ArchiveBuildError, ArchiveConfig, build_archive, merge_top_k, similarity)

POOL_IMAGES = 72        # real photos used (of 265); keeps the suite fast
K = 12
SHARD = 8               # small shards: many of them, so kill/resume and ranks are exercised
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model is fastest on one thread (and the CI box's two cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory, pool_dir) -> Path:
    """Symlinks to the first real pool photos (one in a subfolder) + one undecodable file."""
    root = tmp_path_factory.mktemp("pool")
    photos = sorted(p for p in pool_dir.iterdir() if p.suffix == ".jpg")[:POOL_IMAGES]
    (root / "sub").mkdir()
    for i, p in enumerate(photos):
        (root / ("sub" if i == 0 else "") / p.name).symlink_to(p)
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


def _config(pool, out, **kw) -> ArchiveConfig:
    kw = {"model": "nm-tiny", "k": K, "batch_size": 4, "shard_size": SHARD, "templates": "namedmask", **kw}
    return ArchiveConfig(str(pool), "voc", str(out), **kw)


def _cli(*args) -> list:
    return [sys.executable, "-m", "namedmask", "-q", "build-archive", *map(str, args)]


def _cli_args(pool, out) -> list:
    return ["--pool", pool, "--categories", "voc", "--out", out, "--model", "nm-tiny", "--k", K, "--batch-size", 4,
            "--shard-size", SHARD]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_pool) -> Path:
    """One uninterrupted single-process run (with contact sheets)."""
    out = tmp_path_factory.mktemp("reference")
    build_archive(_config(small_pool, out, report=True), progress=False)
    return out


def test_archive_schema_and_policy(reference, small_pool):
    raw = json.loads((reference / "archive.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["duplicate_policy"] == "keep-all"
    archive = load_archive(reference)
    assert archive.pool_root == small_pool.resolve()
    assert archive.class_names == ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                                   "sheep", "sofa", "train", "tvmonitor"]
    all_paths = set()
    for name, entries in archive.archives.items():
        assert len(entries) == K
        keys = [(-e["score"], e["path"]) for e in entries]
        assert keys == sorted(keys), f"{name}: not best first with ties by path"
        assert len({e["path"] for e in entries}) == K
        assert all((small_pool / e["path"]).is_file() for e in entries)
        all_paths |= {e["path"] for e in entries}
    assert any(p.startswith("sub/") for p in json.loads((reference / "embeddings/index.json").read_text())["paths"])
    # keep-all + best category: every archived image has one, the category where it scores highest
    assert set(archive.best_category) == all_paths == set(archive.images())
    for path, best in archive.best_category.items():
        scores = {n: e["score"] for n, es in archive.archives.items() for e in es if e["path"] == path}
        assert scores[best] == max(scores.values())
        assert archive.label_of(path) == archive.categories[best]
    meta = archive.meta
    assert meta["model"]["name"] == "nm-tiny" and meta["model"]["pretrained"] == "random"
    assert meta["templates"]["count"] == 85 and len(meta["templates"]["templates"]) == 85
    assert meta["k"] == K and meta["num_images"] == POOL_IMAGES + 1
    assert meta["config"]["model"] == "nm-tiny" and "out" not in meta["config"]


def test_bad_images_are_skipped_and_listed(reference):
    archive = load_archive(reference)
    assert [s["path"] for s in archive.meta["skipped"]] == ["broken.jpg"]
    assert "broken.jpg" in archive.meta["skipped"][0]["reason"]
    assert "broken.jpg" not in archive.images()


def test_top_k_equals_brute_force_on_saved_embeddings(reference):
    embed_dir = reference / "embeddings"
    paths = json.loads((embed_dir / "index.json").read_text())["paths"]
    shards = [load_file(str(p)) for p in sorted(embed_dir.glob("shard-*.safetensors"))]
    assert len(shards) == -(-len(paths) // SHARD)
    emb = torch.cat([s["embeddings"] for s in shards])
    idx = torch.cat([s["indices"] for s in shards])
    assert emb.dtype == torch.float16 and torch.allclose(emb.float().norm(dim=1), torch.ones(len(emb)), atol=2e-3)
    text = load_file(str(reference / "text_embeddings.safetensors"))["embeddings"]
    scores = similarity(emb, text)
    archive = load_archive(reference)
    for c, name in enumerate(archive.categories):
        brute = sorted(range(len(idx)), key=lambda r: (-scores[r, c].item(), paths[idx[r]]))[:K]
        assert [(paths[idx[r]], scores[r, c].item()) for r in brute] == \
            [(e["path"], e["score"]) for e in archive.archives[name]]


def test_merge_top_k_breaks_ties_by_index():
    g = torch.Generator().manual_seed(0)
    all_scores = torch.randint(0, 5, (40, 3), generator=g).double()  # many ties
    order = torch.randperm(40, generator=g)
    scores, index = torch.empty(0, 3, dtype=torch.float64), torch.empty(0, 3, dtype=torch.int64)
    for chunk in order.split(7):  # shards arrive in any index order
        scores, index = merge_top_k(scores, index, all_scores[chunk], chunk, 6)
    for c in range(3):
        want = sorted(range(40), key=lambda i: (-all_scores[i, c].item(), i))[:6]
        assert index[:, c].tolist() == want
        assert scores[:, c].tolist() == all_scores[want, c].tolist()


def test_contact_sheets(reference):
    sheets = sorted((reference / "report").glob("*.png"))
    assert [s.name for s in sheets][:2] == ["001-aeroplane.png", "002-bicycle.png"] and len(sheets) == 20
    with Image.open(sheets[0]) as img:
        # K=12 images on 8 columns of 128 px, 2 px apart, under a 52 px title and legend
        assert img.size == (8 * 128 + 7 * 2, 52 + 2 * (128 + 2))


def test_resume_after_kill_is_byte_identical(reference, small_pool, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*_cli_args(small_pool, out)), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "embeddings").glob("shard-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(list((out / "embeddings").glob("shard-*")))
    total = -(-(POOL_IMAGES + 1) // SHARD)
    assert 1 <= done < total and not (out / "archive.json").exists(), "the kill did not land mid-run"
    (out / "embeddings" / f".shard-{total - 1:06d}.safetensors.x.tmp.safetensors").write_bytes(b"half a shard")
    build_archive(_config(small_pool, out), progress=False)  # the same arguments again
    assert (out / "archive.json").read_bytes() == (reference / "archive.json").read_bytes()
    assert not list((out / "embeddings").glob(".*tmp*"))


def test_two_gloo_processes_equal_one(reference, small_pool, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "namedmask", "-q", "build-archive", *map(str, _cli_args(small_pool, out))]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "archive.json").read_bytes() == (reference / "archive.json").read_bytes()


def test_rerun_with_other_settings_is_refused(reference, small_pool, tmp_path):
    out = tmp_path / "mixed"
    build_archive(_config(small_pool, out, k=3, templates="simple"), progress=False)
    with pytest.raises(ArchiveBuildError, match="shard_size"):
        build_archive(_config(small_pool, out, shard_size=SHARD + 1), progress=False)


def test_synonyms_average_all_names(small_pool, tmp_path):
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("aeroplane | airplane, plane\n")
    out = tmp_path / "syn"
    build_archive(_config(small_pool, out, templates="simple", synonyms=str(synonyms)), progress=False)
    text = load_file(str(out / "text_embeddings.safetensors"))["embeddings"]
    clip = load_clip("nm-tiny")
    mean = clip.encode_texts(["a photo of a aeroplane.", "a photo of a airplane.", "a photo of a plane."]).mean(0)
    torch.testing.assert_close(text[0], mean / mean.norm(), rtol=0, atol=1e-6)
    dog = clip.encode_texts(["a photo of a dog."])[0]
    torch.testing.assert_close(text[11], dog, rtol=0, atol=1e-6)
    assert load_archive(out).meta["synonyms"] == {"aeroplane": ["airplane", "plane"]}
    # VOC's display name "diningtable" is prompted as the official "dining table", and recorded
    table = clip.encode_texts(["a photo of a dining table."])[0]
    torch.testing.assert_close(text[10], table, rtol=0, atol=1e-6)
    words = load_archive(out).meta["prompt_words"]
    assert words["diningtable"] == ["dining table"] and words["tvmonitor"] == ["tv/monitor"]
    assert words["aeroplane"] == ["aeroplane", "airplane", "plane"] and words["dog"] == ["dog"]

    bad = tmp_path / "bad_synonyms.txt"
    bad.write_text("aeroplan | plane\n")
    with pytest.raises(ValueError, match="aeroplan"):
        build_archive(_config(small_pool, tmp_path / "bad", synonyms=str(bad)), progress=False)


def test_cli_errors_name_the_problem(small_pool, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["build-archive", "--pool", str(empty), "--categories", "voc",
                                   "--out", str(tmp_path / "o"), "--model", "nm-tiny"])
    assert res.exit_code == 1 and "no images" in res.output and res.exception is not None
    res = CliRunner().invoke(cli, ["build-archive", "--pool", str(small_pool), "--categories", "voc",
                                   "--out", str(tmp_path / "o"), "--model", "nm-tiny", "--pretrained", "laion"])
    assert res.exit_code == 1 and "not a tag of nm-tiny" in res.output


def test_list_file_pool_and_local_checkpoint_via_cli(small_pool, tmp_path):
    names = sorted(p.name for p in small_pool.glob("*.jpg") if p.name != "broken.jpg")[:6]
    listing = small_pool / "subset.txt"  # paths relative to the list file's folder; absolute ones inside it
    listing.write_text("# six photos\n" + "\n".join(names[:5]) + f"\n{small_pool / names[5]}\n")
    weights = tmp_path / "tiny.safetensors"
    clip = load_clip("nm-tiny")
    save_file({k: (v * 1.5 if v.is_floating_point() else v).contiguous() for k, v in clip.model.state_dict().items()},
              str(weights))
    out = tmp_path / "listed"
    res = CliRunner().invoke(cli, ["build-archive", "--pool", str(listing), "--categories", "voc", "--out", str(out),
                                   "--model", "nm-tiny", "--pretrained", str(weights), "--k", "4",
                                   "--templates", "simple"])
    assert res.exit_code == 0, res.output
    archive = load_archive(out)
    assert archive.pool_root == small_pool.resolve() and archive.meta["num_images"] == 6
    assert archive.meta["model"]["pretrained"] == str(weights.resolve())
    assert {e["path"] for es in archive.archives.values() for e in es} <= set(names)

    listing.write_text(f"{names[0]}\n{names[0]}\n")  # a path listed twice is embedded once (logged)
    build_archive(_config(listing, tmp_path / "dup", k=1), progress=False)
    assert load_archive(tmp_path / "dup").meta["num_images"] == 1
    listing.write_text(f"{tmp_path / 'elsewhere.jpg'}\n")
    with pytest.raises(ArchiveBuildError, match="not inside"):
        build_archive(_config(listing, tmp_path / "outside"), progress=False)


def test_stream_top_k_equals_one_pass_over_the_pool():
    """Shards streamed through the merge give the brute-force top-k of the whole pool (ties by index)."""
    from namedmask.data.archive import stream_top_k

    g = torch.Generator().manual_seed(4)
    emb = torch.nn.functional.normalize(torch.randn(1000, 32, generator=g), dim=1)
    emb[500] = emb[20]  # an exact tie: the lower index ranks first
    text = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=1)
    shards = [(emb[s:s + 96], torch.arange(s, min(s + 96, 1000))) for s in range(0, 1000, 96)]
    scores, index = stream_top_k(iter(shards), text, 40)
    full = similarity(emb, text)
    for c in range(5):
        want = sorted(range(1000), key=lambda i: (-float(full[i, c]), i))[:40]
        assert index[:, c].tolist() == want
        assert torch.equal(scores[:, c], full[want, c])
