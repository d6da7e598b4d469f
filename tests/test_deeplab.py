"""DeepLabv3+ R50-OS8: architecture (parameter count from the layer formulas, output shapes,
dilations, BN momentum), the official NamedMask layout (strict load, same logits), strict
DINO-ResNet-50 loading, safetensors round trip."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from namedmask.config import ModelConfig, from_dict, parse_overrides
from namedmask.models.deeplab import (DeepLabV3Plus, ModelError, build_model, load_backbone_weights,
                                      load_official_state_dict, load_segmenter, save_segmenter)
from synthetic import tiny_model_overrides


def tiny_cfg() -> ModelConfig:
    return from_dict(ModelConfig, parse_overrides([o.removeprefix("model.") for o in tiny_model_overrides()]))


def head_parameter_count(num_classes, high=2048, low=256, c=256, low_c=48, rates=3, decoder_convs=1):
    """The head of DeepLabv3+ as specified, counted by hand (convs without bias, BN = 2 per channel)."""
    conv_bn = lambda cin, cout: cin * cout + 2 * cout  # noqa: E731
    separable = lambda cin, cout: 9 * cin + cin * cout + 2 * cout  # noqa: E731
    aspp = conv_bn(high, c) + rates * separable(high, c) + conv_bn(high, c) + conv_bn(5 * c, c)
    decoder = conv_bn(low, low_c) + separable(c + low_c, c) + (decoder_convs - 1) * separable(c, c)
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
    # 26_682_725 with the former two-conv decoder, less one separable 256->256 conv + BN (68_352)
    assert sum(p.numel() for p in r50.parameters()) == 23_508_032 + head_parameter_count(21) == 26_614_373
    wider = DeepLabV3Plus(21, ModelConfig(decoder_convs=2))  # the explicit extra-capacity option
    assert sum(p.numel() for p in wider.head_parameters()) == head_parameter_count(21, decoder_convs=2)


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
    aspp = r50.classifier.aspp
    assert [b[0].body[0].dilation for b in aspp.convs[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert all(b[0].body[0].groups == b[0].body[0].in_channels for b in aspp.convs[1:4])  # depthwise
    assert r50.classifier.project[0].out_channels == 48
    decoder = r50.classifier.classifier  # one separable conv 304 -> 256 + BN + ReLU, then the classifier
    assert decoder[0].body[0].in_channels == 304 and decoder[0].body[1].out_channels == 256
    assert len(decoder) == 4 and decoder[3].kernel_size == (1, 1) and decoder[3].out_channels == 21
    # BN momentum 0.01 in the backbone only; the head keeps 0.1 (official set_bn_momentum(network.backbone))
    assert {m.momentum for m in r50.backbone.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    assert {m.momentum for m in r50.classifier.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


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


# ---------------------------------------------------------------- the official layout

class _OfficialSeparable(nn.Module):
    """As the official AtrousSeparableConvolution after convert_to_separable_conv (no bias)."""

    def __init__(self, cin, cout, padding, dilation):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=padding, dilation=dilation, groups=cin, bias=False),
                                  nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x):
        return self.body(x)


class _OfficialPooling(nn.Sequential):
    def forward(self, x):
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class _OfficialHead(nn.Module):
    """DeepLabHeadV3Plus of NoelShin/namedmask networks/deeplab/_deeplab.py, separable."""

    def __init__(self, num_classes, rates=(12, 24, 36)):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(256, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        aspp = nn.Module()
        aspp.convs = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(2048, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU())]
            + [nn.Sequential(_OfficialSeparable(2048, 256, r, r), nn.BatchNorm2d(256), nn.ReLU()) for r in rates]
            + [_OfficialPooling(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2048, 256, 1, bias=False), nn.BatchNorm2d(256),
                                nn.ReLU())])
        aspp.project = nn.Sequential(nn.Conv2d(1280, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                                     nn.Dropout(0.1))
        self.aspp = aspp
        self.classifier = nn.Sequential(_OfficialSeparable(304, 256, 1, 1), nn.BatchNorm2d(256), nn.ReLU(),
                                        nn.Conv2d(256, num_classes, 1))

    def forward(self, low, high):
        a = self.aspp.project(torch.cat([conv(high) for conv in self.aspp.convs], dim=1))
        low = self.project(low)
        a = F.interpolate(a, size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, a], dim=1))


class _OfficialDeepLab(nn.Module):
    """deeplabv3plus_resnet50(output_stride=8): backbone = an IntermediateLayerGetter over
    torchvision's ResNet-50 (children up to layer4), classifier = the head."""

    def __init__(self, num_classes):
        super().__init__()
        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        self.backbone = nn.ModuleDict({k: getattr(net, k) for k in
                                       ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")})
        self.classifier = _OfficialHead(num_classes)

    def forward(self, x):
        y = x
        for name, m in self.backbone.items():
            y = m(y)
            if name == "layer1":
                low = y
        return F.interpolate(self.classifier(low, y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights and BN statistics (running stats too, so eval mode is not an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.1))


def test_official_layout_loads_strictly_with_the_same_logits(tmp_path):
    official = _OfficialDeepLab(5).eval()
    _randomise(official, 3)
    path = tmp_path / "final_model.pt"
    torch.save(official.state_dict(), path)  # as the official trainer saves it
    ours = DeepLabV3Plus(5, ModelConfig()).eval()
    assert set(ours.state_dict()) == set(official.state_dict())  # same key names, no extra, none missing
    load_official_state_dict(ours, path)
    x = torch.randn(1, 3, 61, 77, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = official(x), ours(x)
    # same ops in the same order; only float summation order may differ between the two modules
    assert got.shape == want.shape == (1, 5, 61, 77)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # a DataParallel prefix is unwrapped; another head layout is a clear error
    load_official_state_dict(ours, {f"module.{k}": v for k, v in official.state_dict().items()})
    with pytest.raises(ModelError, match="decoder_convs 2"):
        load_official_state_dict(DeepLabV3Plus(5, ModelConfig(decoder_convs=2)), path)


def test_segmenter_of_the_old_head_layout_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(tiny_cfg(), 4)
    save_segmenter(tmp_path, model, ["background", "a", "b", "c"])
    state = {("decoder.0.0.weight" if k.startswith("classifier.classifier.0") else k): v
             for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="older namedmask"):
        load_segmenter(tmp_path)
