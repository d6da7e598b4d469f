"""What this installation can do: versions, devices, and per op which backends are live.
Used by `namedmask info` and recorded in benchmark results."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

import torch

from namedmask import __version__, _native, ops


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _decoders() -> dict:
    from namedmask.data import decode

    live = decode.available_decoders()
    return {"auto": decode.auto_backend(), "backends": live}


def collect() -> dict:
    info = {
        "namedmask": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(),
        "native_extension": "loaded" if _native.LOAD_ERROR is None else f"not loaded: {_native.LOAD_ERROR}",
        "triton": _version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "dali": next((v for v in (_version("nvidia-dali-cuda130"), _version("nvidia-dali-cuda120")) if v), None),
        "open_clip": _version("open_clip_torch"),
        "timm": _version("timm"),
        "image_decoding": _decoders(),
        "ops": {},
    }
    for op in ops.ops():
        info["ops"][op] = {
            b: (ops.why_not(op, b, "cuda" if b in ("cuda",) or (b == "triton" and torch.cuda.is_available()) else "cpu")
                or "live")
            for b in ops.BACKENDS
        }
    return info


def format_info(info: dict) -> str:
    lines = [f"namedmask {info['namedmask']}  (python {info['python']}, {info['machine']})",
             f"torch {info['torch']}  CUDA build: {info['torch_cuda_build'] or 'no'}  "
             f"GPU: {', '.join(info['gpus']) if info['gpus'] else 'none'}  threads: {info['torch_threads']}",
             f"native extension: {info['native_extension']}",
             f"triton: {info['triton'] or 'not installed'}{'  (TRITON_INTERPRET=1)' if info['triton_interpret'] else ''}"
             f"   DALI: {info['dali'] or 'not installed'}   open_clip: {info['open_clip'] or '-'}"
             f"   timm: {info['timm'] or '-'}",
             f"image decoding: auto = {info['image_decoding']['auto']}  ("
             + ", ".join(f"{b}: {'live' if st == 'live' else 'no'}" for b, st in info["image_decoding"]["backends"].items())
             + ")",
             "", "op backends (live, or why not):"]
    for op, backends in info["ops"].items():
        lines.append(f"  {op}")
        for b, state in backends.items():
            lines.append(f"    {b:<7} {'live' if state == 'live' else 'no: ' + state}")
    return "\n".join(lines)
