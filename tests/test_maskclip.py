"""Zero-shot dense CLIP (MaskCLIP): the dense features equal a hand computation from the last
block's weights (ViT) and the attention pool's projections (ResNet); the segmenter's labels,
background handling and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from namedmask.data.augment import eval_input
from namedmask.models.clip import load_clip
from namedmask.models.dino import build_vit
from namedmask.models.maskclip import (MaskClipError, MaskClipSegmenter, affinity_refine, dense_features, dino_keys,
                                       ensemble_text_embeddings, parse_text_classes)

TOL = 1e-5   # float32, same ops in a different order


def _clip_input(seed=0, size=64, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _last_block_input(visual, x):
    """The tokens [B, L, D] entering the last ViT block in open_clip's own forward."""
    seen = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        visual(x)
    hook.remove()
    return seen["x"]


def test_vit_dense_equals_hand_computation():
    clip = load_clip("nm-tiny")
    visual = clip.model.visual
    x = _clip_input()
    tokens = _last_block_input(visual, x)
    blk = visual.transformer.resblocks[-1]
    d = tokens.shape[-1]
    # by hand: value projection rows 2d..3d of in_proj, out_proj, residual, MLP, ln_post, proj
    w_v, b_v = blk.attn.in_proj_weight[2 * d:], blk.attn.in_proj_bias[2 * d:]
    ln1 = F.layer_norm(tokens, (d,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    v = tokens + (ln1 @ w_v.T + b_v) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    ln2 = F.layer_norm(v, (d,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    hidden = F.gelu(ln2 @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
    v = v + hidden @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    out = F.layer_norm(v[:, 1:], (d,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps) @ visual.proj
    expected = F.normalize(out, dim=-1).transpose(1, 2).reshape(2, -1, 4, 4)
    with torch.no_grad():
        got = dense_features(visual, x, "maskclip")
    assert got.shape == (2, clip.embed_dim, 4, 4)
    assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()


def test_vit_dense_other_grid_resizes_position_embeddings():
    clip = load_clip("nm-tiny")
    with torch.no_grad():
        got = dense_features(clip.model.visual, torch.randn(1, 3, 96, 128))
    assert got.shape == (1, 64, 6, 8) and torch.allclose(got.norm(dim=1), torch.ones(1, 6, 8), atol=1e-5)


def test_resnet_dense_equals_attnpool_value_and_output_projections():
    clip = load_clip("nm-tiny-rn", "random")
    visual = clip.model.visual
    x = _clip_input(1)
    seen = {}
    hook = visual.attnpool.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        visual(x)
        got = dense_features(visual, x)
    hook.remove()
    feats = seen["x"].permute(0, 2, 3, 1)          # [B, h, w, C] entering the attention pool
    p = visual.attnpool
    expected = (feats @ p.v_proj.weight.T + p.v_proj.bias) @ p.c_proj.weight.T + p.c_proj.bias
    expected = F.normalize(expected, dim=-1).permute(0, 3, 1, 2)
    assert got.shape == (2, 64, 2, 2) and torch.allclose(got, expected, atol=TOL)


def test_parse_text_classes():
    assert parse_text_classes("dog, cat|kitten , traffic light,") == [("dog",), ("cat", "kitten"), ("traffic light",)]
    for bad in ("", " , ", "dog, dog", "background, dog"):
        with pytest.raises(MaskClipError, match="--text"):
            parse_text_classes(bad)


def test_ensemble_is_mean_of_normalised_prompts():
    clip = load_clip("nm-tiny")
    templates = ("a photo of a {}.", "a {}.")
    got = ensemble_text_embeddings(clip, [("cat", "kitten"), ("dog",)], templates)
    cat = clip.encode_texts(["a photo of a cat.", "a cat.", "a photo of a kitten.", "a kitten."])
    assert torch.allclose(got[0], F.normalize(cat.mean(0), dim=0), atol=1e-6)
    assert torch.allclose(got[1], F.normalize(clip.encode_texts(["a photo of a dog.", "a dog."]).mean(0), dim=0),
                          atol=1e-6)


def test_segmenter_labels_and_background():
    clip = load_clip("nm-tiny")
    text = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    image = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = eval_input(image)
    seg = MaskClipSegmenter(clip, text[1:], background_embeddings=text[:1])
    scores = seg(x)
    assert scores.shape == (1, 3, 50, 70) and torch.allclose(scores.sum(1), torch.ones(1, 50, 70), atol=1e-5)
    # threshold 1: every pixel is background; threshold 0 and no background prompt: never background
    assert (MaskClipSegmenter(clip, text[1:], threshold=1.0)(x).argmax(1) == 0).all()
    assert (MaskClipSegmenter(clip, text[1:], threshold=0.0)(x).argmax(1) > 0).all()
    # the background prompt's share is label 0 and classes keep their order
    same = MaskClipSegmenter(clip, text[1:], background_embeddings=text[:1], threshold=0.0)(x)
    assert torch.equal(same[:, 1:].argmax(1), scores[:, 1:].argmax(1))
    refined = MaskClipSegmenter(clip, text[1:], background_embeddings=text[:1], refine="bilateral")(x)
    assert refined.shape == scores.shape


def test_segmenter_bad_options():
    clip = load_clip("nm-tiny")
    text = torch.randn(2, 64)
    with pytest.raises(MaskClipError, match="threshold"):
        MaskClipSegmenter(clip, text)
    with pytest.raises(MaskClipError, match=r"\[0, 1\]"):
        MaskClipSegmenter(clip, text, threshold=2.0)
    with pytest.raises(MaskClipError, match="refine"):
        MaskClipSegmenter(clip, text, threshold=0.5, refine="crf")
    with pytest.raises(MaskClipError, match="DINO"):
        MaskClipSegmenter(clip, text, threshold=0.5, refine="dino")


def test_affinity_refine_equals_hand_computation():
    # 2 x 2 key grid: patches 0, 1 share a direction, patch 2 is 0.5 from them, patch 3 is opposite
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.75 ** 0.5], [-1.0, 0.0]]).T.reshape(1, 2, 2, 2)
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.2], [0.1, 0.9, 0.4, 0.8]]).reshape(1, 2, 2, 2)
    # tau 0.2: W = [[1, 1, .5, 0], [1, 1, .5, 0], [.5, .5, 1, 0], [0, 0, 0, 1]], rows normalised
    w = torch.tensor([[1, 1, .5, 0], [1, 1, .5, 0], [.5, .5, 1, 0], [0, 0, 0, 1]])
    expected = (w / w.sum(1, keepdim=True)) @ scores.reshape(2, 4).T
    got = affinity_refine(scores, keys, tau=0.2)
    assert torch.allclose(got.reshape(2, 4).T, expected, atol=1e-6)
    # orthogonal keys: every patch is its own neighbourhood, nothing moves
    assert torch.allclose(affinity_refine(scores, torch.eye(4).reshape(1, 4, 2, 2)), scores, atol=1e-6)


def test_segmenter_dino_refine():
    clip = load_clip("nm-tiny")
    vit = build_vit("vit_small_patch8_224", img_size=32, embed_dim=32, depth=1, num_heads=2)
    text = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    x = eval_input(torch.randint(0, 256, (44, 60, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    plain = MaskClipSegmenter(clip, text[1:], background_embeddings=text[:1])(x)
    refined = MaskClipSegmenter(clip, text[1:], background_embeddings=text[:1], refine="dino", dino=vit)(x)
    keys = dino_keys(vit, x)
    assert keys.shape == (1, 32, 6, 8)   # 44 x 60 -> 48 x 64 at patch 8; keys: embed_dim channels
    assert refined.shape == plain.shape
    assert torch.allclose(refined, affinity_refine(plain, keys), atol=1e-6)


def test_value_recipe_drops_residual_and_mlp():
    clip = load_clip("nm-tiny")
    visual = clip.model.visual
    x = _clip_input(2)
    tokens = _last_block_input(visual, x)
    blk, d = visual.transformer.resblocks[-1], tokens.shape[-1]
    ln1 = F.layer_norm(tokens, (d,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    v = (ln1 @ blk.attn.in_proj_weight[2 * d:].T + blk.attn.in_proj_bias[2 * d:]) @ blk.attn.out_proj.weight.T \
        + blk.attn.out_proj.bias
    out = F.layer_norm(v[:, 1:], (d,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps) @ visual.proj
    expected = F.normalize(out, dim=-1).transpose(1, 2).reshape(2, -1, 4, 4)
    with torch.no_grad():
        got = dense_features(visual, x, "value")
        default = dense_features(visual, x)
    assert torch.allclose(got, expected, atol=TOL)
    assert torch.equal(default, got)   # value is the default recipe; maskclip is asked for by name
    with pytest.raises(MaskClipError, match="recipe"):
        dense_features(visual, x, "attention")
