# The two commands a newcomer types:  make demo   and   make test
# Each creates .venv if missing, installs torch first, then builds namedmask with
# --no-build-isolation so the extension is compiled against the torch it runs with.
#
# Two builds, chosen automatically (override with BUILD=full or BUILD=light):
# - full (a GPU is present: `nvidia-smi -L` lists one): the CUDA kernels are compiled and the
#   DALI extra is installed, as before;
# - light (no GPU): no DALI and no CUDA kernels (NAMEDMASK_CUDA=0: the CPU kernels only). Torch
#   comes from the CPU wheel index ($(TORCH_CPU_INDEX)) when that index answers; where it does
#   not (this project's dev and CI machines), from PyPI, whose torch 2.14.1 is a CUDA build that
#   runs on the CPU (docs/install.md has the sizes).
# CI (.ci/run) asks for BUILD=full on its GPU-less machine: it proves the CUDA code compiles and links.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo yes)
BUILD ?= $(if $(HAS_GPU),full,light)
ifeq ($(BUILD),full)
EXTRAS ?= test,dali
BUILD_ENV :=
else ifeq ($(BUILD),light)
EXTRAS ?= test
BUILD_ENV := NAMEDMASK_CUDA=0
else
$(error BUILD must be full or light, got '$(BUILD)')
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.namedmask-installed-$(BUILD)
NATIVE := $(shell find csrc -type f 2>/dev/null) setup.py

.PHONY: install demo test bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	@if [ "$(BUILD)" = light ] && $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
	  echo "namedmask: light build: CPU torch from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/python -m pip install --index-url $(TORCH_CPU_INDEX) $(TORCH_SPEC); \
	else \
	  [ "$(BUILD)" = light ] && echo "namedmask: light build: $(TORCH_CPU_INDEX) does not answer; torch from PyPI (a CUDA build, it runs on the CPU)"; \
	  $(BIN)/python -m pip install $(TORCH_SPEC); \
	fi
	$(BIN)/python -m pip install "setuptools>=77" wheel ninja
	touch $@

$(STAMP): $(VENV)/.torch-installed $(NATIVE)
	@if [ "$(BUILD)" = light ]; then echo "namedmask: light build (no GPU found): skipping DALI and the CUDA kernels; BUILD=full builds them"; \
	 else echo "namedmask: full build: CPU + CUDA kernels, DALI"; fi
	$(BUILD_ENV) $(BIN)/python -m pip install --no-build-isolation -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.namedmask-installed-*
	touch $@

install: $(STAMP)

# The toy world and its tiny CLIP/DINO are built once (cached in runs/toy/seed-0), then NamedMask
# runs on them (namedmask/configs/demo.yaml).
demo: install
	$(BIN)/namedmask info
	$(BIN)/namedmask toy-world --out runs/toy --seed 0
	$(BIN)/namedmask run --out runs/demo

test: install
	$(BUILD_ENV) $(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench

# On a machine with a GPU (docs/gpu.md): builds the CUDA kernels, runs the cuda tests, DALI GPU
# decoding, the toy chain on the GPU and the GPU benchmark rows; one JSON + a summary under
# bench/results/gpu-check/ (~8 min on one H100). `python bench/gpu_check.py --dry-run` shows the plan.
gpu-check: install
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf build namedmask/_C*.so *.egg-info
