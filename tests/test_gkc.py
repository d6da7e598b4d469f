"""Recipe gkc of the text head (models/gkc.py) against the official rules of yongliu20/GKC,
written here from its equations: the synonym filter (syn_CLIP_sim.py), the teacher's grey-filled
masked crop (the dataset mapper), both distillation terms (loss_text_kd), the per-image classes
(the mapper's thresRand rule), the per-instance, per-iteration draw; then end to end: the recipe
trains on the procedural world, resumes to the same bits, and reloads."""
import hashlib
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from namedmask.config import ConfigError, TextHeadConfig, TrainConfig, load_config
from namedmask.models import gkc
from namedmask.models.clip import load_clip
from namedmask.models.deeplab import load_segmenter
from namedmask.models.openvocab import TextObjective
from namedmask.training import apply_copy_paste, copy_paste_with_sources, state_digest, train
from synthetic import CLASSES, one_thread, tiny_train_overrides, write_archive

TOL = 1e-5


def _scene(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[12:42, 20:60] = 1          # box 30 x 40 (rows 12..41, columns 20..59)
    mask[12:20, 20:30] = 0          # not a rectangle: grey fill matters
    mask[50, 5] = 255               # ignore pixels are outside the object
    return image, mask


def _official_preprocess(clip, pil, square: bool):
    """The official transforms: CLIP's (Resize(n) + CenterCrop(n)) for the filter, the mapper's
    Resize((n, n)) for the teacher; both bicubic, ToTensor, CLIP's Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    n = clip.image_size
    resize = [Resize((n, n), interpolation=InterpolationMode.BICUBIC)] if square else \
        [Resize(n, interpolation=InterpolationMode.BICUBIC), CenterCrop(n)]
    return Compose([*resize, ToTensor(), Normalize(clip.mean, clip.std)])(pil)[None]


@pytest.mark.parametrize("model", ["nm-tiny", "nm-tiny-rn"])
def test_filter_and_teacher_match_the_official_rules(model):
    clip = load_clip(model, "random")
    with torch.no_grad():  # a trained CLIP's temperature (100): the filter then drops names
        clip.model.logit_scale.fill_(float(np.log(100.0)))
    image, mask = _scene()
    words = ["ball", "sphere", "orb", "box", "cube"]
    name_category = torch.tensor([0, 0, 0, 1, 1])
    f_emb, t_emb, has = gkc.instance_embeddings(clip, [image], [mask])
    probs = gkc.synonym_probabilities(f_emb, gkc.name_embeddings(clip, words), name_category, torch.tensor([0]),
                                      float(clip.model.logit_scale.exp().detach()))
    with torch.no_grad():
        # syn_CLIP_sim.py: the box crop (COCO's x, y, w, h box), CLIP's preprocess, "a photo of " + name,
        # logits_per_image = logit_scale x cosine, softmax over the category's names
        pil = Image.fromarray(image)
        x0, y0, bw, bh = 20, 12, 40, 30
        img = F.normalize(clip.model.encode_image(_official_preprocess(clip, pil.crop([x0, y0, x0 + bw, y0 + bh]),
                                                                       False)), dim=-1)
        txt = F.normalize(clip.model.encode_text(clip.tokenizer(["a photo of " + c for c in words[:3]])), dim=-1)
        official = (clip.model.logit_scale.exp() * img @ txt.T).softmax(-1)[0]
        # the mapper's kd_image: paste grey where ~mask, crop the box (here inclusive: the one
        # deliberate difference, the official PIL crop drops the last row and column), Resize((n, n))
        grey = pil.copy()
        grey.paste((128, 128, 128), mask=Image.fromarray(~(mask == 1)))
        teacher = F.normalize(clip.model.encode_image(_official_preprocess(clip, grey.crop([20, 12, 60, 42]), True)),
                              dim=-1)[0]
    assert bool(has[0])
    assert torch.allclose(probs[0, :3], official, atol=TOL) and torch.all(probs[0, 3:] == 0)
    assert (probs[0].sum() - 1).abs() < TOL
    assert torch.allclose(t_emb[0], teacher, atol=TOL)
    kept = gkc.keep_names(probs, name_category, torch.tensor([0]), 0.1)
    assert kept[0].tolist() == [bool(p > 0.1) for p in official.tolist()] + [False, False]
    assert 1 <= int(kept.sum()) < 3, official        # the filter keeps some names, not all


def test_keep_names_threshold_and_fallback():
    probs = torch.tensor([[0.05, 0.9, 0.05, 0, 0], [0.5, 0.3, 0.2, 0, 0],
                          [0, 0, 0, 0.5, 0.5]] + [[0.09] * 3 + [0, 0]])  # last: none passes 0.1
    cat_of_name, cat_of_item = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    kept = gkc.keep_names(probs, cat_of_name, cat_of_item, 0.1)
    assert kept.tolist() == [[False, True, False, False, False], [True, True, True, False, False],
                             [False, False, False, True, True], [True, False, False, False, False]]


def _official_loss_text_kd(v, c, t, counts, scale):
    """loss_text_kd as the official code computes it (additional_text_kd False): per image the
    (t_dis - v_dis)^2 of every ordered region pair, then the per-region squared L2, one mean."""
    plain = ((v - c) ** 2).sum(dim=1)
    terms, start = [], 0
    for n in counts:
        if n == 0:
            continue
        vb, cb, tb = v[start:start + n], c[start:start + n], t[start:start + n] * scale
        v_dis = torch.einsum("al,bl->ab", vb, cb).flatten()
        t_dis = torch.einsum("al,bl->ab", tb, tb).flatten()
        terms.append((t_dis - v_dis) ** 2)
        start += n
    terms.append(plain)
    return torch.cat(terms).mean()


def test_distillation_matches_loss_text_kd():
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 1, 2]
    r = sum(counts)
    v, c, t = (F.normalize(torch.randn(r, 16, generator=g), dim=1) for _ in range(3))
    image = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)])
    for scale in (1.0, 1.7):
        s = torch.tensor(scale, requires_grad=True)
        ours = gkc.distillation_loss(v, c, t, image, s)
        ref = _official_loss_text_kd(v, c, t, counts, torch.tensor(scale))
        assert abs(float(ours) - float(ref)) <= TOL and float(ours) > 0
        ours.backward()
        assert s.grad is not None and torch.isfinite(s.grad)
    # student = teacher = text in one image: both terms vanish
    same = torch.zeros(r, dtype=torch.long)
    assert float(gkc.distillation_loss(v, v, v, same, torch.tensor(1.0))) <= TOL


def test_region_embeddings_are_mask_pooled():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(2, 8, 4, 5, generator=g), dim=1)
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, :4, :6] = True
    masks[1, 3:, 5:] = True
    masks[2, 1, 1] = True                       # one pixel: a quarter of one cell
    region_image = torch.tensor([0, 0, 1])
    ours = gkc.region_embeddings(emb, masks, region_image)
    for r in range(3):
        w = torch.zeros(4, 5)
        for y, x in torch.nonzero(masks[r]).tolist():
            w[y // 2, x // 2] += 0.25            # each 2 x 2 block of pixels is one cell
        ref = F.normalize((emb[region_image[r]] * w).sum((1, 2)) / w.sum(), dim=0)
        assert torch.allclose(ours[r], ref, atol=TOL)


def test_image_classes_follow_the_mapper():
    base = ["a", "b", "c"]
    region_image = [0, 0, 0, 0, 1, 1, 2]
    region_category = [0, 0, 0, 1, 0, 0, 2]
    region_word = ["a2", "a3", "a2", "b", "a", "a2", "c3"]
    words, slot = gkc.image_classes(region_image, region_category, region_word, base)
    # image 0: the first cat-0 instance renames slot 0; another name is an extra class; the
    # same name again reuses it; image 1: the base name marks slot 0 taken, so "a2" is extra
    assert words == {0: ["a2", "b", "c", "a3"], 1: ["a", "b", "c", "a2"], 2: ["a", "b", "c3"]}
    assert slot == [0, 3, 0, 1, 0, 3, 2]


def test_draw_is_per_instance_and_per_iteration():
    kept = torch.tensor([[True, False, True, False], [True, True, True, False], [False, False, False, True]])
    seed = 7

    def expected(item, it):  # blake2b of repr((seed, iteration, item, 4)), 8 bytes little endian, >> 1
        h = int.from_bytes(hashlib.blake2b(repr((seed, it, item, 4)).encode(), digest_size=8).digest(), "little") >> 1
        names = torch.nonzero(kept[item]).flatten().tolist()
        return names[h % len(names)]

    draws = {it: gkc.draw_names(kept, [0, 1, 2, 0], it, seed).tolist() for it in range(200)}
    for it, d in draws.items():
        assert d == [expected(0, it), expected(1, it), expected(2, it), expected(0, it)]
        assert d[0] == d[3]               # the same instance (e.g. pasted elsewhere) has one name
    # a batch in another order (another rank, a resume) draws the same names per instance
    assert gkc.draw_names(kept, [2, 0], 5, seed).tolist() == [draws[5][2], draws[5][0]]
    zero = [d[0] for d in draws.values()]
    assert set(zero) == {0, 2} and 80 <= zero.count(0) <= 120      # uniform among the kept two
    one = [d[1] for d in draws.values()]
    assert set(one) == {0, 1, 2}
    assert any(d[0] != d[1] for d in draws.values())  # two instances of one category differ
    assert len(set(zero[:20])) == 2                   # and one instance changes over iterations


def test_copy_paste_with_sources_is_copy_paste():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(6, 24, 24, dtype=torch.uint8)
    for b in range(6):
        labels[b, 3 + b:12 + b, 4:10 + b] = 1 + b % 3
    labels[0, 20:, :] = 255
    images = torch.randint(0, 255, (6, 3, 24, 24), generator=g, dtype=torch.uint8)
    cfg = TrainConfig().copy_paste.__class__(p=1.0, max_objects=2)
    plain = apply_copy_paste(images, labels, cfg, torch.Generator().manual_seed(3))
    img, lab, src = copy_paste_with_sources(images, labels, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(img, plain[0]) and torch.equal(lab, plain[1]) and lab.dtype == torch.uint8
    fg = (lab != 0) & (lab != 255)
    assert torch.equal(src >= 0, fg)
    assert bool((src[fg] != torch.arange(6).view(6, 1, 1).expand_as(src)[fg]).any())   # something was pasted
    original_class = torch.tensor([1 + b % 3 for b in range(6)])
    assert torch.equal(lab[fg].long(), original_class[src[fg]])
    off = cfg.__class__(p=0.0)
    _, lab0, src0 = copy_paste_with_sources(images, labels, off, None)
    assert torch.equal(lab0, labels) and torch.equal(src0 >= 0, (labels != 0) & (labels != 255))


def test_config_and_synonym_defaults(caplog):
    with pytest.raises(ConfigError, match="recipe must be one of default, gkc"):
        TextHeadConfig(recipe="gck")
    with pytest.raises(ConfigError, match="recipe gkc"):
        TextHeadConfig(recipe="gkc", distill_weight=1.0)
    with pytest.raises(ConfigError, match="gkc_threshold"):
        TextHeadConfig(recipe="gkc", gkc_threshold=1.5)
    # an archive of the built-in voc set retrieved with single names: its synonym sets are used
    archive = SimpleNamespace(meta={"config": {"categories": "voc"},
                                    "prompt_words": {"aeroplane": ["aeroplane"], "diningtable": ["dining table"]}})
    words = TextObjective._words(TextHeadConfig(), archive, ["background", "aeroplane", "diningtable"])
    assert words == [("aeroplane", "airplane", "plane", "aircraft"), ("dining table", "table", "dinner table")]
    other = SimpleNamespace(meta={"config": {"categories": "my.txt"}, "prompt_words": {"x": ["x"]}})
    assert TextObjective._words(TextHeadConfig(), other, ["background", "x"]) == [("x",)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gkcworld")
    archive, masks, _ = write_archive(root, per_class=3, size=48)
    names = root / "names.txt"
    names.write_text("".join(f"{n} | {n}ish, {n}-like\n" for n in CLASSES))
    single = root / "single.txt"
    single.write_text("".join(f"{n}\n" for n in CLASSES))
    return {"archive": archive, "masks": masks, "names": names, "single": single}


def _cfg(world, out, *extra):
    return load_config(TrainConfig, overrides=tiny_train_overrides(4, 4, 32) + [
        "head=text", "text.clip_model=nm-tiny", "text.clip_pretrained=random", "text.templates=simple",
        "text.recipe=gkc", f"text.names={world['names']}", "copy_paste.p=1.0", "copy_paste.max_objects=2",
        "checkpoint_every=2", *extra], archive=str(world["archive"]), masks=str(world["masks"]), out=str(out))


class Killed(Exception):
    pass


def test_gkc_trains_resumes_and_reloads(world, tmp_path, caplog):
    with one_thread():
        train(_cfg(world, tmp_path / "a"), progress=False)

        def kill(i):
            if i == 3:
                raise Killed
        with pytest.raises(Killed):
            train(_cfg(world, tmp_path / "b"), on_iteration=kill, progress=False)
        train(_cfg(world, tmp_path / "b"), progress=False)
    a, b = load_segmenter(tmp_path / "a")[0], load_segmenter(tmp_path / "b")[0]
    assert state_digest(a) == state_digest(b)
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["recipe"] == "gkc" and meta["gkc_weight"] == 10.0 and meta["gkc_threshold"] == 0.1
    assert float(a.kd_scale) != 1.0                      # the learnt sigma was trained
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    from safetensors.torch import load_file
    cache = load_file(tmp_path / "a" / "gkc.safetensors")
    assert cache["kept"].shape == (9, 9) and cache["teacher"].shape == (9, 64)
    assert torch.equal(cache["kept"], load_file(tmp_path / "b" / "gkc.safetensors")["kept"])
    own = torch.tensor([[i // 3 == j // 3 for j in range(9)] for i in range(9)])
    assert not bool((cache["kept"].bool() & ~own).any()) and bool(cache["kept"].bool().any(1).all())
    # single names: said once, the run still trains
    with caplog.at_level(logging.WARNING), one_thread():
        train(_cfg(world, tmp_path / "c", f"text.names={world['single']}", "iterations=1"), progress=False)
    assert "every category has a single name" in caplog.text
