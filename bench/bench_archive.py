"""build-archive on the real pool (../shared/data/pool, 265 photos): image-embedding throughput
(decode + CLIP forward, images/s) for nm-tiny and ViT-B-16 with random weights, next to
decoding alone; and peak memory of a whole build-archive run for the pool and the pool
repeated 4x (symlinks): streaming means it must stay flat."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import SHARED_DATA, Row, print_table

REPO = Path(__file__).resolve().parents[1]
POOL = SHARED_DATA / "pool"
VIT_B_IMAGES = 16   # ViT-B-16 on a CPU is slow: time it on the first images of the pool only

# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's size at fork.
_PEAK_RSS_SCRIPT = """
import re, sys
from namedmask.stages.archive import ArchiveConfig, build_archive
build_archive(ArchiveConfig(sys.argv[1], "voc", sys.argv[2], model="nm-tiny", k=50, batch_size=32,
                            shard_size=128, templates="simple"), progress=False)
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def _embedding_times(model: str, paths: list, batch_size: int) -> tuple[float, dict]:
    """(seconds decoding + resizing, {torch threads: seconds of CLIP forward}) for `paths`.
    Forward is timed with the default thread count and with one thread: on an oversubscribed
    machine OpenMP spinning can make two threads far slower than one."""
    import torch

    from namedmask.data.decode import Resize, iter_image_batches
    from namedmask.models.clip import RANDOM, load_clip

    clip = load_clip(model, RANDOM)
    resize = Resize(clip.image_size, clip.image_size, "bicubic")
    t0 = time.perf_counter()
    batches = [b.images for b in iter_image_batches(paths, batch_size, resize=resize, on_error="skip")]
    decode = time.perf_counter() - t0
    default_threads, forward = torch.get_num_threads(), {}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        clip.encode_images(batches[0][:2])  # warm-up
        t0 = time.perf_counter()
        for images in batches:
            clip.encode_images(images).half()
        forward[threads] = time.perf_counter() - t0
    torch.set_num_threads(default_threads)
    return decode, forward


def _peak_rss_mb(pool: Path, out: Path) -> tuple[float, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(pool), str(out)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-1]) / 1024, time.perf_counter() - t0


def run(batch_size: int = 32) -> list[Row]:
    if not POOL.is_dir():
        print(f"bench_archive: {POOL} not found, skipped")
        return []
    paths = sorted(p for p in POOL.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rows = []
    for model, subset in (("nm-tiny", paths), ("ViT-B-16", paths[:VIT_B_IMAGES])):
        decode, forward = _embedding_times(model, subset, batch_size)
        n, best = len(subset), min(forward.values())
        rows.append(Row("archive embed", f"{model} (random)", f"{n} pool imgs, batch {batch_size}", decode + best,
                        extra={"images/s (decode + CLIP)": f"{n / (decode + best):.1f}",
                               "decode + resize alone": f"{n / decode:.1f} images/s",
                               **{f"CLIP forward, {t} thread(s)": f"{n / sec:.1f} images/s"
                                  for t, sec in forward.items()}}))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repeated = tmp / "pool4x"
        for r in range(4):
            (repeated / f"copy{r}").mkdir(parents=True)
            for p in paths:
                (repeated / f"copy{r}" / p.name).symlink_to(p)
        base = None
        for pool, n in ((POOL, len(paths)), (repeated, 4 * len(paths))):
            mb, seconds = _peak_rss_mb(pool, tmp / f"out{n}")
            base = base or mb
            rows.append(Row("archive peak RSS", "nm-tiny", f"{n} imgs (whole run)", seconds,
                            extra={"peak RSS MB": f"{mb:.0f}", "vs 1x pool": f"{mb - base:+.0f} MB",
                                   "images/s incl. startup": f"{n / seconds:.1f}"}))
    return rows


if __name__ == "__main__":
    print_table(run(), "build-archive")
