"""Triton launches on the current CUDA device and its stream, so each public kernel
wrapper first makes its input tensor's device current (the CUDA backends use CUDAGuard)."""
import contextlib
import functools

import torch


def on_input_device(fn):
    """Decorator: run fn(tensor, ...) with tensor.device as the current CUDA device."""
    @functools.wraps(fn)
    def wrapper(tensor: torch.Tensor, *args, **kwargs):
        with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
            return fn(tensor, *args, **kwargs)
    return wrapper
