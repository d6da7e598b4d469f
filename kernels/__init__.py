"""Triton kernels of namedmask, installed as `namedmask.kernels`.

Import only when triton is importable; `namedmask.ops` checks that first. On machines
without a GPU they run under TRITON_INTERPRET=1 (set before the first import)."""
