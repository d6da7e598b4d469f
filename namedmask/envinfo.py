"""What this installation can do: versions, devices, and per op which backends are live.
Used by `namedmask info` and recorded in benchmark results."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

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
        "environment": environment(),
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(start: Path | None = None) -> str | None:
    """The commit of the git checkout namedmask runs from (+ '-dirty' with uncommitted changes to
    tracked files); None when it is not a checkout (an installed wheel) or git is missing."""
    import subprocess

    folder = Path(start or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _config_version(pattern: str) -> str | None:
    """A library version from torch's build summary (torch.__config__.show())."""
    import re

    m = re.search(pattern, torch.__config__.show())
    return m.group(1) if m else None


def _mkl_version() -> str | None:
    return _config_version(r"Math Kernel Library Version (\S+)") if torch.backends.mkl.is_available() else None


def _onednn_version() -> str | None:
    return _config_version(r"(?:MKL-DNN|oneDNN) v?(\d[\w.]*)") if torch.backends.mkldnn.is_available() else None


# Variables that cap a library's CPU dispatch, and with it the rounding of its floats: capping
# NumPy and OpenBLAS at AVX2 on an AVX-512 machine changed 10 of the demo's 320 TokenCut masks with
# torch's models identical (docs/reproducibility.md, "The demo's number").
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")


def _numpy_simd() -> list | None:
    """The SIMD extensions NumPy dispatches to here (what `numpy.show_runtime()` calls "found";
    a private NumPy module: None where it moved)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return None
    return [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]


def environment(threads: dict | None = None, resumed: bool | None = None) -> dict:
    """What a run's numbers depend on besides its config and seed, for its JSON: the code
    (commit), the libraries whose kernels compute the floats (torch, MKL, oneDNN, NumPy, SciPy),
    the CPU, the instruction sets torch and NumPy dispatch to and the variables that cap them, the
    threads (runtime.thread_record), and whether the run was resumed. Two runs on one machine whose
    records and configs are equal are expected to give equal bits."""
    from namedmask import runtime

    record = {
        "namedmask": __version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkl": _mkl_version(),
        "onednn": _onednn_version(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy": _version("numpy"),
        "numpy_simd": _numpy_simd(),
        "scipy": _version("scipy"),
        "cpu_dispatch_env": {k: os.environ[k] for k in DISPATCH_ENV if k in os.environ},
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available()
        else [],
        "native_extension": _native.LOAD_ERROR is None,
        "threads": threads or runtime.thread_record(),
    }
    if resumed is not None:
        record["resumed"] = resumed
    return record


def format_machine(env: dict) -> str:
    """The CPU of environment() and what its libraries dispatch to: "AMD EPYC [AVX512]", then NumPy's
    widest SIMD set and any dispatch cap where recorded ("AMD EPYC [AVX2; NumPy X86_V3;
    OPENBLAS_CORETYPE=Haswell]"). Runs of older records show what they have."""
    parts = [str(env.get("cpu_capability"))]
    if env.get("numpy_simd"):
        parts.append(f"NumPy {env['numpy_simd'][-1]}")
    parts += [f"{k}={v}" for k, v in (env.get("cpu_dispatch_env") or {}).items()]
    return f"{env.get('cpu')} [{'; '.join(parts)}]"


def format_environment(env: dict) -> str:
    """One line of environment(): what a reader needs to compare two runs."""
    t = env.get("threads", {})
    return (f"namedmask {env.get('namedmask')} ({env.get('commit') or 'not a git checkout'}), torch {env.get('torch')}, "
            f"oneDNN {env.get('onednn') or '-'}, {format_machine(env)}, "
            f"threads {t.get('intra_op')} intra-op / {t.get('inter_op')} inter-op ({t.get('source')}), "
            f"OpenMP wait {t.get('omp_wait_policy') or 'default'}"
            + ("" if env.get("resumed") is None else f", resumed: {'yes' if env['resumed'] else 'no'}"))


def format_info(info: dict) -> str:
    lines = [f"namedmask {info['namedmask']}  (python {info['python']}, {info['machine']})",
             f"torch {info['torch']}  CUDA build: {info['torch_cuda_build'] or 'no'}  "
             f"GPU: {', '.join(info['gpus']) if info['gpus'] else 'none'}  threads: {info['torch_threads']}",
             f"native extension: {info['native_extension']}",
             f"reproducibility: {format_environment(info['environment'])}",
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
