"""DeepLabv3+ R50-OS8: architecture (parameter count from the layer formulas, output shapes,
dilations, BN momentum), strict DINO-ResNet-50 loading, safetensors round trip."""
import pytest
import torch
import torchvision

from namedmask.config import ModelConfig, from_dict, parse_overrides
from namedmask.models.deeplab import (DeepLabV3Plus, ModelError, build_model, load_backbone_weights,
                                      load_segmenter, save_segmenter)
from synthetic import tiny_model_overrides


def tiny_cfg() -> ModelConfig:
    return from_dict(ModelConfig, parse_overrides([o.removeprefix("model.") for o in tiny_model_overrides()]))


def head_parameter_count(num_classes, high=2048, low=256, c=256, low_c=48, rates=3):
    """The head of DeepLabv3+ as specified, counted by hand (convs without bias, BN = 2 per channel)."""
    conv_bn = lambda cin, cout: cin * cout + 2 * cout  # noqa: E731
    separable = lambda cin, cout: 9 * cin + cin * cout + 2 * cout  # noqa: E731
    aspp = conv_bn(high, c) + rates * separable(high, c) + conv_bn(high, c) + conv_bn(5 * c, c)
    decoder = conv_bn(low, low_c) + separable(c + low_c, c) + separable(c, c)
    return aspp + decoder + c * num_classes + num_classes


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return DeepLabV3Plus(21, ModelConfig())


def test_r50_os8_parameter_count(r50):
    resnet50 = torchvision.models.resnet50(weights=None)
    backbone_want = sum(p.numel() for n, p in resnet50.named_parameters() if not n.startswith("fc."))
    assert backbone_want == 23_508_032
    assert sum(p.numel() for p in r50.backbone.parameters()) == backbone_want
    head = sum(p.numel() for p in r50.head_parameters())
    assert head == head_parameter_count(21)
    assert sum(p.numel() for p in r50.parameters()) == 23_508_032 + head_parameter_count(21) == 26_682_725


def test_r50_os8_shapes_dilations_bn(r50):
    r50.eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        low, high = r50.backbone(x)
        logits = r50(x)
        odd = r50(torch.randn(1, 3, 61, 77))
    assert low.shape == (1, 256, 16, 20)          # layer1: stride 4
    assert high.shape == (1, 2048, 8, 10)         # layer4: output stride 8
    assert logits.shape == (1, 21, 64, 80) and odd.shape == (1, 21, 61, 77)
    assert r50.backbone.layer2[0].conv2.stride == (2, 2)
    assert r50.backbone.layer3[0].conv2.stride == (1, 1) and r50.backbone.layer3[1].conv2.dilation == (2, 2)
    assert r50.backbone.layer4[0].conv2.stride == (1, 1) and r50.backbone.layer4[1].conv2.dilation == (4, 4)
    assert [b[0].dilation for b in r50.aspp.branches[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert r50.low_level[0].out_channels == 48
    assert all(m.groups == m.in_channels for b in r50.aspp.branches[1:4] for m in b[:1])  # depthwise
    assert {m.momentum for m in r50.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def dino_rn50_state(seed=1) -> dict:
    """A random ResNet-50 saved like DINO's dino_resnet50_pretrain.pth (torchvision keys, no fc)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def test_dino_rn50_loads_strictly(tmp_path, r50):
    state = dino_rn50_state()
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(pretrained=str(path)), 21)
    got = model.backbone.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    # a DDP-style prefix and a classifier are tolerated (fc is dropped by name, nothing else)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()} | {"module.fc.weight": torch.zeros(3)}},
               path)
    load_backbone_weights(r50.backbone, path)


@pytest.mark.parametrize("edit", ["missing", "unexpected", "shape"])
def test_dino_rn50_mismatch_is_an_error(tmp_path, r50, edit):
    state = dino_rn50_state()
    if edit == "missing":
        state.pop("layer3.2.bn2.running_var")
    elif edit == "unexpected":
        state["head.proj.weight"] = torch.zeros(4)
    else:
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises((ModelError, RuntimeError), match="bad.pth|size mismatch"):
        load_backbone_weights(r50.backbone, path)


def test_torchvision_backbone_rejects_timm_args():
    with pytest.raises(ModelError, match="backbone_args"):
        DeepLabV3Plus(3, ModelConfig(backbone_args={"channels": [8, 8, 8, 8]}))


def test_small_config_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), 4).eval()
    names = ["background", "disc", "square", "triangle"]
    save_segmenter(tmp_path, model, names)
    loaded, meta = load_segmenter(tmp_path)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["class_names"] == names and meta["class_ids"] == [0, 1, 2, 3]
    assert meta["model"]["backbone"] == "resnet10t"
    with pytest.raises(ModelError, match="no trained segmenter"):
        load_segmenter(tmp_path / "nowhere")
