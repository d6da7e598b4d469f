"""Test environment: Triton runs in its interpreter without a GPU (must be set before any
@triton.jit function is defined), model hubs are never contacted, real data is found at
../shared/data next to the checkout (or $NAMEDMASK_SHARED_DATA) and skipped when absent."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAMEDMASK_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def voc_mini(shared_data) -> Path:
    path = shared_data / "voc_mini"
    if not (path / "JPEGImages").is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def pool_dir(shared_data) -> Path:
    path = shared_data / "pool"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path
