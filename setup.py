"""Build namedmask's native extension namedmask._C (the metadata is in pyproject.toml).

The CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build
and nvcc is found (FORCE_CUDA=1 forces, NAMEDMASK_CUDA=0 skips). Sources and flags come
from csrc/native.cmake, the one list shared with CMakeLists.txt.
`pip install .` builds against the torch pinned in pyproject.toml's [build-system];
with torch installed already: pip install --no-build-isolation .
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_config():
    with open(os.path.join(ROOT, "csrc", "native.cmake")) as f:
        text = f.read()
    return {m.group(1): m.group(2).replace(";", " ").split()
            for m in re.finditer(r"^set\((\w+)\s+([^)]*)\)", text, re.M)}


def find_cuda_home():
    """The toolkit root. A wrapper script named nvcc on PATH (`exec /real/nvcc "$@"`)
    makes torch guess wrong, so follow the wrapper to the real compiler."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        m = re.search(rb"^exec\s+(\S+)", head, re.M)
        if m:
            nvcc = m.group(1).decode()
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def sources(patterns):
    return sorted(f for p in patterns for f in glob.glob(p, root_dir=ROOT))


def extensions():
    if os.environ.get("NAMEDMASK_NATIVE", "1") == "0":
        return [], {}
    cfg = native_config()
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", " ".join(cfg["NAMEDMASK_CUDA_ARCH_DEFAULT"]))
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("namedmask: building the extension needs torch in the build environment; install torch first, "
                 "then run: pip install --no-build-isolation .")

    want_cuda = os.environ.get("NAMEDMASK_CUDA", "1") != "0" and (
        os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and cuda_home is not None))
    srcs = sources(cfg["NAMEDMASK_CPU_SOURCES"])
    include_dirs = [os.path.join(ROOT, d) for d in cfg["NAMEDMASK_INCLUDE_DIRS"]]
    extra = {"cxx": cfg["NAMEDMASK_CXX_FLAGS"]}
    kind = cpp_extension.CppExtension
    if want_cuda:
        srcs += sources(cfg["NAMEDMASK_CUDA_SOURCES"])
        extra["nvcc"] = cfg["NAMEDMASK_NVCC_FLAGS"]
        kind = cpp_extension.CUDAExtension
        # pip's CUDA wheels keep cusparse.h & co. here, not in the toolkit.
        for site in sys.path:
            inc = glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
            include_dirs += [d for d in inc if d not in include_dirs]
    print(f"namedmask: building _C with {'CPU + CUDA' if want_cuda else 'CPU only'} "
          f"({len(srcs)} sources, CUDA_HOME={os.environ.get('CUDA_HOME')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    ext = kind("namedmask._C", srcs, include_dirs=include_dirs, extra_compile_args=extra,
               extra_link_args=cfg["NAMEDMASK_LINK_FLAGS"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
packages = find_packages(include=["namedmask", "namedmask.*"]) + ["namedmask.kernels"]

setup(
    packages=packages,
    package_dir={"namedmask.kernels": "kernels"},
    package_data={"namedmask": ["configs/*.yaml", "assets/*", "models/open_clip_configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
