"""OVSeg presets: the training loss, lr schedule and logit-scale clamp of the released mask
prompt tuning (facebookresearch/ov-seg open_clip_training: open_clip/loss.py ClipLoss,
training/scheduler.py cosine_lr, training/train.py train_one_epoch_w_mask) and the inference
ensemble (open_vocab_seg/ovseg_model.py semantic_inference), each computed by hand."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.config import AdaptConfig, ConfigError
from namedmask.models.clip import load_clip
from namedmask.models.mask_prompts import (OVSEG_INFERENCE, OVSEG_TRAINING, MaskPrompts, contrastive_loss, lr_factor,
                                           ovseg_ensemble, region_class_scores)
from namedmask.models import zero_guidance as zg
from namedmask.models.prompts import get_templates
from namedmask.stages import adapt_clip as ac

TOL = 1e-5


@pytest.fixture(scope="module")
def clip():
    return load_clip("nm-tiny")


def _hand_clip_loss(image, text, scale):
    """open_clip's ClipLoss (world size 1) written out row by row."""
    n = len(image)
    total = 0.0
    for i in range(n):
        li = [scale * float(image[i] @ text[j]) for j in range(n)]     # logits_per_image row i
        lt = [scale * float(text[i] @ image[j]) for j in range(n)]     # logits_per_text row i
        total += (math.log(sum(math.exp(v) for v in li)) - li[i]) / n
        total += (math.log(sum(math.exp(v) for v in lt)) - lt[i]) / n
    return total / 2


def test_contrastive_loss_is_open_clips_clip_loss():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text[3] = text[1]                     # the same noun twice in a batch: still a negative of the other
    for scale in (1.0, 14.3, 100.0):
        got = float(contrastive_loss(image, text, torch.tensor(scale)))
        assert abs(got - _hand_clip_loss(image.double(), text.double(), scale)) <= TOL * max(1.0, abs(got))


def test_lr_factor_is_open_clips_cosine_lr():
    base, warmup, steps = 0.05, 3, 10
    for step in range(steps):
        if step < warmup:
            hand = base * (step + 1) / warmup
        else:
            hand = 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) * base
        assert abs(base * lr_factor(step, steps, warmup, "cosine") - hand) <= 1e-12
    assert [lr_factor(s, 5, 2, "constant") for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 5) for s in range(5)] == [1.0] * 5


def _regions(clip, n=12):
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (n, 3, clip.image_size, clip.image_size), dtype=torch.uint8, generator=g)
    masks = torch.zeros(n, clip.image_size, clip.image_size, dtype=torch.bool)
    for i in range(n):
        masks[i, 4 * (i % 4):40 + 3 * (i % 3), 8:48] = True
    return ac.Regions(crops, masks, torch.arange(n) % 3, ["cat", "dog", "car"])


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that records each step's learning rates and its hyper-parameters."""
    seen = []

    def step(self, closure=None):
        _RecordingAdamW.seen.append([dict(lr=g["lr"], betas=g["betas"], eps=g["eps"], wd=g["weight_decay"])
                                     for g in self.param_groups])
        return super().step(closure)


def test_ovseg_training_step_by_hand(clip, monkeypatch):
    """The first step's loss is the hand ClipLoss of the first batch (regions with fresh prompts,
    their plain nouns, CLIP's logit scale); every step's lr follows warm-up + cosine; the learned
    logit scale never exceeds 100; CLIP stays frozen."""
    regions = _regions(clip)
    assert OVSEG_TRAINING["depth"] == 3
    # nm-tiny has 2 blocks: depth 2 here (the toy world's CLIP has 3)
    cfg = AdaptConfig(**{**OVSEG_TRAINING, "templates": "simple", "warmup": 3, "depth": 2}, steps=8, batch_size=6)
    assert (cfg.loss, cfg.lr, cfg.schedule, cfg.negatives) == ("contrastive", 0.05, "cosine", None)
    nouns = ac.noun_text(clip, regions.names)
    assert torch.allclose(nouns, F.normalize(clip.encode_texts(["cat", "dog", "car"]), dim=-1), atol=1e-6)
    train_idx = torch.arange(10)
    # the first batch and the fresh prompts, as train_prompts draws them
    g = torch.Generator().manual_seed(cfg.seed)
    b = train_idx[torch.randint(len(train_idx), (6,), generator=g)]
    torch.manual_seed(cfg.seed)
    fresh = MaskPrompts(clip, depth=2, seed=cfg.seed)
    with torch.no_grad():
        crops, masks = regions.batch(b)
        emb = F.normalize(fresh.forward(clip, zg.normalise(clip, crops), masks).float(), dim=-1)
    hand = _hand_clip_loss(emb.double(), nouns[regions.labels[b]].double(), float(clip.model.logit_scale.detach().exp()))
    before = [p.detach().clone() for p in clip.model.parameters()]
    _RecordingAdamW.seen = []
    monkeypatch.setattr(ac.torch.optim, "AdamW", _RecordingAdamW)
    prompts, losses = ac.train_prompts(clip, regions, nouns, train_idx, cfg, progress=False)
    assert abs(losses[0] - hand) <= TOL * max(1.0, hand), (losses[0], hand)
    assert len(_RecordingAdamW.seen) == 8
    for step, groups in enumerate(_RecordingAdamW.seen):
        expected = 0.05 * ((step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * (step - 3) / 5)))
        assert len(groups) == 2   # the prompts and the logit scale
        for grp in groups:
            assert abs(grp["lr"] - expected) <= 1e-12
            assert grp["betas"] == (0.9, 0.98) and grp["eps"] == 1e-6 and grp["wd"] == 0.0
    assert 0 < prompts.learned_logit_scale <= 100.0 + 1e-4
    assert prompts.depth == 2
    assert all(torch.equal(a, p) for a, p in zip(before, clip.model.parameters()))


def test_default_training_is_unchanged(clip, monkeypatch):
    """loss ce without warm-up: one param group at the configured lr every step, AdamW's defaults."""
    regions = _regions(clip)
    text = F.normalize(torch.randn(3, clip.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    _RecordingAdamW.seen = []
    monkeypatch.setattr(ac.torch.optim, "AdamW", _RecordingAdamW)
    prompts, losses = ac.train_prompts(clip, regions, text, torch.arange(10), AdaptConfig(steps=3, batch_size=4, lr=1e-2),
                                       progress=False)
    assert [[(g["lr"], g["betas"], g["eps"]) for g in s] for s in _RecordingAdamW.seen] == \
        [[(1e-2, (0.9, 0.999), 1e-8)]] * 3
    assert prompts.learned_logit_scale is None


def test_config_rejects_contrastive_with_negatives_or_one_region():
    with pytest.raises(ConfigError, match="negatives belong to loss ce"):
        AdaptConfig(loss="contrastive")
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        AdaptConfig(loss="contrastive", negatives="none", batch_size=1)
    for bad in (dict(loss="focal"), dict(schedule="step"), dict(warmup=-1)):
        with pytest.raises(ConfigError):
            AdaptConfig(**bad)


def test_vild_templates():
    t = get_templates("vild")
    assert len(t) == 14 and t[0] == "a photo of a {}." and t[-1] == "There is a large {} in the scene."
    assert OVSEG_INFERENCE == {"templates": "vild", "ensemble": 0.7}


# ------------------------------------------------------------------------------ inference

def test_ensemble_rule_by_hand():
    g = torch.Generator().manual_seed(3)
    seg = torch.rand(4, 5, generator=g) * 0.9 + 0.01
    emb = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    got = ovseg_ensemble(seg, emb, text, 0.7)
    for r in range(4):
        logits = [100 * float(emb[r] @ text[c]) for c in range(5)]
        z = sum(math.exp(v - max(logits)) for v in logits)
        for c in range(5):
            p_clip = math.exp(logits[c] - max(logits)) / z
            hand = float(seg[r, c]) ** 0.3 * p_clip ** 0.7
            assert abs(float(got[r, c]) - hand) <= TOL * max(1.0, hand)
    assert torch.equal(ovseg_ensemble(seg, emb, text, 0.0), seg)   # weight 0: the segmenter alone


def test_region_class_scores_by_hand():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(4, 6, 7, generator=g).softmax(0)           # background + 3 labels
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, :3] = True
    masks[1, 3:, 2:5] = True
    got = region_class_scores(probs, masks, torch.tensor([3, 1]))
    for r in range(2):
        pix = [(i, j) for i in range(6) for j in range(7) if masks[r, i, j]]
        for k, col in enumerate((3, 1)):
            hand = sum(float(probs[col, i, j]) for i, j in pix) / len(pix)
            assert abs(float(got[r, k]) - hand) <= 1e-6


def _run(tmp_path, head="closed"):
    """A tiny random segmenter run (classes background, disc, square, triangle)."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from synthetic import tiny_model_overrides
    from namedmask.config import ModelConfig, from_dict, parse_overrides
    from namedmask.models.deeplab import build_model, save_segmenter

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, parse_overrides([o.removeprefix("model.") for o in tiny_model_overrides()]))
    model = build_model(cfg, 4).eval()
    save_segmenter(tmp_path / "run", model, ["background", "disc", "square", "triangle"])
    return tmp_path / "run", model


def test_predict_ovseg_preset_labels_each_region_by_the_ensemble(tmp_path, clip):
    """`predict --proposals segmenter --preset ovseg`: the segmenter's regions, each labelled with
    the argmax of (mean segmenter probability)^0.3 x (CLIP softmax over the classes, ViLD text)^0.7."""
    from namedmask.data.augment import eval_input
    from namedmask.models.maskclip import ensemble_text_embeddings

    run, model = _run(tmp_path)
    img = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    img[10:30, 8:40] = (200, 40, 40)
    Image.fromarray(img).save(tmp_path / "a.png")
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--checkpoint", str(run), "--out",
                                 str(tmp_path / "o"), "--text", "square, disc", "--proposals", "segmenter",
                                 "--preset", "ovseg", "--model", "nm-tiny", "--pretrained", "random", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    got = np.array(Image.open(tmp_path / "o" / "labels" / "a.png"))
    image = torch.from_numpy(img)
    with torch.no_grad():
        probs = model(eval_input(image)).softmax(1)[0]
    label = probs.argmax(0)
    ids = [i for i in label.unique().tolist() if i]
    assert ids, "the random segmenter proposes no region"
    masks = label[None] == torch.tensor(ids).view(-1, 1, 1)
    tiny = load_clip("nm-tiny", "random")
    text = ensemble_text_embeddings(tiny, [("square",), ("disc",)], get_templates("vild"))
    emb = zg.segment_embeddings(tiny, image.permute(2, 0, 1), masks, mode="crop")
    expected = np.zeros(label.shape, np.uint8)
    for m, region in zip(masks, range(len(ids))):
        seg = torch.stack([probs[2][m].mean(), probs[1][m].mean()])     # --text order: square, disc
        p_clip = (100 * emb[region] @ text.T).softmax(0)
        expected[m.numpy()] = 1 + int((seg ** 0.3 * p_clip ** 0.7).argmax())
    assert np.array_equal(got, expected)
    assert (got[label.numpy() == 0] == 0).all()


@pytest.mark.parametrize("extra,message,code", [
    (["--text", "square, kite"], "has none for ['kite']", 1),
    (["--text", "square", "--background-threshold", "0.5"], "drop --background-threshold", 2),
])
def test_predict_ovseg_bad_options(tmp_path, extra, message, code):
    run, _ = _run(tmp_path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--checkpoint", str(run), "--out",
                                 str(tmp_path / "o"), "--proposals", "segmenter", "--preset", "ovseg",
                                 "--model", "nm-tiny", "--pretrained", "random", "--device", "cpu", *extra])
    assert r.exit_code == code and message in r.output, r.output


def test_adapt_clip_cli_preset_ovseg(tmp_path):
    """--preset ovseg sets the released values; options given win; the folder records them and an
    older folder (made before these settings existed) still counts as finished."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_adapt_clip import _run_folder

    archive, masks = _run_folder(tmp_path, None)
    out = tmp_path / "adapt"
    args = ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out", str(out), "--model", "nm-tiny",
            "--steps", "4", "--batch-size", "4", "--preset", "ovseg", "--set", "warmup=2", "--depth", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "adapt.json").read_text())
    s = summary["settings"]
    assert (s["depth"], s["loss"], s["lr"], s["warmup"], s["schedule"], s["beta2"], s["eps"], s["templates"],
            s["negatives"]) == (2, "contrastive", 0.05, 2, "cosine", 0.98, 1e-6, "vild", None)
    assert 0 < summary["learned_logit_scale"] <= 100.0 + 1e-4
    r = CliRunner().invoke(cli, args + ["--negatives", "builtin"])
    assert r.exit_code == 1 and "negatives belong to loss ce" in r.output, r.output
    # a folder written before loss/warmup/schedule/beta2/eps existed: same settings, finished
    old = tmp_path / "old"
    r = CliRunner().invoke(cli, ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out", str(old),
                                 "--model", "nm-tiny", "--steps", "2", "--batch-size", "4", "--templates", "simple",
                                 "--negatives", "none"])
    assert r.exit_code == 0, r.output
    data = json.loads((old / "adapt.json").read_text())
    for key in ("loss", "warmup", "schedule", "beta2", "eps"):
        del data["settings"][key]
    (old / "adapt.json").write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["adapt-clip", "--archive", str(archive), "--masks", str(masks), "--out", str(old),
                                 "--model", "nm-tiny", "--steps", "2", "--batch-size", "4", "--templates", "simple",
                                 "--negatives", "none"])
    assert r.exit_code == 0 and "other settings" not in r.output, r.output
