"""The GPU data path (#16 item 3): decoded batches land on the device a stage computes on and
stay there; the CPU contract is unchanged. No GPU here: the logic is checked with CPU stand-ins
(the "meta" device for where batches land; the CPU running the GPU path's code, with every host
transfer recorded), and the CUDA tests skip without a GPU."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from namedmask.data import decode
from namedmask.data.decode import Resize, iter_image_batches
from namedmask.models.saliency import common, tokencut
from namedmask.stages import archive as archive_stage
from namedmask.stages import saliency as stage
from namedmask.stages.saliency import SaliencyConfig

CUDA = torch.cuda.is_available()
TINY = dict(embed_dim=48, depth=2, num_heads=2)


@pytest.fixture
def photos(pool_dir) -> list:
    return sorted(p for p in pool_dir.iterdir() if p.suffix.lower() == ".jpg")[:5]


def _cpu_backends():
    return [b for b in ("pil", "simplejpeg", "cv2", "dali-cpu") if decode.why_not(b) is None]


@pytest.mark.parametrize("resize", [Resize(64, 64), None], ids=["resized", "native"])
def test_cpu_backends_deliver_batches_on_the_asked_device(photos, resize):
    """The default is the CPU contract (same pixels as device="cpu"); another device gets every
    image of the batch there ("meta" stands in for a GPU: shapes and dtype, no data)."""
    for backend in _cpu_backends():
        default = list(iter_image_batches(photos, 2, resize=resize, backend=backend))
        on_cpu = list(iter_image_batches(photos, 2, resize=resize, backend=backend, device="cpu"))
        on_meta = list(iter_image_batches(photos, 2, resize=resize, backend=backend, device="meta"))
        for a, b, m in zip(default, on_cpu, on_meta):
            assert a.indices == b.indices == m.indices and a.paths == m.paths
            imgs_a, imgs_b, imgs_m = ((x.images,) if resize else x.images for x in (a, b, m))
            for ia, ib, im in zip(imgs_a, imgs_b, imgs_m):
                assert ia.device.type == "cpu" and torch.equal(ia, ib)
                assert im.device.type == "meta" and im.shape == ia.shape and im.dtype == torch.uint8


def test_empty_batch_lands_on_the_device(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    (batch,) = iter_image_batches([bad], 4, resize=Resize(32, 32), on_error="skip", device="meta")
    assert batch.images.shape == (0, 3, 32, 32) and batch.images.device.type == "meta" and batch.failed


def test_archive_hands_decoded_batches_to_clip_as_they_come(tmp_path, photos, monkeypatch):
    """The batch the decoder yields (on CLIP's device) is the tensor CLIP encodes: no copy,
    no host round trip; only the [B, D] embeddings come back to be written."""
    from namedmask.config import ArchiveConfig
    from namedmask.models.clip import Clip

    pool = tmp_path / "pool"
    pool.mkdir()
    for p in photos:
        (pool / p.name).symlink_to(p)
    decoded, encoded, devices = [], [], []
    real_iter, real_encode = archive_stage.iter_image_batches, Clip.encode_images

    def spy_iter(*args, **kwargs):
        devices.append(kwargs.get("device"))
        for batch in real_iter(*args, **kwargs):
            decoded.append(batch.images)
            yield batch

    def spy_encode(self, images):
        encoded.append(images)
        return real_encode(self, images)

    monkeypatch.setattr(archive_stage, "iter_image_batches", spy_iter)
    monkeypatch.setattr(Clip, "encode_images", spy_encode)
    config = ArchiveConfig(str(pool), "voc", str(tmp_path / "out"), model="nm-tiny", k=2, batch_size=2,
                           shard_size=4)
    archive_stage.build_archive(config, progress=False)
    assert devices and all(d == torch.device("cpu") for d in devices)  # CLIP's device
    assert len(encoded) == len(decoded) == 3 and all(e is d for e, d in zip(encoded, decoded))


def _gpu_resize(image, short_side, multiple=None, resample="bilinear"):
    """resize_short_side as it runs on a GPU (torch's resize), for an image on the CPU."""
    return common.resize_tensor(image, common.short_side_size(*image.shape[:2], short_side, multiple), resample)


class HostTransfers:
    """Records the shapes of tensors read as host memory (.cpu(), .numpy()): no-ops or views on
    the CPU, each a copy from a GPU. (The stand-in device is the CPU, so .to(device) is not
    counted: on a GPU it is the copy towards the device.)"""

    def __init__(self, monkeypatch):
        self.shapes = []
        real_cpu, real_numpy = torch.Tensor.cpu, torch.Tensor.numpy

        def cpu(t, *a, **k):
            self.shapes.append(tuple(t.shape))
            return real_cpu(t, *a, **k)

        def numpy(t, *a, **k):
            self.shapes.append(tuple(t.shape))
            return real_numpy(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(torch.Tensor, "numpy", numpy)


@pytest.mark.parametrize("refine", ["none", "bilateral-solver"])
def test_saliency_keeps_images_on_the_device_until_the_native_mask(photos, monkeypatch, refine):
    """The saliency stage's per-batch path run as on a GPU (torch resize, the bilateral op's
    device glue), on CPU tensors: the only host copies are the TokenCut keys (the cut runs in
    scipy, [N, C]) and the finished native masks; no image, prepared image or low-resolution
    mask makes the round trip. The masks equal those of the same steps done one by one."""
    config = stage.resolve_config(SaliencyConfig("unused", "unused", refine=refine, short_side=48,
                                                 random_weights=True, vit_kwargs=TINY))
    model = stage.build_model(config)
    refiner = stage.bilateral_refiner(refine)
    (batch,) = iter_image_batches(photos[:3], 3, device=config.device)
    monkeypatch.setattr(tokencut, "resize_short_side", _gpu_resize)
    from namedmask.ops import bilateral
    monkeypatch.setattr(bilateral, "_on_cpu", lambda t: False)  # the glue a CUDA tensor takes

    # The same steps one image at a time, untracked: the expected masks.
    expected = []
    for img in batch.images:
        prepared = model.prepare(img)
        low = model.predict(common.normalize([prepared]))[0]
        if refiner is not None:
            low = refiner(prepared, low)
        native = torch.nn.functional.interpolate(low[None, None].to(torch.uint8), size=img.shape[:2])
        expected.append(native[0, 0])

    transfers = HostTransfers(monkeypatch)
    got = list(stage._predict_batch(model, refiner, ["a", "b", "c"], batch.images, config.device))
    monkeypatch.undo()

    assert [r for r, _, _ in got] == ["a", "b", "c"] and all(reason is None for _, _, reason in got)
    for (_, mask, _), want in zip(got, expected):
        assert np.array_equal(mask, want.numpy())
    natives = [tuple(img.shape[:2]) for img in batch.images]
    smallest_image = min(int(np.prod(model.prepare(img).shape[:2])) for img in batch.images)
    assert set(natives) <= set(transfers.shapes)
    # Nothing of an image's size crosses to the host but the native masks (the cut's keys,
    # affinity and eigenvector are a few hundred numbers here).
    big = [s for s in transfers.shapes if np.prod(s) >= smallest_image]
    assert set(big) == set(natives), transfers.shapes


@pytest.mark.parametrize("resample", ["bilinear", "lanczos"])
def test_gpu_resize_equals_pil(photos, resample):
    """The GPU path's resize (torch, any device) gives PIL's pixels exactly on the resizes the
    saliency models make (aspect kept: short side 512 / 100, TokenCut's multiples of 16), down
    and up, and on tiny images."""
    cases = []
    for p in photos[:3]:
        image = torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy())
        for side in (512, 100):
            for multiple in (None, 16):
                cases.append((image, common.short_side_size(*image.shape[:2], side, multiple)))
    g = torch.Generator().manual_seed(0)
    for shape, size in (((1, 1, 3), (5, 5)), ((2, 9, 3), (1, 4)), ((37, 1, 3), (74, 2)), ((7, 5, 3), (7, 5))):
        cases.append((torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), size))
    method = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resample]
    for image, (h, w) in cases:
        want = np.asarray(Image.fromarray(image.numpy()).resize((w, h), method))
        got = common.resize_tensor(image, (h, w), resample)
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want), (tuple(image.shape), (h, w))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_dali_gpu_batches_stay_on_the_gpu(photos):
    """"dali" with device=cuda: the batch is on the GPU and equals the host-contract batch."""
    if decode.why_not("dali"):
        pytest.skip(decode.why_not("dali"))
    for resize in (Resize(64, 64), None):
        host = list(iter_image_batches(photos, 2, resize=resize, backend="dali"))
        gpu = list(iter_image_batches(photos, 2, resize=resize, backend="dali", device="cuda"))
        for h, g in zip(host, gpu):
            for a, b in zip(*((x.images,) if resize else x.images for x in (h, g))):
                assert b.is_cuda and torch.equal(a, b.cpu())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cpu_decoded_batches_move_to_the_gpu_once(photos):
    (batch,) = iter_image_batches(photos[:2], 2, resize=Resize(32, 32), backend="pil", device="cuda")
    (host,) = iter_image_batches(photos[:2], 2, resize=Resize(32, 32), backend="pil")
    assert batch.images.is_cuda and torch.equal(batch.images.cpu(), host.images)
