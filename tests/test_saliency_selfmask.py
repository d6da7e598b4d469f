"""SelfMask: architecture and parameter names of the official model, output shapes, the
max-objectness selection rule, checkpoint round-trips (ours and the official layout)."""
import pytest
import torch
import torch.nn.functional as F

from namedmask.models.dino import DinoWeightsError, build_vit
from namedmask.models.saliency import SelfMask, SelfMaskPredictor, load_selfmask, save_selfmask
from namedmask.models.saliency.selfmask import select_masks

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny_selfmask(seed=0, n_queries=5, n_layers=2) -> SelfMask:
    torch.manual_seed(seed)
    return SelfMask(build_vit("vit_small_patch8_224.dino", **TINY), n_queries, n_layers).eval()


def test_official_architecture_and_parameter_names():
    model = SelfMask(build_vit("vit_small_patch8_224.dino"))
    sd = model.state_dict()
    assert sd["query_embed"].shape == (20, 384)
    assert len(model.decoder.layers) == 6
    layer = "decoder.layers.5."
    assert sd[layer + "self_attn.in_proj_weight"].shape == (3 * 384, 384)
    assert sd[layer + "multihead_attn.out_proj.weight"].shape == (384, 384)
    assert sd[layer + "linear1.weight"].shape == (1536, 384) and sd[layer + "linear2.weight"].shape == (384, 1536)
    assert {layer + f"norm{i}.weight" for i in (1, 2, 3)} <= set(sd)
    assert sd["decoder.norm.weight"].shape == (384,)
    assert [sd[f"ffn.layers.{i}.weight"].shape for i in range(3)] == [(384, 384), (384, 384), (1, 384)]
    assert sd["encoder.patch_embed.proj.weight"].shape == (384, 3, 8, 8)
    assert sd["encoder.pos_embed"].shape == (1, 1 + 28 * 28, 384)
    assert model.decoder.layers[0].self_attn.num_heads == 6


def test_forward_shapes_and_ranges():
    model = tiny_selfmask()
    with torch.no_grad():
        masks, objectness = model(torch.randn(2, 3, 32, 48))
    assert masks.shape == (2, 5, 8, 12)  # patch 8 -> 4x6 tokens, upsampled x2: 1/4 of the input
    assert objectness.shape == (2, 5)
    assert ((masks > 0) & (masks < 1)).all()


def test_predictor_pads_and_crops_back():
    pred = SelfMaskPredictor(tiny_selfmask(), short_side=30)
    image = torch.randint(0, 256, (45, 70, 3), dtype=torch.uint8)
    prepared = pred.prepare(image)
    assert prepared.shape == (30, 46, 3)  # short side 30, long side truncated as torchvision
    x = (prepared.permute(2, 0, 1)[None].float() / 255 - 0.45) / 0.225
    out = pred.predict(x)
    assert out.shape == (1, 30, 46) and out.dtype == torch.bool
    # Same as running the padded input by hand and selecting.
    padded = F.pad(x, (0, 2, 0, 2))
    with torch.no_grad():
        masks, objectness = pred.model(padded)
    torch.testing.assert_close(out, select_masks(masks, objectness, (32, 48), (30, 46)))


def test_selection_takes_the_max_objectness_query():
    masks = torch.full((2, 3, 4, 6), 0.1)
    masks[:, 0] = 0.9                 # query 0: everything
    masks[:, 1, :, :3] = 0.9          # query 1: left half
    objectness = torch.tensor([[0.1, 2.0, -1.0], [5.0, 0.0, 0.0]])
    out = select_masks(masks, objectness, (16, 24), (13, 20))
    assert out.shape == (2, 13, 20)
    assert out[1].all()                                       # image 1: query 0
    assert out[0, :, :10].all() and not out[0, :, 14:].any()  # image 0: query 1, left half
    want = F.interpolate(masks[:1, 1:2], size=(16, 24), mode="bilinear", align_corners=False)[0, 0, :13, :20] > 0.5
    torch.testing.assert_close(out[0], want)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_selfmask(seed=1)
    save_selfmask(model, tmp_path / "sm.pt", encoder="vit_small_patch8_224.dino", encoder_kwargs=TINY)
    loaded = load_selfmask(tmp_path / "sm.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_checkpoint_layout_loads(tmp_path):
    torch.manual_seed(2)
    model = SelfMask(build_vit("vit_small_patch8_224.dino"))
    sd = {"module." + k: v for k, v in model.state_dict().items()}  # DDP-saved, as {"model": ...}
    torch.save({"model": sd}, tmp_path / "selfmask_nq20.pt")
    loaded = load_selfmask(tmp_path / "selfmask_nq20.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    model = tiny_selfmask()
    torch.save({"model": model.state_dict()}, tmp_path / "no_config.pt")  # tiny weights, official shape assumed
    with pytest.raises(DinoWeightsError, match="no_config.pt.*wrong shape"):
        load_selfmask(tmp_path / "no_config.pt")


def test_decoder_layer_is_detr_post_norm():
    """With zero query positions a DETR post-norm layer is torch's TransformerDecoderLayer
    (same parameter names, so the same weights load into both)."""
    from namedmask.models.saliency.selfmask import DecoderLayer

    torch.manual_seed(0)
    ours = DecoderLayer(16, 2, 32).eval()
    ref = torch.nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0).eval()
    ref.load_state_dict(ours.state_dict())
    tgt, memory = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(tgt, memory, torch.zeros_like(tgt)), ref(tgt, memory))
        pos = torch.randn(5, 2, 16)  # query positions enter queries and keys of self-attention only
        q = tgt + pos
        x = ref.norm1(tgt + ref.self_attn(q, q, tgt)[0])
        x = ref.norm2(x + ref.multihead_attn(x + pos, memory, memory)[0])
        x = ref.norm3(x + ref.linear2(torch.relu(ref.linear1(x))))
        torch.testing.assert_close(ours(tgt, memory, pos), x)


def test_token_cap_lowers_the_short_side_of_elongated_images_only(caplog):
    """Images up to 4:1 at short side 512 keep it (the ordinary resize, same pixels); a
    20000x512 panorama is brought to <= MAX_TOKENS padded patch tokens by the documented rule
    (short side lowered one patch at a time), and logged."""
    from namedmask.models.saliency.common import normalize, resize_short_side
    from namedmask.models.saliency.selfmask import MAX_TOKENS, selfmask_short_side

    assert MAX_TOKENS == 16384
    for h, w in ((375, 500), (500, 375), (512, 2048), (2048, 512), (4000, 6000)):
        assert selfmask_short_side(h, w, 512, 8) == 512
    assert selfmask_short_side(512, 20000, 512, 8) == 160  # 160 x 6250: 20 x 782 = 15640 tokens
    assert selfmask_short_side(600, 4000, 512, 8) == 392
    for h, w in ((512, 20000), (20000, 512), (600, 4000), (7, 3000)):
        s = selfmask_short_side(h, w, 512, 8)
        side = lambda t: -(-t // 8)  # noqa: E731
        lo, hi = min(h, w), max(h, w)
        assert side(s) * side(int(s * hi / lo)) <= MAX_TOKENS or s == 8
        assert s == 512 or side(s + 8) * side(int((s + 8) * hi / lo)) > MAX_TOKENS

    model = SelfMaskPredictor(tiny_selfmask(), short_side=64, max_tokens=200)
    ordinary = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.prepare(ordinary), resize_short_side(ordinary, 64))  # 8 x 11 = 88 tokens
    wide = torch.randint(0, 256, (20, 400, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("INFO", logger="namedmask.models.saliency.selfmask"):
        prepared = model.prepare(wide)
    assert prepared.shape[:2] == (24, 480) and "exceed 200 patch tokens" in caplog.text  # 3 x 60 tokens
    mask = model.predict(normalize([prepared]))
    assert mask.shape == (1, 24, 480) and mask.dtype == torch.bool
