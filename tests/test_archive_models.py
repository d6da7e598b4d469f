"""CLIP loading (open_clip): nm-tiny is reproducible, a local checkpoint file round-trips,
unobtainable weights fail at once with a usable message; prompt templates."""
import pytest
import torch
from safetensors.torch import save_file

from namedmask.models import clip as clip_module
from namedmask.models.clip import RANDOM, WeightsUnavailableError, load_clip
from namedmask.models.prompts import BUILTIN_TEMPLATES, SCENE_TEMPLATES, get_templates


def test_namedmask_templates():
    t = get_templates("namedmask")
    assert len(t) == 85 and len(set(t)) == 85 and all(x.count("{}") == 1 for x in t)
    assert t[0] == "a bad photo of a {}." and t[-5:] == SCENE_TEMPLATES
    assert "there is a {} in the scene." in t and "itap of my {}." in t
    assert get_templates("simple") == BUILTIN_TEMPLATES["simple"]


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\na picture of {}.\n\n{} in the wild\n")
    assert get_templates(str(f)) == ("a picture of {}.", "{} in the wild")
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="t.txt:1"):
        get_templates(str(f))
    with pytest.raises(ValueError, match="not one of"):
        get_templates("nope")


def test_tiny_model_is_reproducible():
    a, b = load_clip("nm-tiny"), load_clip("nm-tiny", RANDOM)
    assert a.pretrained == b.pretrained == RANDOM and a.image_size == 64 and a.embed_dim == 64
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), k
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    emb = a.encode_images(images)
    assert emb.shape == (3, 64) and torch.allclose(emb.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trips(tmp_path, suffix):
    base = load_clip("nm-tiny")
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in base.model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)  # a DDP training checkpoint
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_clip("nm-tiny", str(path))
    assert loaded.pretrained == str(path.resolve())
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    texts = ["a photo of a cat."]
    assert not torch.allclose(loaded.encode_texts(texts), base.encode_texts(texts))


def test_bad_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"nothing": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="wrong.safetensors"):
        load_clip("nm-tiny", str(path))


def test_unobtainable_weights_fail_at_once(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not try the network when offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(clip_module, "_cached_weights", lambda cfg: None)
    monkeypatch.setattr(clip_module.open_clip, "download_pretrained", no_download)
    with pytest.raises(WeightsUnavailableError, match="--pretrained /path/to/file") as err:
        load_clip("ViT-L-14-336", "openai")
    assert "HF_HUB_OFFLINE" in str(err.value) and "ViT-L-14-336-quickgelu" in str(err.value)


def test_unknown_names_and_tags():
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("ViT-XXL-99")
    with pytest.raises(ValueError, match="not a tag of nm-tiny"):
        load_clip("nm-tiny", "laion400m")
