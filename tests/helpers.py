"""Small helpers shared by the tests."""
import pytest
import torch

from namedmask import ops


def live_backends(op: str, device: str = "cpu") -> list:
    return [b for b in ops.BACKENDS if ops.why_not(op, b, device) is None]


def backend_params(op: str):
    """pytest params over every backend: live ones run, the others skip with the reason
    (CUDA kernels are exercised on CUDA tensors by the separate cuda-marked tests)."""
    out = []
    for b in ops.BACKENDS:
        device = "cuda" if b == "cuda" else "cpu"
        reason = ops.why_not(op, b, device)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(b, id=b, marks=marks))
    return out


def cuda_kernels_expected() -> bool:
    """A CUDA build of torch compiles namedmask's CUDA kernels too, unless the build was asked not
    to (make's light build: NAMEDMASK_CUDA=0, which `make test` passes on to pytest)."""
    import os

    return torch.version.cuda is not None and os.environ.get("NAMEDMASK_CUDA", "1") != "0"


def cuda_device() -> torch.device:
    return torch.device("cuda")
