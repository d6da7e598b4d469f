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


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when namedmask::<op> has a kernel registered for CPU or CUDA."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"namedmask::{op}", dispatch_key)
    except RuntimeError:
        return False
