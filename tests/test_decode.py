"""Image decoding: every live backend on real photos (same size, within the documented bound
of Pillow) and on a generated corpus of bad and odd files (each with its documented result)."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from namedmask.data import decode
from namedmask.data.decode import ImageDecodeError, Resize, iter_image_batches, load_image, resize_crop

CPU_EXACT = ("pil", "simplejpeg", "cv2")        # same decoded pixels as Pillow, same resize code
DALI = ("dali", "dali-cpu")
DALI_RESIZED_MEAN_BOUND = 0.5                   # per-image mean |DALI - Pillow| after resize (levels)
DALI_FULL_MEAN_BOUND = 1.0                      # per-image mean |DALI - Pillow| at full size (levels)


def backend_params():
    return [pytest.param(b, id=b, marks=[pytest.mark.skip(reason=decode.why_not(b))] if decode.why_not(b) else [])
            for b in decode.BACKENDS]


def decode_all(paths, backend, resize=None, batch_size=8, on_error="raise"):
    batches = list(iter_image_batches(paths, batch_size, resize=resize, backend=backend, on_error=on_error))
    if resize is not None:
        return torch.cat([b.images for b in batches]), batches
    return [img for b in batches for img in b.images], batches


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


@pytest.fixture(scope="module")
def real_photos(pool_dir, voc_mini):
    pool = sorted(pool_dir.glob("*.jpg"))
    return pool[::12] + sorted((voc_mini / "JPEGImages").glob("*.jpg"))[::3]   # 23 + 10 photos, mixed sizes


@pytest.fixture(scope="module")
def pil_reference(real_photos):
    full = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in real_photos]
    resized = torch.stack([resize_crop(img, Resize(224, 224)) for img in full])
    return full, resized


# ---------------------------------------------------------------------------------------------
# Real photos

@pytest.mark.parametrize("backend", backend_params())
def test_real_photos_full_size(backend, real_photos, pil_reference):
    images, batches = decode_all(real_photos, backend)
    assert sum(len(b.indices) for b in batches) == len(real_photos)
    assert [i for b in batches for i in b.indices] == list(range(len(real_photos)))
    for img, ref, path in zip(images, pil_reference[0], real_photos):
        assert img.dtype == torch.uint8 and img.shape == ref.shape, path
        if backend in CPU_EXACT:
            assert torch.equal(img, ref), path
        else:
            assert mean_abs_diff(img, ref) <= DALI_FULL_MEAN_BOUND, path


@pytest.mark.parametrize("backend", backend_params())
def test_real_photos_resized_clip_style(backend, real_photos, pil_reference):
    batch, _ = decode_all(real_photos, backend, resize=Resize(224, 224))
    ref = pil_reference[1]
    assert batch.shape == (len(real_photos), 3, 224, 224) and batch.dtype == torch.uint8
    if backend in CPU_EXACT:
        assert torch.equal(batch, ref)
    else:
        per_image = [mean_abs_diff(a, b) for a, b in zip(batch, ref)]
        assert max(per_image) <= DALI_RESIZED_MEAN_BOUND, per_image


@pytest.mark.parametrize("backend", backend_params())
def test_short_side_resize_without_crop(backend, real_photos):
    resize = Resize(100)
    for path in real_photos[:4]:
        (batch,) = list(iter_image_batches([path], 1, resize=resize, backend=backend))
        w, h = Image.open(path).size
        nw, nh = resize.output_size(w, h)
        assert batch.images.shape == (1, 3, nh, nw) and min(nh, nw) == 100  # DALI too: it is given the size


def test_load_image_matches_pillow(real_photos, pil_reference):
    for backend in ("pil",) + tuple(b for b in ("simplejpeg", "cv2") if decode.why_not(b) is None):
        assert torch.equal(load_image(real_photos[0], backend=backend), pil_reference[0][0])


# ---------------------------------------------------------------------------------------------
# Bad and odd files

def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """name -> (path, expected RGB array or the exception type)."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    smooth = np.stack(np.meshgrid(np.linspace(0, 255, 48), np.linspace(0, 255, 32)), -1)
    rgb = np.concatenate([smooth, smooth[..., :1] * 0 + 128], -1).astype(np.uint8)       # 32 x 48 gradient
    out = {}

    def put(name, data: bytes, expected):
        (d / name).write_bytes(data)
        out[name] = (d / name, expected)

    good = _jpeg_bytes(Image.fromarray(rgb))
    put("truncated.jpg", good[: len(good) // 2], ImageDecodeError)
    put("zero.jpg", b"", ImageDecodeError)
    put("text.jpg", b"this is not an image\n" * 10, ImageDecodeError)
    # CMYK JPEG: Pillow's CMYK -> RGB conversion is the reference.
    cmyk = Image.fromarray(rgb).convert("CMYK")
    put("cmyk.jpg", _jpeg_bytes(cmyk), np.asarray(Image.open(io.BytesIO(_jpeg_bytes(cmyk))).convert("RGB")))
    # 16-bit grayscale PNG: the top 8 bits, replicated to RGB.
    g16 = (rng.integers(0, 65536, (20, 30))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, "PNG")
    put("gray16.png", buf.getvalue(), np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, -1))
    # 16-bit RGB PNG (written by OpenCV, BGR order): the top 8 bits.
    cv2 = pytest.importorskip("cv2")
    rgb16 = rng.integers(0, 65536, (20, 30, 3)).astype(np.uint16)
    ok, enc = cv2.imencode(".png", rgb16[..., ::-1])
    put("rgb16.png", enc.tobytes(), (rgb16 >> 8).astype(np.uint8))
    # EXIF orientation 6 (= rotate 90° clockwise to display): a 32x48 JPEG shows as 48x32.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg_bytes(Image.fromarray(rgb), exif=exif.tobytes())
    raw = np.asarray(Image.open(io.BytesIO(rotated)).convert("RGB"))
    put("exif6.jpg", rotated, np.ascontiguousarray(np.rot90(raw, k=-1)))
    put("one.png", _png(Image.fromarray(np.array([[[10, 200, 30]]], np.uint8))), np.array([[[10, 200, 30]]], np.uint8))
    put("one.jpg", _jpeg_bytes(Image.fromarray(np.full((1, 1, 3), 90, np.uint8))), np.full((1, 1, 3), 90, np.uint8))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (32, 48, 1)).astype(np.uint8)], -1)
    put("rgba.png", _png(Image.fromarray(rgba, "RGBA")), rgb)                              # alpha dropped
    gray_jpeg = _jpeg_bytes(Image.fromarray(rgb[..., 1]))
    put("gray.jpg", gray_jpeg, np.repeat(np.asarray(Image.open(io.BytesIO(gray_jpeg)))[..., None], 3, -1))
    put("gray.png", _png(Image.fromarray(rgb[..., 0])), np.repeat(rgb[..., :1], 3, -1))
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    put("palette.png", _png(pal), np.asarray(pal.convert("RGB")))
    put("image.bmp", _encode(Image.fromarray(rgb), "BMP"), rgb)
    put("lossless.webp", _encode(Image.fromarray(rgb), "WEBP", lossless=True), rgb)
    put("plain.jpg", good, np.asarray(Image.open(io.BytesIO(good)).convert("RGB")))
    return out


def _encode(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(img) -> bytes:
    return _encode(img, "PNG")


@pytest.mark.parametrize("backend", backend_params())
def test_odd_files_each_give_the_documented_result(backend, odd_files):
    paths = [p for p, _ in odd_files.values()]
    images, batches = decode_all(paths, backend, batch_size=5, on_error="skip")
    failed = {str(p): reason for b in batches for p, reason in b.failed}
    decoded = dict(zip([p for b in batches for p in b.paths], images))
    for name, (path, expected) in odd_files.items():
        if expected is ImageDecodeError:
            assert str(path) in failed, f"{name} should fail"
            assert str(path) in failed[str(path)], "the reason names the file"
            continue
        img = decoded[path].numpy()
        assert img.dtype == np.uint8 and img.shape == expected.shape, name
        diff = np.abs(img.astype(int) - expected).mean()
        if backend in CPU_EXACT:
            assert diff == 0, name
        else:  # DALI: identical, except 16-bit inputs (it scales by 255/65535, we keep the top byte)
            assert diff <= (DALI_FULL_MEAN_BOUND if "16" in name else 0), (name, diff)
    assert len(failed) == 3


@pytest.mark.parametrize("backend", backend_params())
def test_bad_file_raises_naming_it(backend, odd_files, real_photos):
    path = odd_files["truncated.jpg"][0]
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        decode_all([real_photos[0], path], backend, batch_size=2)


@pytest.mark.parametrize("backend", backend_params())
def test_skip_mode_keeps_order_and_lists_failures(backend, odd_files, tmp_path, caplog):
    good = odd_files["plain.jpg"][0]
    bad = [odd_files["zero.jpg"][0], tmp_path / "missing.jpg", odd_files["text.jpg"][0]]
    paths = [good, bad[0], good, bad[1], bad[2], good]
    with caplog.at_level(logging.WARNING, logger="namedmask.data.decode"):
        batch, batches = decode_all(paths, backend, resize=Resize(16, 16), batch_size=4, on_error="skip")
    assert [i for b in batches for i in b.indices] == [0, 2, 5]
    assert [p for b in batches for p, _ in b.failed] == bad
    assert batch.shape == (3, 3, 16, 16)
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 3


@pytest.mark.parametrize("backend", backend_params())
def test_one_pixel_image_resized(backend, odd_files):
    batch, _ = decode_all([odd_files["one.png"][0]], backend, resize=Resize(224, 224))
    assert batch.shape == (1, 3, 224, 224)
    assert torch.equal(batch[0, :, 100, 100], torch.tensor([10, 200, 30], dtype=torch.uint8))


def test_load_image_errors(odd_files, tmp_path):
    with pytest.raises(ImageDecodeError, match="zero.jpg"):
        load_image(odd_files["zero.jpg"][0])
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.jpg")
    assert load_image(odd_files["exif6.jpg"][0]).shape == (48, 32, 3)


def test_early_stop_does_not_hang(real_photos):
    batches = iter_image_batches(real_photos * 4, 2, resize=Resize(32, 32), backend="pil")
    assert next(batches).images.shape == (2, 3, 32, 32)
    batches.close()


def test_empty_batch_with_resize_has_crop_shape(odd_files):
    (batch,) = list(iter_image_batches([odd_files["zero.jpg"][0]], 4, resize=Resize(8, 8), backend="pil",
                                       on_error="skip"))
    assert batch.images.shape == (0, 3, 8, 8) and len(batch.failed) == 1


# ---------------------------------------------------------------------------------------------
# Backend choice

def test_backend_choice(monkeypatch, caplog):
    assert decode.available_decoders()["pil"] == "live"
    monkeypatch.setattr(decode, "_AUTO_CHOICE", [])
    with caplog.at_level(logging.INFO, logger="namedmask.data.decode"):
        first = decode.resolve_backend("auto")
        assert decode.resolve_backend("auto") == first
    assert decode.why_not(first) is None
    assert len([r for r in caplog.records if "image decoding" in r.getMessage()]) == 1, "logged once"
    with pytest.raises(ValueError, match="unknown decode backend"):
        decode.resolve_backend("nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            decode.resolve_backend("dali")


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_error"):
        list(iter_image_batches([], 4, on_error="ignore"))
    with pytest.raises(ValueError, match="interpolation"):
        Resize(10, interpolation="nearest")


def test_import_does_not_load_dali():
    import subprocess
    import sys
    code = ("import sys, namedmask.data.decode as d, namedmask.data.datasets; import torch\n"
            "if not torch.cuda.is_available(): d.resolve_backend('auto')\n"
            "print('nvidia.dali' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_short_side_resize_sizes_are_torchvision_s():
    """The long side is truncated, as torchvision's Resize(int) (what open_clip and the official
    NamedMask/ReCo preprocessing run): 500x333 -> 336: int(336 * 500 / 333) = 504 (504.5 rounded is 505)."""
    import torchvision.transforms.functional as TF

    for w, h in ((500, 333), (333, 500), (640, 427), (427, 640), (336, 336), (1000, 3), (7, 5)):
        resize = Resize(336)
        expected_h, expected_w = TF._compute_resized_output_size((h, w), [336])
        assert resize.output_size(w, h) == (expected_w, expected_h), (w, h)
