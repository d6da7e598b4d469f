"""Image decoding used by every stage.

Contract every backend keeps: RGB uint8 [H, W, 3] tensors, EXIF orientation applied,
grayscale/CMYK/RGBA/palette/16-bit inputs converted to 8-bit RGB (alpha dropped, 16-bit
keeps the top 8 bits); JPEG/PNG/WebP/BMP accepted; a file that cannot be decoded raises
ImageDecodeError naming the file (or, with on_error="skip", is listed in ImageBatch.failed).

Backends (`available_decoders()` says which are live and why not):
  pil         Pillow; always there. Decodes every format; the reference.
  simplejpeg  libjpeg-turbo via simplejpeg for plain RGB/gray JPEGs without EXIF rotation,
  cv2         or via OpenCV; anything else goes through the Pillow path. Decoded pixels are
              identical to Pillow's (same libjpeg-turbo, same settings); resizing is Pillow's.
  dali-cpu    NVIDIA DALI, CPU operators (device_id=None): decode + resize in DALI.
  dali        NVIDIA DALI "mixed" decode (nvJPEG) + resize on the GPU; needs a GPU.
              For both, the centre crop is a torch slice rounded like torchvision's CenterCrop.
"auto" picks the fastest live backend (DALI on a GPU, else the CPU order measured by
bench/bench_decode.py) and logs the choice once.

Same pixels whatever the backend: the CPU backends give identical decoded images and, with
a Resize, identical batches (one Pillow resize for all). DALI decodes 8-bit files to the same
pixels as Pillow (measured: the 265-photo pool, CMYK, EXIF-rotated, gray, palette, RGBA, WebP,
BMP files: difference 0); 16-bit PNGs differ by <= 1 level (DALI scales by 255/65535, we keep
the top byte). DALI resamples with its own kernel: on the pool, Resize(224, 224) bicubic gives
a mean |DALI - Pillow| of 0.14 level (worst image 0.19, worst pixel 13); 336 bicubic 0.16
(0.23); 224 bilinear 0.13 (0.18). tests/test_decode.py holds DALI to <= 0.5 per image.

Where batches land (`device=`): by default every backend returns CPU tensors (the contract
the CPU stages use). A stage computing on a GPU passes its device instead: "dali" then hands
its GPU output to torch on that device (a device-to-device copy into memory torch owns, no
trip through host memory), and the CPU backends copy each decoded batch there once, from
pinned memory. Pixels do not depend on `device`.

CPU decoding runs in a thread pool (Pillow, OpenCV and simplejpeg release the GIL), with
the next batches decoded while the caller works on the current one."""
from __future__ import annotations

import functools
import importlib
import io
import logging
import os
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from namedmask.errors import InputError, SkippableItemError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BACKENDS = ("dali", "dali-cpu", "simplejpeg", "cv2", "pil")
# Fastest first on CPU, from bench/bench_decode.py (decode + resize 224 of the 265-photo pool).
CPU_PREFERENCE = ("simplejpeg", "cv2", "pil", "dali-cpu")
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(SkippableItemError):
    """A file that is not a decodable image; the message names it."""


@dataclass(frozen=True)
class Resize:
    """Resize the short side to `short_side` (aspect kept), then centre-crop `crop`×`crop`
    (None = no crop; a batch then needs equal sizes)."""
    short_side: int
    crop: int | None = None
    interpolation: str = "bicubic"  # or "bilinear"

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise InputError(f"Resize.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.short_side < 1 or (self.crop is not None and self.crop < 1):
            raise InputError(f"Resize sizes must be >= 1, got short_side={self.short_side}, crop={self.crop}")

    def output_size(self, width: int, height: int) -> tuple:
        """(width, height) after the short-side resize, before the crop: the long side truncated,
        as torchvision's Resize(int) computes it (open_clip's and the official code's preprocessing;
        rounding it moved the centre crop of 68 of the 265 pool photos by a pixel)."""
        if width <= height:
            return self.short_side, max(1, int(self.short_side * height / width))
        return max(1, int(self.short_side * width / height)), self.short_side


@dataclass
class ImageBatch:
    indices: list                   # positions in the input path list of the decoded images
    paths: list                     # their paths
    images: object                  # uint8 [B, 3, H, W] tensor with a Resize, else a list of [H, W, 3],
    #                                 on the device asked for (the CPU by default)
    failed: list = field(default_factory=list)  # (path, reason) of files that could not be decoded


# ---------------------------------------------------------------------------------------------
# Backend availability

@functools.lru_cache(maxsize=None)
def _import_error(module: str, install: str) -> str | None:
    """None if `module` imports, else why not. DALI is only imported here, when asked for
    (importing it takes ~1 s)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"{module} not importable ({type(exc).__name__}: {exc}); pip install {install}"
    return None


def why_not(backend: str) -> str | None:
    """None if `backend` is live here, else the reason it is not."""
    if backend == "pil":
        return None
    if backend == "simplejpeg":
        return _import_error("simplejpeg", "simplejpeg")
    if backend == "cv2":
        return _import_error("cv2", "opencv-python-headless")
    if backend == "dali-cpu":
        return _import_error("nvidia.dali", "nvidia-dali-cuda130")
    if backend == "dali":
        if not torch.cuda.is_available():
            return "needs a CUDA device"
        return _import_error("nvidia.dali", "nvidia-dali-cuda130")
    raise InputError(f"unknown decode backend {backend!r}; one of {BACKENDS} or 'auto'")


def available_decoders() -> dict:
    """{backend: "live" or the reason it is not}, for `namedmask info`."""
    return {b: why_not(b) or "live" for b in BACKENDS}


def auto_backend() -> str:
    """What backend="auto" means here: DALI on a GPU, else the fastest live CPU backend."""
    order = ("dali",) + CPU_PREFERENCE if torch.cuda.is_available() else CPU_PREFERENCE
    return next(b for b in order if why_not(b) is None)


_auto_lock = threading.Lock()
_AUTO_CHOICE: list = []


def resolve_backend(backend: str = "auto") -> str:
    """The backend that `backend` means here ("auto": see auto_backend; the choice is logged
    once per process). An explicitly named backend that is not live is an error."""
    if backend != "auto":
        reason = why_not(backend)
        if reason:
            raise RuntimeError(f"decode backend {backend!r} is not available: {reason}")
        return backend
    with _auto_lock:
        if not _AUTO_CHOICE:
            _AUTO_CHOICE.append(auto_backend())
            log.info("image decoding: %s (auto: %s)", _AUTO_CHOICE[0],
                     "GPU found" if torch.cuda.is_available() else f"no GPU; CPU order {', '.join(CPU_PREFERENCE)}")
        return _AUTO_CHOICE[0]


# ---------------------------------------------------------------------------------------------
# CPU decoding

def _decode_error(path, exc: Exception) -> ImageDecodeError:
    # Drop object reprs ("<_io.BytesIO object at 0x...>"): messages end up in reports that
    # must be identical from run to run.
    detail = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", str(exc))
    return ImageDecodeError(f"{path}: cannot decode image ({type(exc).__name__}: {detail})")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = Image.fromarray(arr.astype(np.uint8), "L")
    # (16-bit RGB(A) PNGs are already reduced to their top 8 bits by Pillow on load.)
    return img.convert("RGB") if img.mode != "RGB" else img


def _pil_decode(data: bytes) -> Image.Image:
    # No `with`: closing a Pillow image frees its pixels, and this one is returned.
    img = _to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    img.load()
    return img


def _is_plain_jpeg(data: bytes) -> bool:
    """A JPEG that a raw libjpeg-turbo decode renders exactly like Pillow: RGB or gray (not
    CMYK) and no EXIF rotation. Reads only the header."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in ("RGB", "L") and img.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:
        return False  # the Pillow path will raise a proper error


def _simplejpeg_decode(data: bytes) -> np.ndarray:
    import simplejpeg
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def _cv2_decode(data: bytes) -> np.ndarray:
    import cv2
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        raise ValueError("OpenCV could not decode the data")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


_FAST_JPEG = {"simplejpeg": _simplejpeg_decode, "cv2": _cv2_decode}


def _decode_cpu(path, backend: str = "pil") -> np.ndarray | Image.Image:
    """An H×W×3 uint8 RGB array (fast JPEG path) or an RGB Pillow image (saves a copy when
    it is resized next); ImageDecodeError naming the file on failure."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _decode_error(path, exc) from exc
    if not data:
        raise ImageDecodeError(f"{path}: cannot decode image (empty file)")
    try:
        if backend in _FAST_JPEG and _is_plain_jpeg(data):
            arr = _FAST_JPEG[backend](data)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise ValueError(f"decoder returned {arr.dtype} {arr.shape}, not H×W×3 uint8")
            return arr
        return _pil_decode(data)
    except Exception as exc:  # decoders raise many types for bad files
        raise _decode_error(path, exc) from exc


def load_image(path: str | Path, backend: str = "pil") -> torch.Tensor:
    """uint8 RGB tensor [H, W, 3] (CPU decoders: "pil", "simplejpeg", "cv2" - same pixels)."""
    if backend not in _FAST_JPEG and backend != "pil":
        raise InputError(f"load_image decodes on CPU: backend 'pil', 'simplejpeg' or 'cv2', got {backend!r}")
    return _as_tensor(_decode_cpu(path, backend))


def _as_tensor(img: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 [H, W, 3] tensor owning writable memory."""
    return torch.from_numpy(np.array(img) if isinstance(img, Image.Image) else np.ascontiguousarray(img))


def resize_crop(img: np.ndarray | torch.Tensor | Image.Image, resize: Resize) -> torch.Tensor:
    """uint8 [3, H, W]: Pillow short-side resize (antialiased) + centre crop, CLIP-style."""
    if isinstance(img, Image.Image):
        pil = img
    else:
        pil = Image.fromarray(img.numpy() if isinstance(img, torch.Tensor) else img)
    nw, nh = resize.output_size(*pil.size)
    method = Image.BICUBIC if resize.interpolation == "bicubic" else Image.BILINEAR
    pil = pil.resize((nw, nh), method)
    if resize.crop:
        left, top = _crop_origin(nw, nh, resize.crop)
        pil = pil.crop((left, top, left + resize.crop, top + resize.crop))  # pads black if the crop is larger
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def _crop_origin(width: int, height: int, crop: int) -> tuple:
    """Top-left corner of a centred crop, rounded like torchvision's CenterCrop (half to even)."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def _centre_crop_chw(img: torch.Tensor, crop: int) -> torch.Tensor:
    """The same centred crop as resize_crop on a [3, H, W] tensor (zero padding if smaller),
    on the tensor's device."""
    _, h, w = img.shape
    left, top = _crop_origin(w, h, crop)
    out = torch.zeros(img.shape[0], crop, crop, dtype=img.dtype, device=img.device)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + crop, h), min(left + crop, w)
    out[:, y0 - top:y1 - top, x0 - left:x1 - left] = img[:, y0:y1, x0:x1]
    return out


def _decode_task(path, backend: str, resize: Resize | None):
    """(image, None) or (None, (path, reason)); never raises for a bad file."""
    try:
        img = _decode_cpu(path, backend)
    except (ImageDecodeError, FileNotFoundError) as exc:
        return None, exc
    return (_as_tensor(img) if resize is None else resize_crop(img, resize)), None


def _stack(images: list, resize: Resize, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    if images:
        return torch.stack(images)
    c = resize.crop or 0
    return torch.zeros(0, 3, c, c, dtype=torch.uint8, device=device)


def _to_device(images, device: torch.device):
    """A decoded batch (a tensor or a list of them) moved to `device`. To a GPU: a host copy into
    pinned memory, then an asynchronous copy to the device (the decoding of the next batch
    overlaps it; torch's pinned allocator keeps the source alive until the copy is done); a
    pageable .to() would stage through pinned memory as well, but synchronously. Tensors already
    there are returned as they are."""
    if isinstance(images, list):
        return [_to_device(img, device) for img in images]
    if images.device == device:
        return images
    if device.type == "cuda" and images.device.type == "cpu":
        return images.pin_memory().to(device, non_blocking=True)
    return images.to(device)


def decode_threads() -> int:
    """Threads for CPU decoding: $NAMEDMASK_DECODE_THREADS, else the CPUs this process may use."""
    env = os.environ.get("NAMEDMASK_DECODE_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _iter_cpu(paths, batch_size, resize, backend, on_error, threads, device, prefetch_batches=2):
    threads = threads or decode_threads()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        try:
            yield from _ordered_batches(paths, batch_size, resize, backend, on_error, pool, pending,
                                        batch_size * (1 + prefetch_batches), device)
        finally:  # a consumer that stops early (or an error) must not wait for the look-ahead
            for future in pending:
                future.cancel()


def _ordered_batches(paths, batch_size, resize, backend, on_error, pool, pending, limit, device):
    """Batches in input order; keeps up to `limit` images decoding ahead of the consumer."""
    next_i = 0
    for start in range(0, len(paths), batch_size):
        stop = min(start + batch_size, len(paths))
        while next_i < len(paths) and next_i < start + limit:
            pending.append(pool.submit(_decode_task, paths[next_i], backend, resize))
            next_i += 1
        batch = ImageBatch([], [], [], [])
        for i in range(start, stop):
            image, exc = pending.popleft().result()
            if exc is not None:
                if on_error == "raise":
                    raise exc
                log.warning("skipping %s", exc)
                batch.failed.append((paths[i], str(exc)))
                continue
            batch.indices.append(i)
            batch.paths.append(paths[i])
            batch.images.append(image)
        if resize is not None:
            batch.images = _stack(batch.images, resize)
        batch.images = _to_device(batch.images, device)
        yield batch


# ---------------------------------------------------------------------------------------------
# DALI

class _DaliDecoder:
    """One DALI pipeline: encoded bytes in (external source), RGB uint8 out, optionally
    resized (short side, antialiased) and centre-cropped to CHW. device="gpu" decodes with
    nvJPEG ("mixed") and resamples on the GPU."""

    def __init__(self, batch_size: int, resize: Resize | None, gpu: bool, threads: int,
                 device: torch.device = torch.device("cpu")):
        from nvidia.dali import fn, pipeline_def, types

        # A GPU pipeline decodes on the GPU the batches are wanted on (else the current one).
        device_id = (device.index if device.type == "cuda" and device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        interp = types.INTERP_CUBIC if resize and resize.interpolation == "bicubic" else types.INTERP_LINEAR

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=True)
            if resize is not None:  # the output size given per image (resize.output_size): DALI's own
                #                          resize_shorter rounds the long side where torchvision truncates it
                size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
                img = fn.resize(img, size=size, interp_type=interp, antialias=True, subpixel_scale=False)
                img = fn.transpose(img, perm=[2, 0, 1])  # the crop is done in torch: DALI rounds its
                #                                            origin differently from torchvision
            return img

        self.gpu = gpu
        # GPU output handed to torch on its GPU, unless the caller wants host tensors.
        self.device = torch.device("cuda", device_id) if gpu and device.type == "cuda" else torch.device("cpu")
        self.crop = resize.crop if resize else None
        self.resize = resize
        self.pipe = pipeline()
        self.pipe.build()

    def __call__(self, encoded: list) -> list:
        """Tensors for the encoded images, in order, on self.device; raises if any fails to decode."""
        self.pipe.feed_input("encoded", encoded)
        if self.resize is not None:
            self.pipe.feed_input("size", [np.array(self.resize.output_size(*_oriented_size(e))[::-1], np.float32)
                                          for e in encoded])  # [H, W], the HWC layout's order
        (out,) = self.pipe.run()
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            images = [_dali_gpu_to_torch(out[i], stream) for i in range(len(encoded))]
            # DALI may reuse or free its output memory (on its own stream) once `out` is released.
            stream.synchronize()
        else:
            out = out.as_cpu() if self.gpu else out
            images = [torch.from_numpy(np.array(out[i])) for i in range(len(encoded))]
        return [_centre_crop_chw(img, self.crop) for img in images] if self.crop else images


def _oriented_size(encoded) -> tuple:
    """(width, height) of an encoded image as decoded upright (EXIF orientation applied), read
    from its header only."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded.tobytes() if hasattr(encoded, "tobytes") else bytes(encoded))) as im:
        w, h = im.size
        transposed = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # rotated by 90 degrees
    return (h, w) if transposed else (w, h)


def _dali_gpu_to_torch(sample, stream) -> torch.Tensor:
    """One sample of a DALI GPU batch as a torch tensor on the stream's GPU: copied device to
    device on torch's stream `stream` into memory torch owns."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty(sample.shape(), dtype=torch.uint8, device=stream.device)
    return feed_ndarray(sample, out, cuda_stream=stream)


def _iter_dali(paths, batch_size, resize, gpu, on_error, threads, device):
    threads = threads or decode_threads()
    decoder = _DaliDecoder(batch_size, resize, gpu, threads, device)
    name = "dali" if gpu else "dali-cpu"
    for start in range(0, len(paths), batch_size):
        failed = {}                             # index -> reason
        good, encoded = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                data = Path(paths[i]).read_bytes()
                if not data:
                    raise ImageDecodeError(f"{paths[i]}: cannot decode image (empty file)")
            except (OSError, ImageDecodeError) as exc:
                if on_error == "raise":
                    raise
                failed[i] = str(exc)
                continue
            good.append(i)
            encoded.append(np.frombuffer(data, np.uint8))
        images = {}
        try:
            images = dict(zip(good, decoder(encoded))) if good else {}
        except Exception as exc:  # DALI fails a whole batch; find the culprits one by one
            log.debug("%s failed on a batch (%s); decoding its images one at a time", name, exc)
            decoder = _DaliDecoder(batch_size, resize, gpu, threads, device)
            for k, i in enumerate(good):
                try:
                    _decode_cpu(paths[i], "pil")  # proves the file is broken, with a clear reason
                except ImageDecodeError as bad:
                    if on_error == "raise":
                        raise
                    failed[i] = str(bad)
                    continue
                try:
                    images[i] = decoder([encoded[k]])[0]
                except Exception as dali_exc:  # Pillow reads it, DALI does not: say so, use Pillow
                    log.warning("%s cannot decode %s (%s); decoded with Pillow", name, paths[i], dali_exc)
                    decoder = _DaliDecoder(batch_size, resize, gpu, threads, device)
                    images[i] = _decode_task(paths[i], "pil", resize)[0].to(decoder.device)
        for i, reason in failed.items():
            log.warning("skipping %s", reason)
        batch = ImageBatch(sorted(images), [paths[i] for i in sorted(images)], [images[i] for i in sorted(images)],
                           [(paths[i], failed[i]) for i in sorted(failed)])
        if resize is not None:
            batch.images = _stack(batch.images, resize, decoder.device)
        batch.images = _to_device(batch.images, device)  # no-op unless DALI decoded elsewhere
        yield batch


# ---------------------------------------------------------------------------------------------

def iter_image_batches(paths: Sequence, batch_size: int, *, resize: Resize | None = None, backend: str = "auto",
                       on_error: str = "raise", threads: int | None = None,
                       device: str | torch.device | None = None) -> Iterator[ImageBatch]:
    """Decodes `paths` in order, `batch_size` at a time. on_error="skip" logs undecodable
    files and lists them in ImageBatch.failed instead of raising (callers must report them).
    `threads`: decoding threads (default: decode_threads()). `device`: where the images are
    returned (default the CPU; a GPU stage passes its own device, see the module notes)."""
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    paths = list(paths)
    device = torch.device(device if device is not None else "cpu")
    backend = resolve_backend(backend)
    if backend in ("dali", "dali-cpu"):
        return _iter_dali(paths, batch_size, resize, backend == "dali", on_error, threads, device)
    return _iter_cpu(paths, batch_size, resize, backend, on_error, threads, device)


def load_images(paths: Sequence, resize: Resize | None = None, backend: str = "auto", batch_size: int = 64):
    """All images at once: a uint8 [N, 3, H, W] tensor with a Resize, else a list of [H, W, 3].
    Raises ImageDecodeError on the first bad file."""
    batches = list(iter_image_batches(paths, batch_size, resize=resize, backend=backend))
    if resize is not None:
        return torch.cat([b.images for b in batches]) if batches else _stack([], resize)
    return [img for b in batches for img in b.images]
