# The two commands a newcomer types:  make demo   and   make test
# Each creates .venv if missing, installs torch first, then builds namedmask with
# --no-build-isolation so the extension is compiled against the torch it runs with.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,dali
BIN := $(VENV)/bin
STAMP := $(VENV)/.namedmask-installed
NATIVE := $(shell find csrc -type f 2>/dev/null) setup.py

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC) "setuptools>=77" wheel ninja
	touch $@

$(STAMP): $(VENV)/.torch-installed $(NATIVE)
	$(BIN)/python -m pip install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# The toy world and its tiny CLIP/DINO are built once (cached in runs/toy/seed-0), then NamedMask
# runs on them (namedmask/configs/demo.yaml).
demo: install
	$(BIN)/namedmask info
	$(BIN)/namedmask toy-world --out runs/toy --seed 0
	$(BIN)/namedmask run --out runs/demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf build namedmask/_C*.so *.egg-info
