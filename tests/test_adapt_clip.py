"""Mask prompt tuning: tokens round-trip through their file, a few steps lower the loss on a
tiny CLIP, `namedmask adapt-clip` writes what `discover --mask-prompts` loads."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.models import zero_guidance as zg
from namedmask.models.clip import load_clip
from namedmask.models.mask_prompts import MaskPrompts, MaskPromptsError, load_mask_prompts
from namedmask.data.vocabulary import load_vocabulary
from namedmask.models.maskclip import ensemble_text_embeddings
from namedmask.stages.adapt_clip import (AdaptConfig, AdaptError, Regions, accuracy, category_text, load_regions,
                                         negative_text, train_prompts)


@pytest.fixture(scope="module")
def clip():
    return load_clip("nm-tiny")


def test_prompt_tokens_round_trip(tmp_path, clip):
    p = MaskPrompts(clip, depth=2, seed=3)
    p.save(tmp_path / "p.safetensors")
    q = load_mask_prompts(tmp_path / "p.safetensors", clip)
    assert q.depth == 2 and torch.equal(p.tokens.detach(), q.tokens.detach())
    with pytest.raises(MaskPromptsError, match="no such file"):
        load_mask_prompts(tmp_path / "none.safetensors", clip)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(MaskPromptsError, match="not a mask-prompt file"):
        load_mask_prompts(tmp_path / "bad.safetensors", clip)


def test_prompts_replace_only_blank_patches(clip):
    """Prompt tokens equal to the blank patches' own embeddings change nothing."""
    x = torch.zeros(1, 3, 64, 64)  # a fully blank crop: every patch embedding is conv1(0) = 0
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, :16, :16] = True
    p = MaskPrompts(clip, depth=1, tokens=torch.zeros(1, 16, 64))
    with torch.no_grad():
        torch.testing.assert_close(p.forward(clip, x, masks), zg.clip_forward(clip, x))
    blank = MaskPrompts.blank_patches(clip, masks)
    assert blank.sum() == 15 and not blank[0, 0]


def _regions(n=24):
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
    masks = torch.zeros(n, 64, 64, dtype=torch.bool)
    masks[:, 16:48, 16:48] = True
    labels = torch.arange(n) % 3
    return Regions(crops, masks, labels, ["cat", "dog", "car"])


def test_a_few_steps_reduce_the_loss(clip):
    regions = _regions()
    text = torch.nn.functional.normalize(torch.randn(3, clip.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    before = [p.detach().clone() for p in clip.model.parameters()]
    prompts, losses = train_prompts(clip, regions, text, torch.arange(24), AdaptConfig(steps=30, batch_size=24, lr=5e-2),
                                    progress=False)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(torch.equal(a, b) for a, b in zip(before, clip.model.parameters()))  # CLIP frozen


def _run_folder(tmp_path, clip):
    pool = tmp_path / "pool"
    (pool / "a").mkdir(parents=True)
    (tmp_path / "masks" / "masks" / "a").mkdir(parents=True)
    archives, entries = {"red": [], "blue": []}, {}
    for i in range(8):
        colour = [(220, 20, 20), (20, 20, 220)][i % 2]
        img = np.full((40, 48, 3), 120, np.uint8)
        img[8:32, 10:38] = colour
        Image.fromarray(img).save(pool / "a" / f"{i}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[8:32, 10:38] = 1
        Image.fromarray(mask).save(tmp_path / "masks" / "masks" / "a" / f"{i}.png")
        archives[["red", "blue"][i % 2]].append({"path": f"a/{i}.png", "score": 0.3})
        entries[f"a/{i}.png"] = {"mask": f"masks/a/{i}.png", "fg_fraction": 0.3, "flag": None}
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "archive.json").write_text(json.dumps({
        "schema_version": 1, "pool_root": str(pool), "categories": {"red": 1, "blue": 2}, "archives": archives,
        "prompt_words": {"red": ["red", "crimson"], "blue": ["blue"]}}))
    (tmp_path / "masks" / "manifest.json").write_text(json.dumps({"schema_version": 1, "masks": entries}))
    return tmp_path / "archive", tmp_path / "masks"


def test_adapt_clip_cli_then_discover_loads_the_tokens(tmp_path, clip):
    archive, masks = _run_folder(tmp_path, clip)
    out = tmp_path / "adapt"
    args = ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out", str(out), "--model", "nm-tiny",
            "--templates", "simple", "--steps", "5", "--batch-size", "4", "--depth", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["train"] + summary["val"] == 8 and summary["categories"] == ["red", "blue"]
    assert load_mask_prompts(out / "mask_prompts.safetensors", clip).depth == 2
    r = CliRunner().invoke(cli, args)  # finished: left as it is
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, args[:-2] + ["--depth", "1"])
    assert r.exit_code == 1 and "other settings" in r.output
    text = category_text(clip, archive, ["red", "blue"], ("a photo of a {}.",))
    assert text.shape == (2, clip.embed_dim)
    d = tmp_path / "disc"
    r = CliRunner().invoke(cli, ["discover", str(tmp_path / "pool" / "a" / "0.png"), "--out", str(d),
                                 "--model", "nm-tiny", "--dino", "vit_tiny_patch16_224", "--random-weights",
                                 "--size", "64", "--templates", "simple", "--embed", "crop",
                                 "--mask-prompts", str(out / "mask_prompts.safetensors"), "--vocabulary", "builtin"])
    assert r.exit_code == 0, r.output


def test_no_pairs_is_one_error_line(tmp_path, clip):
    archive, masks = _run_folder(tmp_path, clip)
    (masks / "manifest.json").write_text(json.dumps({"schema_version": 1, "masks": {}}))
    r = CliRunner().invoke(cli, ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out",
                                 str(tmp_path / "o"), "--model", "nm-tiny", "--templates", "simple"])
    assert r.exit_code == 1 and "fewer than 2 archive images" in r.output, r.output


def test_streamed_regions_train_exactly_as_in_memory(tmp_path, clip):
    """RegionFiles (crops made from the files a batch at a time) give the same crops, losses,
    tokens and accuracies as the same regions held in memory (the implementation before)."""
    archive, masks = _run_folder(tmp_path, clip)
    files = load_regions(archive, masks, clip.image_size, clip.mean)
    memory = files.in_memory()
    assert len(files.items) == 8 and files.labels.tolist() == [0, 1] * 4
    assert memory.crops.shape == (8, 3, clip.image_size, clip.image_size)
    crops, cms = files.batch(torch.tensor([3, 1]))
    assert torch.equal(crops, memory.crops[[3, 1]]) and torch.equal(cms, memory.masks[[3, 1]])
    text = category_text(clip, archive, files.names, ("a photo of a {}.",))
    cfg = AdaptConfig(steps=6, batch_size=4, lr=5e-2)
    a, loss_a = train_prompts(clip, files, text, torch.arange(6), cfg, progress=False)
    b, loss_b = train_prompts(clip, memory, text, torch.arange(6), cfg, progress=False)
    assert loss_a == loss_b and torch.equal(a.tokens.detach(), b.tokens.detach())
    val = torch.tensor([6, 7])
    assert accuracy(clip, files, val, text, a) == accuracy(clip, memory, val, text, b)


def test_finetune_changes_the_image_tower_and_saves_a_loadable_clip(tmp_path):
    clip = load_clip("nm-tiny")  # its own copy: fine-tuning changes the weights
    archive, masks = _run_folder(tmp_path, clip)
    visual = {k: v.clone() for k, v in clip.model.visual.state_dict().items()}
    textual = {k: v.clone() for k, v in clip.model.state_dict().items() if not k.startswith("visual.")}
    regions = load_regions(archive, masks, clip.image_size, clip.mean)
    text = category_text(clip, archive, regions.names, ("a photo of a {}.",))
    cfg = AdaptConfig(steps=3, batch_size=4, finetune=True, finetune_lr=1e-3)
    prompts, losses = train_prompts(clip, regions, text, torch.arange(8), cfg, progress=False)
    changed = [k for k, v in clip.model.visual.state_dict().items() if not torch.equal(v, visual[k])]
    assert len(changed) > 10 and "conv1.weight" in changed
    assert all(torch.equal(v, textual[k]) for k, v in clip.model.state_dict().items() if not k.startswith("visual."))
    assert not any(p.requires_grad for p in clip.model.parameters())  # frozen again afterwards
    # the CLI writes the fine-tuned tower next to the prompts; both load
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out", str(out),
                                 "--model", "nm-tiny", "--templates", "simple", "--steps", "3", "--batch-size", "4",
                                 "--finetune"])
    assert r.exit_code == 0, r.output
    tuned = load_clip("nm-tiny", str(out / "clip_finetuned.safetensors"))
    plain = load_clip("nm-tiny")
    sd_t, sd_p = tuned.model.state_dict(), plain.model.state_dict()
    assert sd_t.keys() == sd_p.keys()
    assert not torch.equal(sd_t["visual.conv1.weight"], sd_p["visual.conv1.weight"])
    assert torch.equal(sd_t["token_embedding.weight"], sd_p["token_embedding.weight"])
    assert load_mask_prompts(out / "mask_prompts.safetensors", tuned).depth == 1
    assert json.loads((out / "adapt.json").read_text())["settings"]["finetune"] is True


def test_negatives_are_the_vocabulary_entries_sharing_no_word_with_the_categories(tmp_path, clip):
    archive, _ = _run_folder(tmp_path, clip)
    vocab = tmp_path / "vocab.txt"
    # "Crimson" is a synonym the archive embedded "red" with; "maroon | BLUE" shares a word too.
    vocab.write_text("crimson\ngreen | lime\nmaroon | BLUE\nyellow\n")
    got = negative_text(clip, load_vocabulary(str(vocab)), archive, ["red", "blue"], ("a photo of a {}.",))
    want = ensemble_text_embeddings(clip, [("green", "lime"), ("yellow",)], ("a photo of a {}.",))
    torch.testing.assert_close(got, want)
    vocab.write_text("red\nCrimson | blue\n")
    with pytest.raises(AdaptError, match="every entry shares a word"):
        negative_text(clip, load_vocabulary(str(vocab)), archive, ["red", "blue"], ("a photo of a {}.",))


def test_negatives_are_extra_classes_of_the_loss(clip):
    """The first step's loss is the cross-entropy over the category rows followed by the
    negatives' rows, labels indexing the categories (checked by hand, lr 0)."""
    regions = _regions(12)
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(3, clip.embed_dim, generator=g), dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(5, clip.embed_dim, generator=g), dim=-1)
    cfg = AdaptConfig(steps=1, batch_size=6, lr=0.0, seed=4)
    prompts, losses = train_prompts(clip, regions, text, torch.arange(12), cfg, progress=False, negatives=negatives)
    b = torch.arange(12)[torch.randint(12, (6,), generator=torch.Generator().manual_seed(4))]
    crops, masks = regions.batch(b)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(prompts.forward(clip, zg.normalise(clip, crops), masks).float(), dim=-1)
        scale = float(clip.model.logit_scale.exp().clamp(max=100))
        want = torch.nn.functional.cross_entropy(scale * emb @ torch.cat([text, negatives]).T, regions.labels[b])
        closed = torch.nn.functional.cross_entropy(scale * emb @ text.T, regions.labels[b])
    assert losses[0] == pytest.approx(float(want), rel=1e-5)
    assert float(want) > float(closed)  # the negatives take probability from the right category


def test_adapt_clip_negatives_option_and_older_folders(tmp_path, clip):
    archive, masks = _run_folder(tmp_path, clip)
    (tmp_path / "vocab.txt").write_text("green\nyellow | gold\nred\n")
    out = tmp_path / "adapt"
    args = ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out", str(out), "--model", "nm-tiny",
            "--templates", "simple", "--steps", "3", "--batch-size", "4"]
    r = CliRunner().invoke(cli, args + ["--negatives", str(tmp_path / "missing.txt")])
    assert r.exit_code == 1 and f"--negatives {tmp_path / 'missing.txt'}: not 'builtin'" in r.output, r.output
    assert not out.exists()  # refused before anything is written
    (tmp_path / "twice.txt").write_text("green\nGreen\n")
    r = CliRunner().invoke(cli, args + ["--negatives", str(tmp_path / "twice.txt")])
    assert r.exit_code == 1 and "twice.txt:2: 'Green' is listed twice" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(cli, args + ["--negatives", str(tmp_path / "vocab.txt")])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["negatives"] == 2 and summary["settings"]["negatives"] == str((tmp_path / "vocab.txt").resolve())
    assert (out / "negatives_text.safetensors").is_file()  # the vocabulary's text, kept for a rerun
    r = CliRunner().invoke(cli, args + ["--negatives", "none"])  # the same folder, other negatives
    assert r.exit_code == 1 and "other settings" in r.output
    # A folder finished before the option existed (no "negatives" in its settings) was trained
    # without negatives: it is finished for --negatives none, refused for the default (builtin).
    plain = args[:6] + [str(tmp_path / "plain")] + args[7:]
    r = CliRunner().invoke(cli, plain + ["--negatives", "none"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "plain" / "adapt.json").read_text())
    assert summary["negatives"] == 0 and summary["settings"]["negatives"] is None
    del summary["settings"]["negatives"]
    (tmp_path / "plain" / "adapt.json").write_text(json.dumps(summary))
    r = CliRunner().invoke(cli, plain + ["--negatives", "none"])
    assert r.exit_code == 0 and "other settings" not in r.output, r.output
    r = CliRunner().invoke(cli, plain)
    assert r.exit_code == 1 and "negatives: None there, 'builtin' now" in r.output, r.output
    assert "pass --negatives none" in r.output
