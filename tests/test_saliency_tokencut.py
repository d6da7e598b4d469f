"""TokenCut: the normalised cut on synthetic feature maps (exact recovery, seed/flip rule,
seed component), the eigen-solver against scipy's generalised eigh, the key hook against a
manual qkv computation, and the whole path on real photos with a random tiny ViT."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from namedmask.data.decode import load_image
from namedmask.models.dino import build_vit, last_layer_keys, resample_pos_embed
from namedmask.models.saliency import TokenCut, bipartition, normalize, normalized_cut
from namedmask.models.saliency.tokencut import fiedler_vector

TINY = dict(embed_dim=48, depth=2, num_heads=2)  # a ViT that runs in milliseconds


def synthetic_features(object_mask: np.ndarray, dim: int = 32, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Object patches share one direction, background another (orthogonal), plus noise:
    within-group cosine ~1 > τ, across-group ~0 < τ."""
    g = torch.Generator().manual_seed(seed)
    obj_dir, bg_dir = torch.zeros(dim), torch.zeros(dim)
    obj_dir[0], bg_dir[1] = 1.0, 1.0
    m = torch.from_numpy(object_mask.reshape(-1))
    base = torch.where(m[:, None], obj_dir, bg_dir)
    return base + noise * torch.randn(base.shape, generator=g)


def rectangle(grid, top, left, h, w):
    m = np.zeros(grid, bool)
    m[top:top + h, left:left + w] = True
    return m


@pytest.mark.parametrize("solver", ["arpack", "dense"])
@pytest.mark.parametrize("where", [(2, 3, 4, 5), (0, 0, 3, 3), (5, 9, 5, 7)])
def test_normalized_cut_recovers_the_object_exactly(solver, where):
    grid = (10, 16)
    obj = rectangle(grid, *where)
    cut = normalized_cut(synthetic_features(obj), grid, tau=0.2, solver=solver)
    assert cut.mask.dtype == bool and cut.mask.shape == grid
    np.testing.assert_array_equal(cut.mask, obj)
    assert obj.reshape(-1)[cut.seed]  # the seed (argmax |v|) lies on the smaller side: the object


def test_flip_rule_puts_the_seed_side_in_front():
    grid = (8, 8)
    obj = rectangle(grid, 2, 2, 3, 3)
    # Object strongly negative, background mildly positive: v > mean(v) is the background,
    # but argmax |v| is on the object, so the partition must flip.
    v = np.where(obj.reshape(-1), -3.0, 1.0)
    assert not (v > v.mean())[np.argmax(np.abs(v))]
    cut = bipartition(v, grid)
    np.testing.assert_array_equal(cut.mask, obj)
    assert (cut.eigenvector[obj] > 0).all()  # sign flipped with the partition
    # Either sign of the eigenvector gives the same cut.
    flipped = bipartition(-v, grid)
    np.testing.assert_array_equal(flipped.mask, obj)
    assert flipped.seed == cut.seed


def test_corner_rule_keeps_a_frame_filling_object():
    """A frame-filling object with a thin background strip: TokenCut's rule (the default) takes
    the strip, where argmax |v| lies; the opt-in corner rule refuses a chosen side holding 3 or 4
    grid corners and keeps the object, for either sign of the eigenvector; on an ordinary centred
    object both rules agree."""
    grid = (8, 8)
    big = rectangle(grid, 2, 0, 6, 8)  # rows 2..7: the object; rows 0-1 (both top corners) background
    big[:, 7] = False                  # ...and the right column: 3 corners are background
    v = np.where(big.reshape(-1), 1.0, -3.0)
    np.testing.assert_array_equal(bipartition(v, grid).mask, ~big)  # TokenCut: the strip
    cut = bipartition(v, grid, corner_rule=True)
    np.testing.assert_array_equal(cut.mask, big)
    assert big.reshape(-1)[cut.seed] and (cut.eigenvector[big] > 0).all()
    np.testing.assert_array_equal(bipartition(-v, grid, corner_rule=True).mask, big)  # either sign
    inverse = np.where(big.reshape(-1), -1.0, 3.0)  # v > mean(v) is the strip: 3 corners -> flipped
    np.testing.assert_array_equal(bipartition(inverse, grid, corner_rule=True).mask, big)
    small = rectangle(grid, 2, 2, 3, 3)
    w = np.where(small.reshape(-1), -3.0, 1.0)
    np.testing.assert_array_equal(bipartition(w, grid, corner_rule=True).mask, bipartition(w, grid).mask)


def test_only_the_seed_component_is_kept():
    grid = (8, 12)
    small, large = rectangle(grid, 1, 1, 2, 2), rectangle(grid, 4, 6, 3, 4)
    # Both blobs are on the object side; the seed (largest |v|) is in the small one.
    v = np.zeros(grid)
    v[small], v[large] = 5.0, 2.0
    cut = bipartition(v.reshape(-1), grid)
    np.testing.assert_array_equal(cut.mask, small)
    # Diagonal neighbours are separate components (4-connectivity, as scipy.ndimage.label).
    diag = np.zeros(grid)
    diag[2, 2], diag[3, 3] = 5.0, 4.0
    np.testing.assert_array_equal(bipartition(diag.reshape(-1), grid).mask, diag == 5.0)


def test_normalized_cut_keeps_one_of_two_identical_objects():
    grid = (10, 14)
    a, b = rectangle(grid, 1, 1, 3, 3), rectangle(grid, 6, 9, 3, 4)
    cut = normalized_cut(synthetic_features(a | b), grid)
    seed_blob = a if a.reshape(-1)[cut.seed] else b
    assert (a | b).reshape(-1)[cut.seed]
    np.testing.assert_array_equal(cut.mask, seed_blob)


@pytest.mark.parametrize("solver", ["arpack", "dense"])
def test_fiedler_vector_matches_scipy_generalised_eigh(solver):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (150,), generator=g)
    feats = torch.randn(3, 24, generator=g)[labels] + 0.8 * torch.randn(150, 24, generator=g)
    f = F.normalize(feats.double(), dim=1)
    a = (f @ f.T > 0.2).double().numpy()
    a[a == 0] = 1e-5
    d = np.diag(a.sum(1))
    _, ref = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 1])  # the spec: (D − A) v = λ D v
    ref = ref[:, 0]
    got = fiedler_vector(feats, 0.2, 1e-5, solver)
    sign = np.sign(got @ d @ ref)
    np.testing.assert_allclose(got, sign * ref, atol=1e-8)


def test_normalized_cut_rejects_bad_shapes():
    with pytest.raises(ValueError, match="grid"):
        normalized_cut(torch.randn(10, 4), (3, 4))
    with pytest.raises(ValueError, match="too small"):
        normalized_cut(torch.randn(2, 4), (1, 2))
    with pytest.raises(ValueError, match="solver"):
        fiedler_vector(torch.randn(12, 4), solver="magic")


def test_key_hook_equals_manual_qkv_of_the_last_block():
    torch.manual_seed(0)
    vit = build_vit("vit_small_patch16_224.dino", **TINY)
    images = torch.randn(2, 3, 48, 64)
    keys, grid = last_layer_keys(vit, images)
    assert grid == (3, 4) and keys.shape == (2, 12, 48)

    with torch.no_grad():  # the same forward written out by hand
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(2, -1, -1), x], 1) + resample_pos_embed(vit.pos_embed, grid, rule="dino")
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        w, b = last.attn.qkv.weight, last.attn.qkv.bias
        c = vit.embed_dim
        manual_k = last.norm1(x) @ w[c:2 * c].T + b[c:2 * c]
        manual_q = last.norm1(x) @ w[:c].T + b[:c]
    torch.testing.assert_close(keys, manual_k[:, 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(keys, manual_q[:, 1:], atol=1e-3)  # keys, not queries


def test_resample_pos_embed_is_bicubic_on_the_grid_and_keeps_cls():
    pe = torch.randn(1, 1 + 16, 8)
    out = resample_pos_embed(pe, (2, 6))
    assert out.shape == (1, 13, 8)
    torch.testing.assert_close(out[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 12, 8)
    torch.testing.assert_close(out[:, 1:], want)
    assert resample_pos_embed(pe, (4, 4)) is pe


def test_tokencut_runs_on_real_photos(pool_dir):
    torch.manual_seed(0)
    model = TokenCut(build_vit("vit_small_patch16_224.dino", **TINY), short_side=64)
    photos = sorted(p for p in pool_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:3]
    assert photos
    for path in photos:
        image = load_image(path)
        prepared = model.prepare(image)
        h, w = prepared.shape[:2]
        assert prepared.dtype == torch.uint8 and prepared.shape[2] == 3
        assert h % 16 == 0 and w % 16 == 0 and min(h, w) == 64
        # aspect kept to within one patch
        assert abs(w / h - image.shape[1] / image.shape[0]) < 16 / min(h, w) + 1e-6
        mask = model.predict(normalize([prepared]))
        assert mask.shape == (1, h, w) and mask.dtype == torch.bool
        assert mask.any()  # the seed patch is always foreground
        # nearest upsampling: constant on each 16x16 patch
        patches = mask[0].reshape(h // 16, 16, w // 16, 16)
        assert (patches == patches[:, :1, :, :1]).all()


def _cut_before(features, grid, tau=0.2, eps=1e-5):
    """The cut as computed before the memory bound and the tie rule (float64 affinity, ARPACK k=2)."""
    from scipy.sparse.linalg import eigsh

    f = F.normalize(features.to(torch.float64), dim=1)
    a = torch.where(f @ f.T > tau, 1.0, eps).to(torch.float64)
    d = a.sum(1).rsqrt()
    m = (d[:, None] * a * d[None, :]).numpy()
    _, vecs = eigsh(m, k=2, which="LA", v0=np.linspace(1.0, 2.0, m.shape[0]), tol=1e-10)
    return bipartition(d.numpy() * vecs[:, 0], grid).mask


@pytest.mark.parametrize("seed", range(4))
def test_same_masks_as_before_on_ordinary_features(seed):
    grid = (24, 32)
    obj = rectangle(grid, 3 + seed, 5 + 2 * seed, 9, 11)
    feats = synthetic_features(obj, noise=0.6, seed=seed)  # noisy: a non-trivial cut
    for solver in ("arpack", "dense"):
        np.testing.assert_array_equal(normalized_cut(feats, grid, solver=solver).mask, _cut_before(feats, grid))


def test_degenerate_affinity_gives_the_same_mask_every_call():
    """Every cosine > τ: the second eigenvalue is (N-1)-fold; ARPACK alone returned a different
    vector per call. The tie rule solves such graphs densely: identical masks, every call."""
    grid = (20, 30)
    g = torch.Generator().manual_seed(3)
    feats = torch.ones(grid[0] * grid[1], 16) + 0.01 * torch.randn(grid[0] * grid[1], 16, generator=g)
    f = F.normalize(feats, dim=1)
    assert float((f @ f.T).min()) > 0.2
    masks = [normalized_cut(feats, grid, solver="arpack").mask for _ in range(6)]
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])
    np.testing.assert_array_equal(masks[0], normalized_cut(feats, grid, solver="dense").mask)


def test_token_cap_is_a_clear_error_not_an_allocation():
    feats = torch.randn(64, 8)
    with pytest.raises(ValueError, match="64 patch tokens exceed max_tokens=50"):
        fiedler_vector(feats, max_tokens=50)


def test_prepare_lowers_the_short_side_to_the_token_cap():
    from namedmask.models.saliency.common import resize_short_side
    from namedmask.models.saliency.tokencut import MAX_TOKENS, token_short_side

    model = TokenCut(build_vit("vit_small_patch16_224.dino", **TINY))
    wide = torch.zeros(600, 4000, 3, dtype=torch.uint8)
    out = model.prepare(wide)
    assert out.shape[:2] == (384, 2560) and (384 // 16) * (2560 // 16) <= MAX_TOKENS
    assert token_short_side(600, 4000, 512, 16) == 384
    # Ordinary photos keep the short side 512: same input, same masks as before.
    photo = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.prepare(photo), resize_short_side(photo, 512, multiple=16, resample="lanczos"))
    assert token_short_side(4000, 6000, 512, 16) == 512
