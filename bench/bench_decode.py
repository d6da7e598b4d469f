"""Decode + CLIP-style resize (short side 224, centre crop 224) of the 265-photo pool, one
pass per decode backend, in images/s, and the same decode at full size (what sets the
"auto" order: the resize is Pillow's for every CPU backend); ratios against the Pillow
backend measured in the same run; single-threaded Pillow is the naive floor. Backends run interleaved, round after round,
so a change in machine load hits all of them; the CPU seconds per image (all threads of this
process) are reported too, a steadier figure than wall time on a shared machine."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench.common import Row, print_table
from namedmask.data import decode
from namedmask.data.datasets import list_pool_images

REPO = Path(__file__).resolve().parents[1]


def pool_paths() -> list:
    shared = Path(os.environ.get("NAMEDMASK_SHARED_DATA", REPO.parent / "shared" / "data"))
    pool = list_pool_images(shared / "pool")
    return [pool.absolute(i) for i in range(len(pool))]


def _one_pass(paths, backend, resize, batch_size, threads) -> tuple:
    """(wall seconds, process CPU seconds) to decode all paths."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(len(b.indices) for b in decode.iter_image_batches(paths, batch_size, resize=resize, backend=backend,
                                                               threads=threads))
    assert n == len(paths), f"{backend} decoded {n} of {len(paths)}"
    return time.perf_counter() - wall, time.process_time() - cpu


def run(repeat: int = 3, batch_size: int = 32) -> list[Row]:
    paths = pool_paths()
    live = [b for b in decode.BACKENDS if decode.why_not(b) is None]
    configs = [(b, b, None) for b in live] + [("pil, 1 thread", "pil", 1)]
    rows = []
    for op, resize, shape in (("decode+resize", decode.Resize(224, 224), f"{len(paths)} photos -> 3x224x224"),
                              ("decode", None, f"{len(paths)} photos, full size")):
        for _, backend, threads in configs:  # warm-up: file cache, DALI/OpenCV initialisation
            _one_pass(paths[:batch_size], backend, resize, batch_size, threads)
        samples = {name: [] for name, _, _ in configs}
        for _ in range(repeat):
            for name, backend, threads in configs:
                samples[name].append(_one_pass(paths, backend, resize, batch_size, threads))
        wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
        rows += [Row(op, name, shape, wall[name], wall["pil"] / wall[name],
                     extra={"images/s": f"{len(paths) / wall[name]:.0f}",
                            "cpu ms/img": f"{1e3 * cpu[name] / len(paths):.2f}",
                            "threads": threads or decode.decode_threads()})
                 for name, _, threads in configs]
    rows += [Row("decode", b, "-", float("nan"), None, extra={"not run": decode.why_not(b)})
             for b in decode.BACKENDS if b not in live]
    return rows


if __name__ == "__main__":
    print_table(run(), "decode (pool, 224)")
