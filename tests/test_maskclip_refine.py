"""MaskCLIP's refinement and the `maskclip` preset: key smoothing and prompt denoising computed
by hand from the released head's equations (chongzhou96/MaskCLIP, mmseg/models/backbones/vit.py
return_qkv and mmseg/models/decode_heads/maskclip_head.py cls_seg + refine_output, mmseg's
bilinear resize to the image) on shared random tiny-CLIP weights, against the segmenter."""
import pytest
import torch
import torch.nn.functional as F

from namedmask.models.clip import load_clip
from namedmask.models.maskclip import (PRESETS, MaskClipError, MaskClipSegmenter, apply_preset, dense_features,
                                       to_clip_input)

TOL = 1e-5


@pytest.fixture(scope="module")
def clip():
    return load_clip("nm-tiny")   # random weights, seeded by the loader


def _text(clip, n, seed):
    return F.normalize(torch.randn(n, clip.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _official_head(clip, y, prompts, pd_thresh, ks_thresh, out_size):
    """The released MaskCLIP computation written out on CLIP-normalised images y [B, 3, H, W]:
    backbone last layer with return_qkv, head cls_seg, refine_output, resize to `out_size`."""
    visual = clip.model.visual
    seen = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        visual(y)
    hook.remove()
    x = seen["x"]                                              # [B, L, C] entering the last block
    blk = visual.transformer.resblocks[-1]
    B, L, C = x.shape
    # return_qkv: y = in_proj(norm1(x)); split into q, k, v; out_proj applied to each
    t = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    t = t @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
    t = t.view(B, L, 3, C).permute(2, 0, 1, 3).reshape(3 * B, L, C)
    t = t @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    q, k, v = t.tensor_split(3, dim=0)
    v = v + x
    h = F.layer_norm(v, (C,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    v = v + F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias) @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    v = F.layer_norm(v, (C,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)   # final norm
    gh, gw = y.shape[-2] // 16, y.shape[-1] // 16
    v = v[:, 1:].reshape(B, gh, gw, C).permute(0, 3, 1, 2)
    k = k[:, 1:]
    # head: feat = proj(v) (1x1 conv), cls_seg: normalise, conv with the text embeddings
    feat = torch.einsum("bchw,ce->behw", v, visual.proj)
    feat = feat / feat.norm(dim=1, keepdim=True)
    output = torch.einsum("behw,pe->bphw", feat, prompts)
    # refine_output
    max_cls_conf = None
    if pd_thresh > 0:
        N, P, H, W = output.shape
        _output = F.softmax(output * 100, dim=1)
        max_cls_conf = _output.view(N, P, -1).max(dim=-1)[0]
        selected_cls = (max_cls_conf < pd_thresh)[:, :, None, None].expand(N, P, H, W)
        output = output.clone()
        output[selected_cls] = -100
    if ks_thresh > 0:
        output = F.softmax(output * 100, dim=1)
        N, P, H, W = output.shape
        output = output.view(N, P, -1).transpose(-2, -1)
        k = F.normalize(k, p=2)                                # as released: default dim=1 (the positions)
        weight = k @ k.transpose(-2, -1)
        selected_pos = (output.max(dim=-1, keepdim=True)[0] < ks_thresh).expand(-1, -1, P)
        weighted_output = weight @ output
        output = output.clone()
        output[selected_pos] = weighted_output[selected_pos]
        output = output.transpose(-2, -1).reshape(N, P, H, W)
    return F.interpolate(output, size=out_size, mode="bilinear", align_corners=False), max_cls_conf


def _segmenter(clip, text, pd, ks, short_side=64):
    return MaskClipSegmenter(clip, text[1:], text[:1], short_side=short_side, recipe="maskclip",
                             key_smoothing=ks, prompt_denoising=pd).eval()


def _images(seed=0, n=2, size=(48, 48)):   # -> 64 x 64 CLIP input, its own 4 x 4 grid
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _close(got, expected):
    """max |difference|, relative to the magnitude where it exceeds 1 (smoothed scores are sums)."""
    return float(((got - expected).abs() / expected.abs().clamp_min(1)).max())


@pytest.mark.parametrize("pd,ks", [(None, 1.0), (None, "mid"), ("mid", None), ("mid", 1.0), (0.5, 1.0)])
def test_refinement_equals_the_released_head(clip, pd, ks):
    text = _text(clip, 5, 1)                          # prompt 0 = the background prompt, then 4 classes
    x = _images()
    y, _ = to_clip_input(x, clip.mean, clip.std, 64, 16)
    # thresholds "mid": between the values the rule compares, so that both branches are taken
    both_branches = pd == "mid"
    if pd == "mid":
        with torch.no_grad():
            probs = (100 * torch.einsum("bdhw,pd->bphw", dense_features(clip.model.visual, y, "maskclip"), text)
                     ).softmax(1).flatten(2).amax(2)
        pd = float(probs.flatten().sort().values[probs.numel() // 2])
    if ks == "mid":
        with torch.no_grad():
            probs = (100 * torch.einsum("bdhw,pd->bphw", dense_features(clip.model.visual, y, "maskclip"), text)
                     ).softmax(1).amax(1)
        ks = float(probs.flatten().sort().values[probs.numel() // 2])
    with torch.no_grad():
        expected, max_conf = _official_head(clip, y, text, pd or 0, ks or 0, x.shape[-2:])
    if both_branches:   # the case really drops some prompts and keeps others
        assert (max_conf < pd).any() and (max_conf >= pd).any()
    with torch.no_grad():
        got = _segmenter(clip, text, pd, ks)(x)
    official_argmax = expected.argmax(1)          # mmseg: softmax of the resized output, argmax
    if ks is None:   # the resized denoised cosines; the segmenter's scores: their softmax at CLIP's logit scale
        expected = (float(clip.model.logit_scale.detach().exp()) * expected).softmax(1)
    assert got.shape == expected.shape == (2, 5, 48, 48)
    assert _close(got, expected) <= TOL, _close(got, expected)
    assert torch.equal(got.argmax(1), official_argmax)


def test_resnet_keys_are_the_attention_pools_key_projection():
    clip = load_clip("nm-tiny-rn", "random")
    visual = clip.model.visual
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    seen = {}
    hook = visual.attnpool.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        visual(x)
        feats, keys = dense_features(visual, x, keys=True)
        plain = dense_features(visual, x)
    hook.remove()
    f = seen["x"].flatten(2).transpose(1, 2)                    # [B, N, C] entering the attention pool
    expected = f @ visual.attnpool.k_proj.weight.T + visual.attnpool.k_proj.bias
    assert torch.equal(feats, plain) and keys.shape == expected.shape == (2, 4, f.shape[-1])
    assert torch.allclose(keys, expected, atol=TOL)


def test_vit_keys_leave_the_features_unchanged(clip):
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for recipe in ("value", "maskclip"):
            feats, keys = dense_features(clip.model.visual, x, recipe, keys=True)
            assert torch.equal(feats, dense_features(clip.model.visual, x, recipe))
            assert keys.shape == (1, 20, 64)


def test_preset_fills_only_what_is_not_given():
    assert PRESETS["maskclip"] == {"recipe": "maskclip", "short_side": 512, "key_smoothing": 1.0,
                                   "prompt_denoising": 0.5}
    base = {"model": "m", "recipe": None, "short_side": None, "threshold": None}
    assert apply_preset(base, None) is base
    assert apply_preset(base, "maskclip") == {**base, **PRESETS["maskclip"]}
    got = apply_preset({**base, "recipe": "value", "short_side": 224}, "maskclip")
    assert (got["recipe"], got["short_side"], got["key_smoothing"]) == ("value", 224, 1.0)
    with pytest.raises(MaskClipError, match="--preset"):
        apply_preset(base, "ovseg")


def test_cli_preset_reaches_the_segmenter():
    from namedmask.commands import zero_shot_settings

    given = dict(model="nm-tiny", pretrained="random")  # the options given on the command line
    default = zero_shot_settings(given, preset=None, checkpoint=None, text="a, b")
    assert (default["recipe"], default["templates"], default["short_side"]) == ("value", "namedmask", None)
    assert default.get("key_smoothing") is None and default.get("prompt_denoising") is None  # off by default
    preset = zero_shot_settings(given, preset="maskclip", checkpoint=None, text="a, b")
    assert {k: preset[k] for k in PRESETS["maskclip"]} == PRESETS["maskclip"]
    assert zero_shot_settings({**given, "short_side": 96}, preset="maskclip", checkpoint=None,
                              text="a, b")["short_side"] == 96


def test_bad_refinement_options(clip):
    text = _text(clip, 3, 0)
    with pytest.raises(MaskClipError, match="not probabilities"):
        MaskClipSegmenter(clip, text[1:], text[:1], threshold=0.5, key_smoothing=1.0)
    for bad in (dict(key_smoothing=1.5), dict(prompt_denoising=-0.1)):
        with pytest.raises(MaskClipError, match="threshold must be in"):
            MaskClipSegmenter(clip, text[1:], text[:1], **bad)


def test_cli_preset_end_to_end_and_errors(tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from namedmask.cli import cli

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    tiny = ["--model", "nm-tiny", "--pretrained", "random", "--templates", "simple"]
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--text", "x, y",
                                 "--preset", "maskclip", "--short-side", "64", *tiny])
    assert r.exit_code == 0, r.output
    assert np.array(Image.open(tmp_path / "o" / "labels" / "a.png")).shape == (40, 56)
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "p"), "--text", "x, y",
                                 "--preset", "maskclip", "--background-threshold", "0.5", *tiny])
    assert r.exit_code == 1 and "not probabilities" in r.output, r.output
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "q"), "--text", "x, y",
                                 "--preset", "ovseg", *tiny])
    assert r.exit_code == 2 and "--proposals segmenter" in r.output, r.output
