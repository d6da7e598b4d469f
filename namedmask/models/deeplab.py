"""DeepLabv3+ (Chen et al. 2018) exactly as NamedMask trains it: ResNet backbone at output
stride 8 (layer3 dilation 2, layer4 dilation 4), ASPP with rates 12/24/36 + image pooling, a
48-channel projection of layer1 features, decoder = concat [low-level 48, ASPP 256] -> one
depthwise-separable 3x3 conv 304->256 + BN + ReLU -> 1x1 classifier, logits upsampled to the
input size. BN momentum 0.01 in the backbone only (the head's BNs keep PyTorch's 0.1), head
convs Kaiming-normal initialised: the official code's set_bn_momentum(network.backbone) and
_init_weight.

Module and key names are the official ones (NoelShin/namedmask networks/deeplab: backbone.*,
classifier.project/aspp/classifier), so an official `final_model.pt` state dict loads strictly
(`load_official_state_dict`). `decoder_convs: 2` (ModelConfig) adds a second separable conv
to the decoder: extra capacity, off by default.

Backbones: torchvision ResNet-50/101/152 (the key layout of DINO's `dino_resnet50_pretrain.pth`,
loaded strictly) or any timm ResNet (e.g. resnet18, whose BasicBlocks torchvision cannot
dilate) for small CPU configurations.

A trained segmenter is stored as `model.safetensors` (weights) + `model.json` (model config,
class names and ids) in its run directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from namedmask import io
from namedmask.config import ModelConfig, from_dict, to_dict
from namedmask.errors import BadInputError

log = logging.getLogger(__name__)

TORCHVISION_RESNETS = ("resnet50", "resnet101", "resnet152")
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"


class ModelError(BadInputError):
    """A backbone name, weight file or run directory that cannot be used."""


def _dilation_flags(output_stride: int) -> list:
    flags = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
    if output_stride not in flags:
        raise ModelError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return flags[output_stride]


class TorchvisionResNet(nn.Module):
    """torchvision ResNet without avgpool/fc: state-dict keys are exactly torchvision's
    (conv1, bn1, layer1..4), the layout DINO-ResNet-50 is released in."""

    def __init__(self, name: str, output_stride: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None,
                                                 replace_stride_with_dilation=_dilation_flags(output_stride))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (256, 2048)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


class TimmResNet(nn.Module):
    """Any timm ResNet-style model; features of stride 4 (low level) and the last stage."""

    def __init__(self, name: str, output_stride: int, args: dict | None = None):
        super().__init__()
        import timm

        _dilation_flags(output_stride)
        try:
            self.features = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 4),
                                              output_stride=output_stride, **(args or {}))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ModelError(f"backbone {name!r}: cannot build it with timm at output stride "
                             f"{output_stride} ({exc})") from exc
        self.channels = tuple(self.features.feature_info.channels())

    def forward(self, x):
        low, high = self.features(x)
        return low, high


def build_backbone(name: str, output_stride: int, args: dict | None = None) -> nn.Module:
    if name in TORCHVISION_RESNETS:
        if args:
            raise ModelError(f"backbone {name!r} is built by torchvision and takes no backbone_args, got {args}")
        return TorchvisionResNet(name, output_stride)
    return TimmResNet(name, output_stride, args)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeparableConv(nn.Module):
    """Depthwise 3x3 (dilated) + pointwise 1x1, no bias; `body.0` / `body.1` as the official
    AtrousSeparableConvolution."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
                                  nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x):
        return self.body(x)


def separable_conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(SeparableConv(cin, cout, dilation), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ImagePooling(nn.Sequential):
    """Global average pool -> 1x1 conv + BN + ReLU, broadcast back to the input size (the
    official bilinear upsampling of a 1x1 map is this same constant)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))

    def forward(self, x):
        return super().forward(x).expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList([conv_bn_relu(cin, cout)] + [separable_conv_bn_relu(cin, cout, r) for r in rates]
                                   + [ImagePooling(cin, cout)])
        self.project = nn.Sequential(nn.Conv2d(cout * len(self.convs), cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHeadV3Plus(nn.Module):
    """project (low level) + aspp (high level) -> classifier: [separable conv + BN + ReLU] x
    decoder_convs, then the 1x1 classifier conv (the last module of `classifier`)."""

    def __init__(self, high_ch: int, low_ch: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        c, low_c = cfg.aspp_channels, cfg.low_level_channels
        if cfg.decoder_convs < 1:
            raise ModelError(f"model.decoder_convs must be >= 1, got {cfg.decoder_convs}")
        self.project = conv_bn_relu(low_ch, low_c)
        self.aspp = ASPP(high_ch, c, cfg.aspp_rates, cfg.dropout)
        decoder = [m for i in range(cfg.decoder_convs) for m in separable_conv_bn_relu(low_c + c if i == 0 else c, c)]
        self.classifier = nn.Sequential(*decoder, nn.Conv2d(c, num_classes, 1))
        for m in self.modules():  # as the official _init_weight (the last conv's bias keeps PyTorch's init)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.project(low)
        y = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, y], dim=1))


class DeepLabV3Plus(nn.Module):
    def __init__(self, num_classes: int, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.num_classes = cfg, num_classes
        self.backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.backbone_args)
        low_ch, high_ch = self.backbone.channels
        self.classifier = DeepLabHeadV3Plus(high_ch, low_ch, num_classes, cfg)
        for m in self.backbone.modules():  # the head's BNs keep 0.1, as the official code
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = cfg.bn_momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images -> [B, num_classes, H, W] logits."""
        low, high = self.backbone(x)
        return F.interpolate(self.classifier(low, high), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]


def load_official_state_dict(model: DeepLabV3Plus, path_or_state) -> None:
    """Strict load of an official NamedMask segmenter (`final_model.pt`: the state dict of
    deeplabv3plus_resnet50 after convert_to_separable_conv) or of any state dict in this
    module's layout; a `module.` prefix (DataParallel) is unwrapped."""
    state = path_or_state
    if not isinstance(state, dict):
        try:
            state = torch.load(Path(state), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path_or_state}: cannot read segmenter weights ({exc})") from exc
    state = {k.removeprefix("module."): v for k, v in state.items()}
    _load_strict(model, state, "state dict" if isinstance(path_or_state, dict) else str(path_or_state))


def _load_strict(model: DeepLabV3Plus, state: dict, where: str) -> None:
    if any(k.startswith(("aspp.branches.", "decoder.")) for k in state):
        raise ModelError(f"{where}: written by an older namedmask (head layout before the official one: "
                         f"aspp.branches/decoder/low_level keys); retrain it with this version")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelError(f"{where}: does not match DeepLabV3Plus({model.num_classes} classes, "
                         f"{model.cfg.backbone}, decoder_convs {model.cfg.decoder_convs}): "
                         f"{detail[:400]}{'...' if len(detail) > 400 else ''}") from None


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Strict load of a local backbone file in torchvision key layout (DINO's
    dino_resnet50_pretrain.pth). A `state_dict`/`model` wrapper and a `module.` prefix are
    unwrapped; classifier keys (fc.*) are dropped since the segmenter has no classifier;
    any other missing or unexpected key is an error."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: backbone weights not found") from None
    except Exception as exc:
        raise ModelError(f"{path}: cannot read backbone weights ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = [k for k in state if k.startswith("fc.")]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if isinstance(backbone, TimmResNet):
        state = {f"features.{k}": v for k, v in state.items()}
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(f"{path}: does not match backbone {type(backbone).__name__}: "
                         f"missing keys {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
                         f"unexpected keys {result.unexpected_keys[:8]}"
                         f"{'...' if len(result.unexpected_keys) > 8 else ''}; expected torchvision key layout")
    log.info("loaded backbone weights from %s (%d tensors%s)", path, len(state),
             f", dropped {len(dropped)} classifier keys" if dropped else "")


def build_model(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    model = DeepLabV3Plus(num_classes, cfg)
    if cfg.pretrained:
        load_backbone_weights(model.backbone, cfg.pretrained)
    return model


def save_segmenter(run_dir: str | Path, model: nn.Module, class_names: list, class_ids: list | None = None,
                   extra: dict | None = None) -> None:
    """model.safetensors + model.json (model config, class names and ids)."""
    run_dir = Path(run_dir)
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    io.save_safetensors(state, run_dir / WEIGHTS_FILE)
    if isinstance(model, TextDeepLabV3Plus):
        extra = {"head": "text", "embed_dim": model.embed_dim, **getattr(model, "text_meta", {}), **(extra or {})}
    meta = {"format": "namedmask-deeplabv3plus", "model": to_dict(model.cfg), "num_classes": model.num_classes,
            "class_names": list(class_names), "class_ids": list(class_ids or range(len(class_names))),
            **(extra or {})}
    if getattr(model, "provenance", None) is not None:  # models.provenance: what it was trained from
        meta["provenance"] = model.provenance
    io.write_json(run_dir / META_FILE, meta)


def load_segmenter(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[DeepLabV3Plus, dict]:
    """(model in eval mode, meta) from a run directory (or its model.safetensors)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if run_dir.suffix == ".safetensors":
        run_dir = run_dir.parent
    meta_path, weights_path = run_dir / META_FILE, run_dir / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{run_dir}: no trained segmenter ({META_FILE} + {WEIGHTS_FILE}); "
                         f"give a run directory written by `namedmask train`")
    meta = json.loads(meta_path.read_text())
    cfg = from_dict(ModelConfig, {**meta["model"], "pretrained": None})
    if meta.get("head") == "text":
        model = TextDeepLabV3Plus(meta["num_classes"], cfg, meta["embed_dim"], kd_scale=meta.get("recipe") == "gkc")
    else:
        model = DeepLabV3Plus(meta["num_classes"], cfg)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # SafetensorError: truncated or not a safetensors file
        raise ModelError(f"{weights_path}: cannot read the segmenter weights ({exc}); retrain or restore it") from exc
    _load_strict(model, state, str(weights_path))
    return model.to(device).eval(), meta


class TextDeepLabV3Plus(DeepLabV3Plus):
    """Open-vocabulary DeepLabv3+ (`train.head: text`): the 1x1 classifier projects each pixel
    into CLIP's text space (embed_dim channels); logits = learnable-temperature cosine to text
    embeddings, background a learned embedding (label 0). `text` (buffer, saved with the
    weights) holds the training classes' embeddings, so a checkpoint answers its own classes
    without CLIP; any other text embeddings can be passed to forward."""

    def __init__(self, num_classes: int, cfg: ModelConfig | None = None, embed_dim: int = 512,
                 init_temperature: float = 0.07, kd_scale: bool = False):
        super().__init__(embed_dim, cfg)
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.background = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        self.logit_scale = nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(init_temperature)))))
        self.register_buffer("text", torch.zeros(num_classes - 1, embed_dim))
        if kd_scale:  # GKC's learnt text_kd_logit_scale (recipe gkc, models/gkc.py); unused at inference
            self.kd_scale = nn.Parameter(torch.ones(()))

    def pixel_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> L2-normalised [B, D, H/4, W/4] (the head's resolution)."""
        low, high = self.backbone(x)
        return F.normalize(self.classifier(low, high), dim=1)

    def classify(self, emb: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel embeddings [B, D, h, w] x text [K, D] (or per image [B, K, D]) -> logits
        [B, 1 + K, h, w] (background first)."""
        text = self.text if text is None else text
        # exp of a clamped log-scale, as CLIP (max 100), so the temperature cannot run away
        scale = self.logit_scale.clamp(max=4.6052).exp()
        if text.dim() == 3:
            bg = self.background.to(emb.dtype).expand(len(text), 1, -1)
            weights = F.normalize(torch.cat([bg, text.to(emb.dtype)], 1), dim=2)
            return torch.einsum("bdhw,bkd->bkhw", emb, weights) * scale
        weights = F.normalize(torch.cat([self.background[None], text.to(emb.dtype)]), dim=1)
        return torch.einsum("bdhw,kd->bkhw", emb, weights) * scale

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None, return_embeddings: bool = False):
        emb = self.pixel_embeddings(x)
        logits = F.interpolate(self.classify(emb, text), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, emb) if return_embeddings else logits


class OpenVocabSegmenter(nn.Module):
    """A trained TextDeepLabV3Plus bound to new text embeddings: x -> [B, 1 + K, H, W]. What
    predict/eval use for `--text`; no CLIP image encoder runs."""

    def __init__(self, model: TextDeepLabV3Plus, text: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("text", text.float(), persistent=False)
        self.num_classes = len(text) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.text)
