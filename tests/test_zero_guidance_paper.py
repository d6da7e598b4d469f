"""The zero-guidance paper's rules (nessessence/ZeroGuidanceSeg), each computed by hand from the
official code's equations and compared with ours: soft-area attention masking of every query row
with global subtraction (clip_v3_nb_mask), the Ward tree's cut and the bottom-up image+text merge
(run_dino_clustering_tree.py, run_autotext_segment_merge.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from namedmask.models import zero_guidance as zg
from namedmask.models.clip import load_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip("nm-tiny")  # open_clip ViT: 2 blocks, width 64, 2 heads, patch 16 at 64 px


def _official_encode(clip, x, mb, masked_blocks, sd):
    """The official forward, written from clip_v3_nb_mask/modelautotunelayer_cslayer.py and
    multiattnwithmask_autotunelayer.py: sequence-first tokens, a [d, d] mask whose column 0 is 1
    and whose columns 1.. hold the segment's area fractions on every row; in the masked blocks
    attn = exp(a - max) * mask, rows renormalised; cossim = mean cosine to softmax(a) over
    (batch*heads, rows); attn -= exp(-(cossim+1)^2/sd) * softmax(a)[:, 0]; output bmm(attn, v)."""
    v = clip.model.visual
    t = v.conv1(x).flatten(2).permute(0, 2, 1)
    t = torch.cat([v.class_embedding.view(1, 1, -1).expand(t.shape[0], 1, -1), t], 1) + v.positional_embedding
    t = v.ln_pre(t).permute(1, 0, 2)                       # LND
    d = t.shape[0]
    mask = torch.zeros(d, d)
    mask[:, 0] = 1
    for i in range(d):
        mask[i, 1:] = mb.reshape(-1)
    blocks = v.transformer.resblocks
    for nth, blk in enumerate(blocks):
        y = blk.ln_1(t)
        if nth >= len(blocks) - masked_blocks:
            mha = blk.attn
            tgt, bsz, e = y.shape
            heads = mha.num_heads
            hd = e // heads
            q, k, vv = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            q = q.contiguous().view(tgt, bsz * heads, hd).transpose(0, 1)
            k = k.contiguous().view(tgt, bsz * heads, hd).transpose(0, 1)
            vv = vv.contiguous().view(tgt, bsz * heads, hd).transpose(0, 1)
            q = q / math.sqrt(hd)
            a = torch.bmm(q, k.transpose(-2, -1))
            before = torch.softmax(a, dim=-1)
            masked = torch.exp(a - torch.max(a, -1, keepdim=True)[0]) * mask.unsqueeze(0)
            masked = masked / masked.sum(dim=-1)[:, :, None]
            if sd is not None:
                cossim = F.cosine_similarity(masked, before, dim=-1).mean()
                w = torch.exp(-(cossim + 1) ** 2 / sd)
                masked = masked - w * before[:, 0, :][:, None]
            out = torch.bmm(masked, vv).transpose(0, 1).contiguous().view(tgt, bsz, e)
            t = t + mha.out_proj(out)
        else:
            yy = y.permute(1, 0, 2)
            t = t + blk.attn(yy, yy, yy, need_weights=False)[0].permute(1, 0, 2)
        t = t + blk.mlp(blk.ln_2(t))
    t = t.permute(1, 0, 2)
    return v.ln_post(t[:, 0]) @ v.proj


def _masks(seed=0, size=64, n=3):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, n, (8, 8), generator=g)
    lab = F.interpolate(lab[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return lab[None] == torch.arange(n)[:, None, None]


@pytest.mark.parametrize("layers,sd", [(1, 5.0), (2, 5.0), (2, 2.0), (1, None)])
def test_area_masked_attention_matches_the_official_equations(clip, layers, sd):
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    masks = _masks()
    ours = zg.segment_embeddings(clip, image, masks, mode="zero-guidance", mask_layers=layers, sd=sd, batch_size=2)
    x = zg.normalise(clip, image[None])
    with torch.no_grad():
        for s in range(len(masks)):
            mb = F.interpolate(masks[s][None, None].float(), size=(4, 4), mode="area")
            ref = F.normalize(_official_encode(clip, x, mb, layers, sd), dim=-1)[0]
            assert (ours[s] - ref).abs().max() <= 1e-5
    # the subtraction changes the result (the test is not vacuous), and segments differ
    if sd is not None:
        plain = zg.segment_embeddings(clip, image, masks, mode="zero-guidance", mask_layers=layers, sd=None)
        assert (plain - ours).abs().max() > 1e-3
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_full_mask_without_subtraction_is_the_plain_embedding(clip):
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    ours = zg.segment_embeddings(clip, image, full, mode="zero-guidance", mask_layers=2, sd=None)
    with torch.no_grad():
        ref = F.normalize(clip.model.encode_image(zg.normalise(clip, image[None])), dim=-1)
    assert (ours - ref).abs().max() <= 1e-5


def test_masked_blocks_scale_with_depth():
    assert [zg.paper_mask_layers(d) for d in (24, 12, 6, 3, 2, 1, 32)] == [4, 2, 1, 1, 1, 1, 5]


def test_soft_area_fractions_are_area_means():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, :3, :2] = True
    frac = zg.soft_area_fractions(m, (2, 2))
    assert frac.tolist() == [[6 / 16, 0.0, 0.0, 0.0]]


# ------------------------------------------------------------------ the tree: cut and merge

def _unit(degrees):
    r = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return torch.from_numpy(np.stack([np.cos(r), np.sin(r)], 1)).float()


def test_tree_cut_by_hand():
    """Five unit vectors at 0, 8, 60, 72 and 180 degrees. Ward merges {0, 8} (node 5), then
    {60, 72} (node 6), then those two (node 7), then 180 (leaf 4) last: the root 8 = (4, 7).
    Three leaves: split 8 -> parts 4 | 7 (tree ids 1, 2), split 7 -> 5 | 6 (ids 5, 6)."""
    x = _unit([0, 8, 60, 72, 180])
    parts, nodes = zg.ward_parts(x, 3)
    assert nodes == [(8, 4, 7), (7, 5, 6)]
    assert parts.astype(int).tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    cut = zg.cut_tree(x, 3, threshold=0.95)
    assert cut.labels.tolist() == [1, 1, 2, 2, 0] and cut.tree_ids == [1, 5, 6]
    # the centroids of {0, 8} and {60, 72} point 62 degrees apart: cosine 0.469 < 0.5 splits, 0.4 does not
    cut = zg.cut_tree(x, 3, threshold=0.5)
    assert cut.labels.tolist() == [1, 1, 2, 2, 0] and cut.tree_ids == [1, 5, 6]
    cut = zg.cut_tree(x, 3, threshold=0.4)
    assert cut.labels.tolist() == [1, 1, 1, 1, 0] and cut.tree_ids == [1, 2]
    torch.testing.assert_close(cut.centroids[0], x[4])
    torch.testing.assert_close(cut.centroids[1], x[:4].mean(0))


def _official_cut(x, leaves, thres):
    """run_dino_clustering_tree.py's loop, written from the official code: the `_hc_cut` parts
    (descendants of the two children of each split, the largest node id split first, taken here
    from scipy's to_tree), then pairs kept when p == 0 or sim < thres and their union equals a kept
    part exactly; children overwrite their parent's labels; empty labels dropped."""
    from heapq import heappush, heappushpop

    from scipy.cluster.hierarchy import to_tree, ward

    xn = x.double().numpy()
    z = ward(xn)
    n = len(xn)
    _, nodelist = to_tree(z, rd=True)
    children = z[:, :2].astype(int)
    nodes = [-(max(children[-1]) + 1)]
    pll = np.zeros((leaves * 2 - 2, n), dtype=np.intp)
    for a in range(leaves - 1):
        these = children[-nodes[0] - n]
        heappush(nodes, -these[0])
        heappushpop(nodes, -these[1])
        for i, node in enumerate(these):
            pll[a * 2 + i, nodelist[node].pre_order()] = 1
    cent = np.stack([xn[p.astype(bool)].mean(0) for p in pll])
    cn = cent / np.linalg.norm(cent, axis=1, keepdims=True)
    sim_mat = cn @ cn.T
    part_labels = np.zeros(n)
    count, part_list, tree_id_list = 0, [], []
    for p in range(0, leaves * 2 - 2, 2):
        m1, m2 = pll[p].astype(bool), pll[p + 1].astype(bool)
        if p == 0 or sim_mat[p, p + 1] < thres:
            if p == 0:
                part_labels[m1], part_labels[m2] = count, count + 1
                part_list += [p, p + 1]
                tree_id_list += [1, 2]
                count += 2
            else:
                best_match, best_sum = -1, -1
                for idp, pr in enumerate(part_list):
                    s = (np.logical_or(m1, m2) == pll[pr].astype(bool)).sum()
                    if s > best_sum:
                        best_sum, best_match = s, idp
                if best_sum == n:
                    tree_id_list += [tree_id_list[best_match] * 2 + 1, tree_id_list[best_match] * 2 + 2]
                    part_labels[m1], part_labels[m2] = count, count + 1
                    part_list += [p, p + 1]
                    count += 2
    labels, ids, used = np.full(n, -1), [], 0
    for eu in range(count):
        if (part_labels == eu).sum() > 0:
            labels[part_labels == eu] = used
            ids.append(tree_id_list[eu])
            used += 1
    return labels, ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_cut_matches_the_official_loop(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 8, generator=g)
    x = centres[torch.randint(0, 6, (120,), generator=g)] + 0.4 * torch.randn(120, 8, generator=g)
    for thres in (0.0, 0.3, 0.6, 0.9, 0.95):
        labels, ids = _official_cut(F.normalize(x, dim=-1), 10, thres)
        cut = zg.cut_tree(x, 10, thres)
        assert cut.labels.tolist() == labels.tolist(), thres
        assert cut.tree_ids == ids, thres


def test_tree_merge_by_hand():
    """Leaves 0..3 with tree ids 1, 5, 13, 14 (6 = parent of 13 and 14; 2 = parent of 5 and 6;
    0 = the root, parent of 1 and 2)."""
    e = torch.eye(4)
    img = {0: e[0], 1: e[0], 2: e[1], 3: e[1]}                  # leaf index -> image embedding
    txt = {0: e[0], 1: e[2], 2: 0.6 * e[1] + 0.8 * e[2], 3: e[1]}
    calls = []

    def describe(members):
        calls.append(tuple(members))
        if len(members) == 1:
            return img[members[0]], txt[members[0]], f"leaf{members[0]}"
        return F.normalize(sum(img[m] for m in members), dim=0), e[3], "+".join(map(str, members))

    # leaf indices 0..3 have tree ids 1, 5, 13, 14
    out = zg.merge_tree([1, 5, 13, 14], describe, threshold=0.79, weight=0.5)
    # 13 + 14: 0.5 * cos(e1, e1) + 0.5 * cos(0.6 e1 + 0.8 e2, e1) = 0.5 + 0.3 = 0.8 >= 0.79: merged into 6;
    # 5 + 6: image cos(e0, e1) = 0, text cos(e2, e3) = 0: kept apart, so 2 and the root never form
    assert sorted(out) == [1, 5, 6]
    assert out[6].members == [2, 3] and out[6].extra == "2+3"
    assert out[1].members == [0] and out[5].members == [1]
    assert (2, 3) in calls
    # a stricter threshold keeps 13 and 14 apart and therefore blocks every ancestor
    out = zg.merge_tree([1, 5, 13, 14], describe, threshold=0.81, weight=0.5)
    assert sorted(out) == [1, 5, 13, 14]
    # all alike: everything climbs to the root
    out = zg.merge_tree([1, 2], lambda m: (e[0], e[0], None), threshold=0.8)
    assert list(out) == [0] and out[0].members == [0, 1]
    # the weight: image only (weight 1) merges 13 + 14 (cos 1) and not 5 + 6
    out = zg.merge_tree([1, 5, 13, 14], describe, threshold=0.99, weight=1.0)
    assert sorted(out) == [1, 5, 6]


def test_densecrf_follows_the_image_edges():
    pytest.importorskip("pydensecrf.densecrf")
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, :, 13:] = 220                                   # an edge at x = 13
    energy = torch.zeros(2, 32, 32)
    energy[0, :, 16:] = 1.0                                # the unary's boundary sits at x = 16 (patch grid)
    energy[1, :, :16] = 1.0
    g = torch.Generator().manual_seed(0)
    energy += 0.3 * torch.rand(2, 32, 32, generator=g)
    plain = energy.argmin(0)
    crf = zg.densecrf_labels(img, -(-energy))              # energy: lower = likelier
    truth = torch.zeros(32, 32, dtype=torch.long)
    truth[:, 13:] = 1
    assert (crf == truth).float().mean() > (plain == truth).float().mean()
    assert (crf == truth).float().mean() > 0.97


def test_tree_segments_label_map_and_tree_ids():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 16, generator=g)[torch.tensor([0, 0, 1, 1] * 4 + [2, 2, 3, 3] * 4)]
    feats = feats + 0.05 * torch.randn(32, 16, generator=g)
    img = torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8, generator=g)
    labels, ids = zg.tree_segments(feats, (4, 8), img, leaves=4, threshold=0.95, refine=False)
    assert labels.shape == (32, 64) and sorted(torch.unique(labels).tolist()) == list(range(len(ids)))
    cut = zg.cut_tree(feats, 4, 0.95)
    # no refinement: each pixel takes its patch's nearest centroid (nearest upsampling of the patch grid)
    e = zg.centroid_energy(feats, cut.centroids).argmin(1).view(4, 8)
    up = F.interpolate(e[None, None].float(), size=(32, 64), mode="nearest")[0, 0].long()
    present = sorted(torch.unique(up).tolist())
    assert ids == [cut.tree_ids[i] for i in present]
    assert torch.equal(torch.tensor(present)[labels], up)
