"""Loads the compiled extension namedmask._C. A missing or broken build is recorded and
reported (`namedmask info`, errors on explicit backend requests), never an import crash."""
import logging

import torch  # noqa: F401  (libtorch must be loaded before _C)

log = logging.getLogger(__name__)

try:
    from namedmask import _C  # noqa: F401  (registers torch.ops.namedmask.*)

    LOAD_ERROR = None
except Exception as exc:  # ImportError, or an undefined symbol from a stale build
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    log.warning("namedmask._C is not available (%s); native backends are disabled. "
                "Rebuild with `pip install --no-build-isolation .`", LOAD_ERROR)


_REGISTERED: set = set()  # (op, dispatch key) pairs found registered: a registration stays


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when namedmask::<op> has a kernel registered for CPU or CUDA. A found kernel is
    remembered: every op call asks (ops.registry.select), and the dispatcher lookup cost as much
    as a small op's work (~0.08 ms per call on a busy machine)."""
    if _C is None:
        return False
    if (op, dispatch_key) in _REGISTERED:
        return True
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"namedmask::{op}", dispatch_key)
    except RuntimeError:
        return False
    if found:
        _REGISTERED.add((op, dispatch_key))
    return found
