"""Test environment: Triton runs in its interpreter without a GPU (must be set before any
@triton.jit function is defined), model hubs are never contacted, real data is found at
../shared/data next to the checkout (or $NAMEDMASK_SHARED_DATA) and skipped when absent.

Threads: torch's OpenMP threads sleep at barriers (OMP_WAIT_POLICY=PASSIVE, as namedmask sets it
for its users; set here because this file imports torch before namedmask), so a test that uses
several threads does not spin away the cores its own threads wait for on a busy machine (a
2-thread test was measured ~4x slower than its 1-thread time with one busy loop per core under
the default spinning policy, and timed out). Each test starts with the session's thread count and
$NAMEDMASK_THREADS, whatever an earlier test (or an in-process CLI call with --threads) set."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads its OpenMP runtime (read once, then)
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


@pytest.fixture(autouse=True)
def _fresh_threads():
    """torch's intra-op threads and $NAMEDMASK_THREADS as the session started, for every test."""
    import torch

    from namedmask import runtime

    threads, env, source = torch.get_num_threads(), os.environ.get("NAMEDMASK_THREADS"), runtime._SOURCE
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    runtime._SOURCE = source
    if env is None:
        os.environ.pop("NAMEDMASK_THREADS", None)
    else:
        os.environ["NAMEDMASK_THREADS"] = env


@pytest.fixture(scope="session")
def ci_world(tmp_path_factory) -> Path:
    """The ci-size toy world of seed 0 (namedmask.toy.world), written once per session (~30 s
    on a busy 2-core machine); link it into a toy-world folder as <out>/seed-0/world."""
    from namedmask.toy.world import write_world

    return write_world(tmp_path_factory.mktemp("ci-world") / "world", 0, "ci", progress=False)
