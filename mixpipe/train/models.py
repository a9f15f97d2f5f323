"""Small models for 32x32 inputs, built to be region-pooled.

torchvision is optional, so the benchmarks and tests use these. Both follow the attribute names of
their torchvision cousins (``avgpool``/``fc`` for the ResNet, ``encoder``/``heads`` plus
``image_size``/``patch_size`` for the ViT), so :func:`mixpipe.train.adapt` treats them and the
torchvision models by one rule.

The ResNet's total stride is 8: a 32x32 input ends as a 4x4 map, so HALVES and QUADS boundaries
snapped to 8 px fall between feature cells. Width and depth are settings because the benchmark
must fit two shared CPU cores.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["SmallResNetSettings", "SmallResNet", "SmallViTSettings", "SmallViT", "build_model",
           "MODELS"]


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SmallResNetSettings:
    """width: channels after the stem (doubled at each of the three stride-2 stages);
    blocks: basic blocks per stage; in_channels / num_classes: input and output sizes."""

    num_classes: int = 10
    width: int = 16
    blocks: int = 1
    in_channels: int = 3

    def __post_init__(self) -> None:
        _check_positive("SmallResNetSettings", num_classes=self.num_classes, width=self.width,
                        blocks=self.blocks, in_channels=self.in_channels)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem at full resolution, then three stride-2 stages: total stride 8 (32x32 -> 4x4)."""

    total_stride = 8

    def __init__(self, settings: SmallResNetSettings = SmallResNetSettings()) -> None:
        super().__init__()
        self.settings = settings
        w = settings.width
        self.conv1 = nn.Conv2d(settings.in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = w
        for stage in range(3):
            cout = w * 2 ** (stage + 1)
            blocks = [_BasicBlock(cin, cout, 2)]
            blocks += [_BasicBlock(cout, cout, 1) for _ in range(settings.blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, settings.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.modules():  # residual branches start near identity: steadier early steps
            if isinstance(block, _BasicBlock):
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


@dataclasses.dataclass(frozen=True)
class SmallViTSettings:
    """A ViT for small images: ``image_size / patch_size`` tokens per side, mean-pooled tokens
    (no class token) so that a region's tokens pool the same way the whole image does."""

    num_classes: int = 10
    image_size: int = 32
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    in_channels: int = 3

    def __post_init__(self) -> None:
        _check_positive("SmallViTSettings", num_classes=self.num_classes,
                        image_size=self.image_size, patch_size=self.patch_size, dim=self.dim,
                        depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                        in_channels=self.in_channels)
        if self.image_size % self.patch_size:
            raise ValueError(f"SmallViTSettings.patch_size ({self.patch_size}) must divide "
                             f"image_size ({self.image_size})")
        if self.dim % self.heads:
            raise ValueError(f"SmallViTSettings.heads ({self.heads}) must divide dim ({self.dim})")


class _Encoder(nn.Module):
    """Pre-norm transformer blocks and a final norm: tokens [B, T, D] -> [B, T, D]."""

    def __init__(self, s: SmallViTSettings) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(s.dim, s.heads, s.dim * s.mlp_ratio, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, s.depth, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(s.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(tokens))


class SmallViT(nn.Module):
    """Patch embedding, learned positions, encoder, mean over tokens, linear head."""

    def __init__(self, settings: SmallViTSettings = SmallViTSettings()) -> None:
        super().__init__()
        self.settings = settings
        self.image_size = settings.image_size
        self.patch_size = settings.patch_size
        side = settings.image_size // settings.patch_size
        self.conv_proj = nn.Conv2d(settings.in_channels, settings.dim, settings.patch_size,
                                   settings.patch_size)
        self.pos_embedding = nn.Parameter(torch.randn(1, side * side, settings.dim) * 0.02)
        self.encoder = _Encoder(settings)
        self.heads = nn.Linear(settings.dim, settings.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"SmallViT takes {self.image_size}x{self.image_size} inputs, got "
                             f"{tuple(x.shape[-2:])}")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2) + self.pos_embedding
        return self.heads(self.encoder(tokens).mean(dim=1))


#: name -> constructor taking num_classes; what ``--model`` accepts in the benchmarks.
MODELS = {
    "resnet-tiny": lambda n: SmallResNet(SmallResNetSettings(num_classes=n, width=8)),
    "resnet-small": lambda n: SmallResNet(SmallResNetSettings(num_classes=n, width=16)),
    "resnet-wide": lambda n: SmallResNet(SmallResNetSettings(num_classes=n, width=32)),
    "vit-small": lambda n: SmallViT(SmallViTSettings(num_classes=n)),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A fresh model by name; unknown names get an error listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](num_classes)
