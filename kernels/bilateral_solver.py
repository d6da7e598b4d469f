"""Triton bilateral solver (spec: namedmask/ops/reference.py), laid out like the CUDA backend.

Grid construction stays in torch on the tensors' device (per-pixel keys with the exact integer
YUV of csrc/include/namedmask/bilateral.h, torch.unique, searchsorted for the neighbours); the
vertex-space work is Triton: splat, blur / bistochastization, the CG vector ops with per-chunk
partial dot products, the per-image CG scalars, and the slice. Chunks of BLOCK vertices never
straddle two images, so every image runs its own CG (own alpha, beta, stopping test) inside one
launch sequence, with no host synchronisation inside the iteration loop.
"""
import torch
import triton
import triton.language as tl

from namedmask.kernels._device import on_input_device

from namedmask.kernels.spec import (BILATERAL_BISTOCHASTIC_STEPS, BILATERAL_DIAG_MIN, BILATERAL_DIMS,
                                    BILATERAL_MAX_VERTICES, RGB_TO_YUV_E6, YUV_OFFSET_E6, bilateral_radix,
                                    bilateral_vertex_cap_message)

NEIGHBOURS = 2 * BILATERAL_DIMS
CENTER = 2.0 * BILATERAL_DIMS
# Per-image CG state columns.
B_NORM, ATOL, RHO, RHO_PREV, BETA, ALPHA, DONE = range(7)
STATE = 8


@triton.jit
def _splat_kernel(vertex_ptr, target_ptr, conf_ptr, m_ptr, w_ptr, b_ptr, pixels, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < pixels
    v = tl.load(vertex_ptr + offs, mask=inside, other=0)
    c = tl.load(conf_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    t = tl.load(target_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    tl.atomic_add(m_ptr + v, tl.full([BLOCK], 1.0, tl.float64), mask=inside)
    tl.atomic_add(w_ptr + v, c, mask=inside)
    tl.atomic_add(b_ptr + v, c * t, mask=inside)


@triton.jit
def _blur(nbr_ptr, x_ptr, scale_ptr, offs, inside, SCALED: tl.constexpr):
    """(B x)[offs], or (B (scale * x))[offs] when SCALED."""
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    if SCALED:
        x = x * tl.load(scale_ptr + offs, mask=inside, other=0.0)
    acc = 2.0 * 5 * x  # CENTER
    for k in tl.static_range(10):  # NEIGHBOURS
        j = tl.load(nbr_ptr + offs * 10 + k, mask=inside, other=-1)
        found = inside & (j >= 0)
        xj = tl.load(x_ptr + j, mask=found, other=0.0)
        if SCALED:
            xj = xj * tl.load(scale_ptr + j, mask=found, other=0.0)
        acc += xj
    return acc


@triton.jit
def _bistochastic_kernel(nbr_ptr, n_ptr, m_ptr, out_ptr, count, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < count
    bn = _blur(nbr_ptr, n_ptr, n_ptr, offs, inside, False)
    n = tl.load(n_ptr + offs, mask=inside, other=1.0)
    if FINAL:
        tl.store(m_ptr + offs, n * bn, mask=inside)
    else:
        m = tl.load(m_ptr + offs, mask=inside, other=1.0)
        tl.store(out_ptr + offs, tl.sqrt(n * m / tl.where(inside, bn, 1.0)), mask=inside)


@triton.jit
def _apply_a(nbr_ptr, m_ptr, n_ptr, w_ptr, p_ptr, lam, offs, inside):
    """(lam (Dm - Dn B Dn) + diag(w)) p at offs."""
    bnp = _blur(nbr_ptr, p_ptr, n_ptr, offs, inside, True)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0)
    n = tl.load(n_ptr + offs, mask=inside, other=0.0)
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    p = tl.load(p_ptr + offs, mask=inside, other=0.0)
    return lam * (m * p - n * bnp) + w * p


@triton.jit
def _chunk(begin_ptr, end_ptr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    begin = tl.load(begin_ptr + c)
    end = tl.load(end_ptr + c)
    offs = begin + tl.arange(0, BLOCK)
    return c, offs, offs < end


@triton.jit
def _cg_init_kernel(begin_ptr, end_ptr, m_ptr, n_ptr, w_ptr, b_ptr, y_ptr, inv_diag_ptr, p_ptr, partial_ptr, params_ptr,
                    DIAG_MIN: tl.constexpr, BLOCK: tl.constexpr):
    c, offs, inside = _chunk(begin_ptr, end_ptr, BLOCK)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0)
    n = tl.load(n_ptr + offs, mask=inside, other=0.0)
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    b = tl.load(b_ptr + offs, mask=inside, other=0.0)
    tl.store(y_ptr + offs, tl.where(w > 0, b / tl.where(w > 0, w, 1.0), 0.0), mask=inside)
    d = tl.load(params_ptr) * (m - 2.0 * 5 * n * n) + w  # params: lam, tol
    tl.store(inv_diag_ptr + offs, 1.0 / tl.maximum(d, DIAG_MIN), mask=inside)
    tl.store(p_ptr + offs, tl.zeros([BLOCK], tl.float64), mask=inside)
    tl.store(partial_ptr + 2 * c, tl.sum(b * b, 0))
    tl.store(partial_ptr + 2 * c + 1, 0.0)


@triton.jit
def _cg_residual_kernel(begin_ptr, end_ptr, nbr_ptr, m_ptr, n_ptr, w_ptr, b_ptr, y_ptr, r_ptr, params_ptr,
                        BLOCK: tl.constexpr):
    c, offs, inside = _chunk(begin_ptr, end_ptr, BLOCK)
    b = tl.load(b_ptr + offs, mask=inside, other=0.0)
    lam = tl.load(params_ptr)
    tl.store(r_ptr + offs, b - _apply_a(nbr_ptr, m_ptr, n_ptr, w_ptr, y_ptr, lam, offs, inside), mask=inside)


@triton.jit
def _cg_precondition_kernel(begin_ptr, end_ptr, r_ptr, inv_diag_ptr, z_ptr, partial_ptr, BLOCK: tl.constexpr):
    c, offs, inside = _chunk(begin_ptr, end_ptr, BLOCK)
    r = tl.load(r_ptr + offs, mask=inside, other=0.0)
    z = r * tl.load(inv_diag_ptr + offs, mask=inside, other=0.0)
    tl.store(z_ptr + offs, z, mask=inside)
    tl.store(partial_ptr + 2 * c, tl.sum(r * r, 0))
    tl.store(partial_ptr + 2 * c + 1, tl.sum(r * z, 0))


@triton.jit
def _cg_direction_kernel(begin_ptr, end_ptr, image_ptr, state_ptr, z_ptr, p_ptr, FIRST: tl.constexpr,
                         BLOCK: tl.constexpr):
    c, offs, inside = _chunk(begin_ptr, end_ptr, BLOCK)
    s = state_ptr + 8 * tl.load(image_ptr + c)
    if tl.load(s + 6) == 0.0:  # not DONE
        z = tl.load(z_ptr + offs, mask=inside, other=0.0)
        if FIRST:
            p = z
        else:
            p = z + tl.load(s + 4) * tl.load(p_ptr + offs, mask=inside, other=0.0)  # BETA
        tl.store(p_ptr + offs, p, mask=inside)


@triton.jit
def _cg_apply_kernel(begin_ptr, end_ptr, nbr_ptr, m_ptr, n_ptr, w_ptr, p_ptr, q_ptr, partial_ptr, params_ptr,
                     BLOCK: tl.constexpr):
    c, offs, inside = _chunk(begin_ptr, end_ptr, BLOCK)
    q = _apply_a(nbr_ptr, m_ptr, n_ptr, w_ptr, p_ptr, tl.load(params_ptr), offs, inside)
    tl.store(q_ptr + offs, q, mask=inside)
    p = tl.load(p_ptr + offs, mask=inside, other=0.0)
    tl.store(partial_ptr + 2 * c, tl.sum(p * q, 0))
    tl.store(partial_ptr + 2 * c + 1, 0.0)


@triton.jit
def _cg_step_kernel(begin_ptr, end_ptr, image_ptr, state_ptr, p_ptr, q_ptr, y_ptr, r_ptr, BLOCK: tl.constexpr):
    c, offs, inside = _chunk(begin_ptr, end_ptr, BLOCK)
    alpha = tl.load(state_ptr + 8 * tl.load(image_ptr + c) + 5)  # ALPHA
    y = tl.load(y_ptr + offs, mask=inside, other=0.0)
    r = tl.load(r_ptr + offs, mask=inside, other=0.0)
    tl.store(y_ptr + offs, y + alpha * tl.load(p_ptr + offs, mask=inside, other=0.0), mask=inside)
    tl.store(r_ptr + offs, r - alpha * tl.load(q_ptr + offs, mask=inside, other=0.0), mask=inside)


@triton.jit
def _cg_scalars_kernel(image_chunks_ptr, partial_ptr, state_ptr, params_ptr, PHASE: tl.constexpr, FIRST: tl.constexpr):
    """One program per image: sums its chunks' partials in order, updates its CG scalars.
    PHASE 0: init (b.b); 1: before an iteration (r.r, r.z); 2: after A p (p.q)."""
    i = tl.program_id(0)
    sum0 = tl.zeros([], tl.float64)
    sum1 = tl.zeros([], tl.float64)
    for c in range(tl.load(image_chunks_ptr + i), tl.load(image_chunks_ptr + i + 1)):
        sum0 += tl.load(partial_ptr + 2 * c)
        sum1 += tl.load(partial_ptr + 2 * c + 1)
    s = state_ptr + 8 * i
    if PHASE == 0:
        b_norm = tl.sqrt(sum0)
        tl.store(s + 0, b_norm)
        tl.store(s + 1, tl.load(params_ptr + 1) * b_norm)  # atol = tol |b|
        tl.store(s + 6, tl.where(b_norm == 0.0, 1.0, 0.0))  # y0 = 0 is the answer (scipy returns b)
        for k in tl.static_range(2, 6):
            tl.store(s + k, 0.0)
    elif PHASE == 1:  # scipy tests ||r|| < atol before every iteration
        done = tl.load(s + 6)
        done = tl.where(tl.sqrt(sum0) < tl.load(s + 1), 1.0, done)
        tl.store(s + 6, done)
        if done == 0.0:
            tl.store(s + 2, sum1)
            if FIRST:
                tl.store(s + 4, 0.0)
            else:
                tl.store(s + 4, sum1 / tl.load(s + 3))
    else:
        done = tl.load(s + 6)
        rho = tl.load(s + 2)
        alpha = tl.where(sum0 != 0.0, rho / tl.where(sum0 != 0.0, sum0, 1.0), 0.0)  # p.q == 0 only when r == 0
        tl.store(s + 5, tl.where(done == 0.0, alpha, 0.0))
        if done == 0.0:
            tl.store(s + 3, rho)
            tl.store(s + 6, tl.where(sum0 == 0.0, 1.0, 0.0))  # r == 0 exactly: converged (next beta would be 0/0)


@triton.jit
def _slice_kernel(vertex_ptr, y_ptr, out_ptr, pixels, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < pixels
    v = tl.load(vertex_ptr + offs, mask=inside, other=0)
    tl.store(out_ptr + offs, tl.load(y_ptr + v, mask=inside, other=0.0).to(tl.float32), mask=inside)


def _grid_keys(image, sizes, sigma_spatial, sigma_luma, sigma_chroma):
    """int64 keys of every pixel of the flat batch (layout of csrc/include/namedmask/bilateral.h)
    and the key stride of one image."""
    device = image.device
    hw = sizes.tolist()
    max_h, max_w = max(h for h, _ in hw), max(w for _, w in hw)
    radix = bilateral_radix(max_h, max_w, sigma_spatial, sigma_luma, sigma_chroma)
    stride_v, stride_u = 1, radix[4]
    stride_l = stride_u * radix[3]
    stride_x = stride_l * radix[2]
    stride_y = stride_x * radix[0]
    image_stride = stride_y * radix[1]
    rgb = image.long()
    yuv = [((rgb * torch.tensor(row, device=device)).sum(1) + off).double() / 1e6 for row, off in zip(RGB_TO_YUV_E6, YUV_OFFSET_E6)]
    counts = torch.tensor([h * w for h, w in hw], device=device)
    widths = torch.tensor([w for _, w in hw], device=device)
    img = torch.repeat_interleave(torch.arange(len(hw), device=device), counts)
    local = torch.arange(image.shape[0], device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    xs, ys = local % widths[img], local // widths[img]
    cells = [(xs.double() / sigma_spatial).long(), (ys.double() / sigma_spatial).long(),
             (yuv[0] / sigma_luma).long(), (yuv[1] / sigma_chroma).long(), (yuv[2] / sigma_chroma).long()]
    strides = [stride_x, stride_y, stride_l, stride_u, stride_v]
    keys = img * image_stride
    for cell, stride in zip(cells, strides):
        keys = keys + (cell + 1) * stride
    return keys, strides, image_stride


@on_input_device
def bilateral_solve(image, target, confidence, sizes, sigma_spatial, sigma_luma, sigma_chroma, lam, max_iter, tol,
                    max_vertices=BILATERAL_MAX_VERTICES):
    device = target.device
    pixels = image.shape[0]
    image, target, confidence = image.contiguous(), target.contiguous(), confidence.contiguous()  # may be expanded
    out = torch.empty(pixels, dtype=torch.float32, device=device)
    if pixels == 0:
        return out
    block = 1024 if device.type == "cuda" else 16384  # the CPU interpreter wants big tiles
    batch = sizes.shape[0]
    keys, strides, image_stride = _grid_keys(image, sizes, sigma_spatial, sigma_luma, sigma_chroma)
    unique_keys, vertex_of_pixel = torch.unique(keys, sorted=True, return_inverse=True)
    nv = unique_keys.numel()
    offsets = torch.tensor([o for s in strides for o in (-s, s)], device=device)
    wanted = unique_keys[:, None] + offsets
    pos = torch.searchsorted(unique_keys, wanted).clamp(max=nv - 1)
    nbr = torch.where(unique_keys[pos] == wanted, pos, -1).to(torch.int32).contiguous()
    vertex_of_pixel = vertex_of_pixel.to(torch.int32)
    vertex_start = torch.searchsorted(unique_keys, torch.arange(batch + 1, device=device) * image_stride).tolist()
    for i, (h, w) in enumerate(sizes.tolist()):  # the memory bound, before the solver's buffers
        if vertex_start[i + 1] - vertex_start[i] > max_vertices:
            raise ValueError(bilateral_vertex_cap_message(i, h, w, max_vertices))

    f64 = dict(dtype=torch.float64, device=device)
    m, w, b = (torch.zeros(nv, **f64) for _ in range(3))
    _splat_kernel[(triton.cdiv(pixels, block),)](vertex_of_pixel, target, confidence, m, w, b, pixels, BLOCK=block)
    n, scratch = torch.ones(nv, **f64), torch.empty(nv, **f64)
    vgrid = (triton.cdiv(nv, block),)
    for _ in range(BILATERAL_BISTOCHASTIC_STEPS):
        _bistochastic_kernel[vgrid](nbr, n, m, scratch, nv, FINAL=False, BLOCK=block)
        n, scratch = scratch, n
    _bistochastic_kernel[vgrid](nbr, n, m, scratch, nv, FINAL=True, BLOCK=block)

    begin, end, image_of_chunk, image_chunks = [], [], [], [0]
    for i in range(batch):
        for v in range(vertex_start[i], vertex_start[i + 1], block):
            begin.append(v), end.append(min(v + block, vertex_start[i + 1])), image_of_chunk.append(i)
        image_chunks.append(len(begin))
    as_dev = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    begin, end, image_of_chunk, image_chunks = map(as_dev, (begin, end, image_of_chunk, image_chunks))
    chunks = (len(image_of_chunk),)
    y, r, z, p, q, inv_diag = (torch.empty(nv, **f64) for _ in range(6))
    partial = torch.zeros(max(chunks[0], 1), 2, **f64)
    state = torch.zeros(batch, STATE, **f64)
    params = torch.tensor([lam, tol], **f64)  # a Python float argument would reach the kernels as fp32
    _cg_init_kernel[chunks](begin, end, m, n, w, b, y, inv_diag, p, partial, params, DIAG_MIN=BILATERAL_DIAG_MIN,
                            BLOCK=block)
    _cg_scalars_kernel[(batch,)](image_chunks, partial, state, params, PHASE=0, FIRST=True)
    _cg_residual_kernel[chunks](begin, end, nbr, m, n, w, b, y, r, params, BLOCK=block)
    for it in range(max_iter):
        _cg_precondition_kernel[chunks](begin, end, r, inv_diag, z, partial, BLOCK=block)
        _cg_scalars_kernel[(batch,)](image_chunks, partial, state, params, PHASE=1, FIRST=it == 0)
        _cg_direction_kernel[chunks](begin, end, image_of_chunk, state, z, p, FIRST=it == 0, BLOCK=block)
        _cg_apply_kernel[chunks](begin, end, nbr, m, n, w, p, q, partial, params, BLOCK=block)
        _cg_scalars_kernel[(batch,)](image_chunks, partial, state, params, PHASE=2, FIRST=it == 0)
        _cg_step_kernel[chunks](begin, end, image_of_chunk, state, p, q, y, r, BLOCK=block)
    _slice_kernel[(triton.cdiv(pixels, block),)](vertex_of_pixel, y, out, pixels, BLOCK=block)
    return out
