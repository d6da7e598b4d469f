"""Peak memory of the stages whose cost grows with the input: TokenCut (features + cut) on a very
wide and a very large photo, SelfMask (ViT-S/8 + decoder) on a 20000x512 panorama, bilateral_solve on a 10k x 10k image, and the archive's top-K merge
over 128k and 1.28M simulated pool embeddings (random unit vectors, 512-d, shards of 4096 made
on the fly: the merge, not the disk). Each case runs in a fresh process (peak RSS = VmHWM,
torch and the model included).

  python -m bench memory
"""
from __future__ import annotations

import json
import subprocess
import sys

from bench.common import SHARED_DATA, Row, print_table

VOC_MINI = SHARED_DATA / "voc_mini"

CASES = {
    "tokencut 4000x600": "tokencut(600, 4000)",
    "tokencut 6000x4000": "tokencut(4000, 6000)",
    "selfmask 20000x512": "selfmask(512, 20000)",
    "bilateral_solve 10000x10000": "bilateral(10000, 10000)",
    "bilateral_solve 10000x10000 noise": "bilateral(10000, 10000, noise=True)",
    "archive top-K merge 128k": "merge(128_000)",
    "archive top-K merge 1.28M": "merge(1_280_000)",
}

_CHILD = r'''
import json, sys, time
import torch

def tokencut(h, w):
    from namedmask.models.dino import build_vit
    from namedmask.models.saliency import TokenCut
    from namedmask.models.saliency.common import normalize
    model = TokenCut(build_vit("vit_small_patch16_224.dino"))  # ViT-S/16, random weights, short side 512
    image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    x = model.prepare(image)
    mask = model.predict(normalize([x]))
    return {"prepared": list(x.shape[:2]), "tokens": (x.shape[0] // 16) * (x.shape[1] // 16),
            "seconds": time.perf_counter() - t0}

def selfmask(h, w):
    from namedmask.models.dino import build_vit
    from namedmask.models.saliency import SelfMask, SelfMaskPredictor
    from namedmask.models.saliency.common import normalize
    torch.manual_seed(0)
    model = SelfMaskPredictor(SelfMask(build_vit("vit_small_patch8_224.dino")))  # ViT-S/8, random weights
    image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    x = model.prepare(image)
    mask = model.predict(normalize([x]))
    p = model.patch
    return {"prepared": list(x.shape[:2]), "tokens": -(-x.shape[0] // p) * -(-x.shape[1] // p),
            "seconds": time.perf_counter() - t0}

def bilateral(h, w, noise=False):
    """A smooth photo-like image (a real photo upsampled when voc_mini is there): a grid vertex
    per few pixels, as in photos; or i.i.d. noise, a vertex per pixel (the worst case: refused
    at max_vertices, the peak is what it takes to find out)."""
    from pathlib import Path
    from PIL import Image
    from namedmask import ops
    photos = sorted(Path(VOC_MINI, "JPEGImages").glob("*.jpg"))
    if noise:
        image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    elif photos:
        image = torch.from_numpy(__import__("numpy").asarray(Image.open(photos[0]).convert("RGB").resize((w, h), Image.BILINEAR)).copy())
    else:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        image = torch.stack([(xs * 255 // w), (ys * 255 // h), ((xs + ys) * 255 // (h + w))], -1).to(torch.uint8)
    target = torch.zeros(h, w)
    target[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1.0
    t0 = time.perf_counter()
    try:
        ops.bilateral_solve(image, target, backend="cpp")
        outcome = "solved"
    except ValueError as exc:
        outcome = str(exc)
    return {"seconds": time.perf_counter() - t0, "outcome": outcome[:120]}

def merge(images, dim=512, categories=21, k=500, shard=4096):
    from namedmask.data.archive import stream_top_k
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(categories, dim, generator=g), dim=1)
    def shards():
        for start in range(0, images, shard):
            n = min(shard, images - start)
            yield torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).half(), torch.arange(start, start + n)
    t0 = time.perf_counter()
    scores, index = stream_top_k(shards(), text, k)
    return {"seconds": time.perf_counter() - t0, "top": list(scores.shape)}

def hwm_mib():
    import re
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

base = hwm_mib()
out = eval(sys.argv[1])
out["peak_rss_MiB"] = hwm_mib()
out["rss_before_MiB"] = base
print(json.dumps(out))
'''


def run(names=None) -> list[Row]:
    rows = []
    for name, call in CASES.items():
        if names and name not in names:
            continue
        proc = subprocess.run([sys.executable, "-c", f"VOC_MINI = {str(VOC_MINI)!r}\n" + _CHILD, call],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append(Row(name, "cpu", "failed", float("nan"), None, None, {"error": proc.stderr.strip()[-300:]}))
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        extra = {"peak RSS": f"{got['peak_rss_MiB']:.0f} MiB (process with torch imported: {got['rss_before_MiB']:.0f})"}
        if "outcome" in got:
            extra["outcome"] = got["outcome"]
        if "tokens" in got:
            extra["prepared"] = f"{got['prepared'][0]}x{got['prepared'][1]}, {got['tokens']} tokens"
        rows.append(Row(name, "cpu", call, got["seconds"], None, None, extra))
        print(name, got, flush=True)
    return rows


if __name__ == "__main__":
    print_table(run(sys.argv[1:]), "peak memory")
