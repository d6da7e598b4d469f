"""Which backend runs an op. Every op has the same four backends:

  torch   the pure-PyTorch reference (ops/reference.py): the spec and the fallback
  cpp     C++/OpenMP kernels in namedmask._C (CPU tensors)
  cuda    CUDA kernels in namedmask._C (CUDA tensors)
  triton  Triton kernels in namedmask.kernels (CUDA tensors; CPU tensors only under
          TRITON_INTERPRET=1, which proves logic, not speed, so "auto" never picks it there)

backend="auto" takes the first live backend for the tensor's device in AUTO_ORDER;
NAMEDMASK_BACKEND=<name> forces one everywhere (e.g. `torch` to rule out the kernels).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from namedmask import _native

log = logging.getLogger(__name__)

BACKENDS = ("torch", "cpp", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@dataclass
class _Impl:
    fn: Callable
    native_op: str | None = None  # name in torch.ops.namedmask, for cpp/cuda


_OPS: dict[str, dict[str, _Impl]] = {}


def register(op: str, backend: str, fn: Callable, native_op: str | None = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _OPS.setdefault(op, {})[backend] = _Impl(fn, native_op)


def register_op(op: str, triton_module: str) -> None:
    """The four standard backends of an op: reference.<op> (torch), torch.ops.namedmask.<op>
    (cpp, cuda) and namedmask.kernels.<triton_module>.<op> (triton, imported on first use)."""
    from namedmask.ops import reference

    def triton_kernel(*args):
        return getattr(importlib.import_module(f"namedmask.kernels.{triton_module}"), op)(*args)

    register(op, "torch", getattr(reference, op))
    register(op, "cpp", native(op), native_op=op)
    register(op, "cuda", native(op), native_op=op)
    register(op, "triton", triton_kernel)


def ops() -> list[str]:
    return sorted(_OPS)


@functools.lru_cache(maxsize=None)
def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not break namedmask
        return f"triton failed to import: {exc}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_not(op: str, backend: str, device: str | torch.device = "cpu") -> str | None:
    """None when `backend` can run `op` on tensors of `device`, else the reason."""
    device = torch.device(device).type
    impl = _OPS.get(op, {}).get(backend)
    if impl is None:
        return f"op {op!r} has no {backend!r} backend"
    if backend == "torch":
        return None
    if backend == "cpp":
        if device != "cpu":
            return "the cpp backend runs on CPU tensors"
        if _native.LOAD_ERROR:
            return f"namedmask._C did not load ({_native.LOAD_ERROR})"
        if not _native.has_kernel(impl.native_op, "CPU"):
            return f"namedmask._C has no CPU kernel for {impl.native_op}"
        return None
    if backend == "cuda":
        if device != "cuda":
            return "the cuda backend runs on CUDA tensors"
        if _native.LOAD_ERROR:
            return f"namedmask._C did not load ({_native.LOAD_ERROR})"
        if not _native.has_kernel(impl.native_op, "CUDA"):
            return "namedmask._C was built without CUDA kernels (CPU-only torch, nvcc missing or NAMEDMASK_CUDA=0)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    # triton
    err = _triton_error()
    if err:
        return err
    if device == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    return None if _interpreting() else "triton runs on CPU tensors only under TRITON_INTERPRET=1"


def available_backends(op: str, device: str | torch.device | None = None) -> list[str]:
    """Live backends of `op` for `device` (default: every device this machine has)."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; known: {ops()}")
    devices = [device] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    live = {b for d in devices for b in BACKENDS if why_not(op, b, d) is None}
    return [b for b in BACKENDS if b in live]


_warned: set[tuple[str, str]] = set()


def select(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Resolve `backend` ("auto" or a name) to (name, implementation) for `device`."""
    if backend == "auto":
        backend = os.environ.get("NAMEDMASK_BACKEND", "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
        reason = why_not(op, backend, device)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} is not available on {device.type}: {reason}")
        return backend, _OPS[op][backend].fn
    order = AUTO_ORDER.get(device.type, ("torch",))
    for name in order:
        if why_not(op, name, device) is None:
            if name == "torch" and order[0] != "torch" and (op, device.type) not in _warned:
                _warned.add((op, device.type))
                log.warning("%s: native backend %r unavailable (%s); using the torch reference",
                            op, order[0], why_not(op, order[0], device))
            return name, _OPS[op][name].fn
    raise BackendUnavailable(f"{op}: no backend can run on {device.type}")


def native(op: str) -> Callable:
    """The registered torch.ops.namedmask.<op>, resolved at call time."""
    def call(*args):
        return getattr(torch.ops.namedmask, op)(*args)
    call.__name__ = f"namedmask::{op}"
    return call
