"""Zero-guidance discovery: the CLIP forward with a class-row attention bias (against open_clip
and a hand computation), over-segmentation, naming, merging, and degenerate images."""
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from namedmask.data.vocabulary import VocabularyError, builtin_entries, builtin_names, imagenet21k_nouns, load_vocabulary
from namedmask.models.clip import load_clip
from namedmask.models import zero_guidance as zg


@pytest.fixture(scope="module")
def clip():
    return load_clip("nm-tiny")


def _image(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)


def test_plain_forward_equals_open_clip(clip):
    x = zg.normalise(clip, _image()[None])
    with torch.no_grad():
        ours = zg.clip_forward(clip, x)
        ref = clip.model.encode_image(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_bias_is_the_hand_built_mask():
    frac = torch.tensor([[1.0, 0.6, 0.2, 0.0], [0.0, 0.0, 0.3, 0.1]])
    bias = zg.attention_bias(frac, 0.25)
    o = math.log(0.25)
    # row 1: no patch reaches 0.5, its best-covered patch (index 2) counts as inside
    expected = torch.tensor([[0, 0, 0, o, o], [0, o, o, 0, o]], dtype=torch.float32)
    torch.testing.assert_close(bias, expected)
    assert torch.isinf(zg.attention_bias(frac, 0.0)[0, 3:]).all()
    with pytest.raises(ValueError, match="context share"):
        zg.attention_bias(frac, 1.5)


def test_attention_mask_reaches_the_blocks_as_built(clip):
    """The additive mask each biased block receives: zeros except the class row, per head."""
    x = zg.normalise(clip, _image()[None]).expand(2, -1, -1, -1)
    n = clip.model.visual.grid_size[0] * clip.model.visual.grid_size[1]
    bias = torch.zeros(2, 1 + n)
    bias[0, 2:] = float("-inf")
    bias[1, 1] = -3.0
    seen = []
    blocks = clip.model.visual.transformer.resblocks
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attn_mask")), with_kwargs=True)
             for b in blocks]
    try:
        with torch.no_grad():
            zg.clip_forward(clip, x, cls_bias=bias, bias_layers=1)
    finally:
        for h in hooks:
            h.remove()
    heads = blocks[-1].attn.num_heads
    hand = torch.zeros(2 * heads, 1 + n, 1 + n)
    for b in range(2):
        for hd in range(heads):
            hand[b * heads + hd, 0] = bias[b]
    assert seen[0] is None and len(seen) == len(blocks)
    torch.testing.assert_close(seen[-1], hand)


def test_masked_cls_output_of_one_block_by_hand(clip):
    """One biased block against a hand computation of its class token (pre-LN attention + MLP)."""
    blk = clip.model.visual.transformer.resblocks[-1]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 5, blk.ln_1.normalized_shape[0], generator=g)
    bias = torch.tensor([0.0, 0.0, float("-inf"), math.log(0.5), 0.0])
    mask = torch.zeros(blk.attn.num_heads, 5, 5)
    mask[:, 0] = bias
    with torch.no_grad():
        out = blk(h, attn_mask=mask)[0, 0]
        a = blk.attn
        d, nh = a.embed_dim, a.num_heads
        y = blk.ln_1(h[0])
        q, k, v = (y @ a.in_proj_weight.T + a.in_proj_bias).split(d, dim=-1)
        hd = d // nh
        heads = []
        for i in range(nh):
            s = q[0, i * hd:(i + 1) * hd] @ k[:, i * hd:(i + 1) * hd].T / math.sqrt(hd) + bias
            heads.append(torch.softmax(s, -1) @ v[:, i * hd:(i + 1) * hd])
        att = a.out_proj(torch.cat(heads))
        x = h[0, 0] + att
        hand = x + blk.mlp(blk.ln_2(x))
    torch.testing.assert_close(out, hand, rtol=1e-5, atol=1e-5)


def test_full_context_equals_global_embedding(clip):
    img = _image()
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :32] = True
    masks[1, 32:] = True
    full = zg.segment_embeddings(clip, img, masks, mode="attention", context=1.0, mask_layers=2)
    whole = zg.segment_embeddings(clip, img, masks, mode="whole")
    torch.testing.assert_close(full, whole, rtol=1e-5, atol=1e-5)
    local = zg.segment_embeddings(clip, img, masks, mode="attention", context=0.0, mask_layers=2)
    assert not torch.allclose(local[0], local[1], atol=1e-4)
    crop = zg.segment_embeddings(clip, img, masks, mode="crop")
    assert crop.shape == (2, clip.embed_dim)
    torch.testing.assert_close(crop.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="mask_layers"):
        zg.segment_embeddings(clip, img, masks, mode="attention", mask_layers=9)


def test_kmeans_separates_clusters_and_never_duplicates():
    x = torch.cat([torch.tensor([[1.0, 0, 0]]).expand(10, -1), torch.tensor([[0, 1.0, 0]]).expand(6, -1)])
    labels = zg.kmeans(x, 5)
    assert labels.max() == 1 and len(set(labels[:10].tolist())) == 1 and labels[0] != labels[10]
    assert zg.kmeans(torch.ones(20, 4), 8).unique().tolist() == [0]


@pytest.mark.parametrize("refine", [True, False])
def test_oversegment_two_regions(refine):
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, :, 32:] = 200
    feats = torch.zeros(16, 8)
    grid = torch.arange(16).view(4, 4)
    feats[(grid % 4 < 2).flatten(), 0] = 1
    feats[(grid % 4 >= 2).flatten(), 1] = 1
    seg = zg.oversegment(feats, (4, 4), img, k=4, refine=refine)
    assert seg.labels.shape == (64, 64) and seg.labels.unique().tolist() == [0, 1]
    assert (seg.labels[:, :32] == seg.labels[0, 0]).all() and (seg.labels[:, 32:] != seg.labels[0, 0]).all()


def test_one_colour_image_gives_one_segment():
    img = torch.full((3, 48, 40), 77, dtype=torch.uint8)
    seg = zg.oversegment(torch.ones(12, 8), (4, 3), img, k=8)
    assert seg.labels.unique().tolist() == [0]


def test_naming_and_merging():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]), dim=-1)
    naming = zg.name_segments(emb, text, top=2)
    assert naming.index[:, 0].tolist() == [0, 0, 1]
    labels = torch.tensor([[0, 1, 2], [0, 1, 2]])
    names = ["a", "a", "b"]
    assert zg.merge_groups(labels, names, emb, threshold=2.0).tolist() == [[0, 0, 1], [0, 0, 1]]
    # not adjacent: same name does not merge
    assert zg.merge_groups(torch.tensor([[0, 2, 1]]), names, emb, threshold=2.0).tolist() == [[0, 2, 1]]
    # no name never merges by name
    assert zg.merge_groups(labels, [None, None, "b"], emb, threshold=2.0).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert zg.adjacent_pairs(labels) == {(0, 1), (1, 2)}


def test_vocabulary(tmp_path):
    names = builtin_names()
    assert len(names) > 1100 and len({n.lower() for n in names}) == len(names)
    assert {"tench", "person", "sky", "potted plant"} <= set(names)
    v = load_vocabulary("builtin")
    assert v.names == names and v.words == builtin_entries() and all(w[0] == n for n, w in zip(v.names, v.words))
    f = tmp_path / "v.txt"
    f.write_text("# mine\ncat | kitty, feline\n\ndog\n")
    v = load_vocabulary(str(f))
    assert v.names == ("cat", "dog") and v.words == (("cat", "kitty", "feline"), ("dog",))
    f.write_text("cat\nCat\n")
    with pytest.raises(VocabularyError, match="twice"):
        load_vocabulary(str(f))
    with pytest.raises(VocabularyError, match="not 'builtin'"):
        load_vocabulary(str(tmp_path / "none.txt"))


def test_builtin_vocabulary_imagenet21k_nouns():
    """The common nouns of ImageNet-21k (timm's WordNet files): a few thousand, in the
    documented format, and the filter holds on every entry."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer().encoder
    nouns = imagenet21k_nouns()
    assert 4000 <= len(nouns) <= 8000
    for entry in nouns:
        assert len(set(entry)) == len(entry)
        for w in entry:
            assert re.fullmatch(r"[a-z]+( [a-z]+)?", w), entry
            assert all(p + "</w>" in bpe for p in w.split()), entry
    names = [e[0] for e in nouns]
    assert len(set(names)) == len(names)
    # first lemma names the entry, other kept lemmas are synonyms (n00015388 "animal, animate being, ...")
    assert ("swimming", "swim") in nouns and nouns[names.index("animal")][:3] == ("animal", "animate being", "beast")
    # filtered out (all in ImageNet-12k): rare words (several BPE tokens), a hyphen, three words
    assert not {"benthos", "piaffe", "check-in", "track and field"} & set(names)
    entries = builtin_entries()
    assert 5000 <= len(entries) <= 9000
    taken = {e[0].lower() for e in entries}
    assert len(taken) == len(entries)
    # a synonym is never another entry's name; the older lists come first, unchanged
    assert all(w.lower() not in taken for e in entries for w in e[1:])
    assert entries[0] == ("tench",) and {"soil", "animal", "swimming"} <= taken


def test_tiny_models_discover_on_one_thread_with_the_same_labels(tmp_path):
    """Automatic threads on a CPU: an image whose forward passes are tiny (the toy-size DINO and
    CLIP) runs on one thread (two were 1.5-2.3x slower, docs/benchmarks.md), with the label
    maps of a one-thread run; large models, or unknown costs (a caption LM), keep the threads."""
    from namedmask.config import DiscoverConfig
    from namedmask.models.inference import TINY_FORWARD_FLOPS, vit_forward_flops
    from namedmask.stages.discover import _image_threads, discover_image, load_models

    vocab = tmp_path / "v.txt"
    vocab.write_text("disc\nsquare\nsky\n")
    cfg = DiscoverConfig(model="nm-tiny", dino="vit_tiny_patch16_224", random_weights=True, size=32, k=3,
                         templates="simple", device="cpu", vocabulary=str(vocab))
    models = load_models(cfg)
    assert vit_forward_flops(models.vit, 32) == 2.0 * sum(p.numel() for p in models.vit.parameters()) * (2 * 2 + 1)
    assert vit_forward_flops(models.vit, 34, stride=6) == vit_forward_flops(models.vit, 32) * (4 ** 2 + 1) / 5  # 4x4 patches
    seen = []
    models.vit.blocks[-1].attn.qkv.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    image = _image(3, 48).permute(1, 2, 0).contiguous()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = discover_image(models, image, cfg)
        torch.set_num_threads(2)
        two, _, _ = discover_image(models, image, cfg)
        assert seen == [1, 1] and torch.get_num_threads() == 2   # restored after the image
        assert torch.equal(one, two)
        with _image_threads(models, dataclasses.replace(cfg, namer="caption", captioner="gpt2")):
            assert torch.get_num_threads() == 2                    # a language model's cost is not counted
        big = dataclasses.replace(cfg, size=int(32 * (TINY_FORWARD_FLOPS / vit_forward_flops(models.vit, 32)) ** 0.5) + 64)
        with _image_threads(models, big):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
