"""Triton confusion histogram: each program walks a strided set of tiles, accumulates a
register histogram (tl.histogram) and flushes it with one atomic add per bin; class counts
whose histogram is too big for registers fall back to per-pixel global atomics."""
import torch
import triton
import triton.language as tl

from namedmask.kernels._device import on_input_device

MAX_REGISTER_BINS = 8192


@triton.jit
def _confusion_kernel(pred_ptr, target_ptr, out_ptr, n, num_classes, ignore_index,
                      BINS: tl.constexpr, BLOCK: tl.constexpr, REGISTER_HIST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets of batches past 2^31 pixels
    nprog = tl.num_programs(0).to(tl.int64)
    nbins = num_classes * (num_classes + 1)
    acc = tl.zeros([BINS], dtype=tl.int32)
    for start in tl.range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        t = tl.load(target_ptr + offs, mask=inside, other=0).to(tl.int64)
        p = tl.load(pred_ptr + offs, mask=inside, other=0).to(tl.int64)
        counted = inside & (t >= 0) & (t < num_classes) & (t != ignore_index)
        col = tl.where((p >= 0) & (p < num_classes), p, num_classes)
        # ignored pixels land in the trash bin nbins (never flushed); no histogram mask
        # needed, which older Triton releases lack
        b = tl.where(counted, t * (num_classes + 1) + col, nbins)
        if REGISTER_HIST:
            acc += tl.histogram(b.to(tl.int32), BINS)
        else:
            tl.atomic_add(out_ptr + b, tl.full([BLOCK], 1, tl.int64), mask=counted)
    if REGISTER_HIST:
        idx = tl.arange(0, BINS)
        tl.atomic_add(out_ptr + idx, acc.to(tl.int64), mask=(idx < nbins) & (acc > 0))


@on_input_device
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    pred = pred.reshape(-1).contiguous()
    target = target.reshape(-1).contiguous()
    out = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=pred.device)
    n = pred.numel()
    if n == 0:
        return out
    nbins = num_classes * (num_classes + 1)
    register_hist = nbins < MAX_REGISTER_BINS
    bins = triton.next_power_of_2(nbins + 1) if register_hist else 1  # + the trash bin
    block = 4096 if pred.is_cuda else 65536  # the CPU interpreter wants big tiles
    tiles = triton.cdiv(n, block)
    if pred.is_cuda:
        sms = torch.cuda.get_device_properties(pred.device).multi_processor_count
        programs = min(tiles, sms * 4)
    else:
        programs = 1  # interpreter: one program, vectorised tiles
    _confusion_kernel[(programs,)](pred, target, out, n, num_classes, ignore_index,
                                   BINS=bins, BLOCK=block, REGISTER_HIST=register_hist)
    return out
