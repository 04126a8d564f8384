"""The feature networks of Brain-Diffuser's evaluation, defined here in torchvision's exact layout.

Brain-Diffuser (ozcelikfu/brain-diffuser `scripts/eval_extract_features.py`) takes features from torchvision's
`alexnet` (`features[4]`, `features[11]`), `inception_v3` (`avgpool`), `efficientnet_b1` (`avgpool`) and SwAV's
ResNet-50 (facebookresearch/swav `hubconf.py`: torchvision's `resnet50` with the SwAV checkpoint, `avgpool`).

Why not import torchvision: the wheel the registries serve is a CUDA build that does not import beside the CPU
torch (`operator torchvision::nms does not exist`), and installing it swaps torch for the CUDA build. The weight
files are plain state dicts, so the four architectures are written out below with torchvision's module names
(pytorch/vision `torchvision/models/{alexnet,inception,efficientnet,resnet}.py`, `torchvision/ops/misc.py`): every
state-dict key and shape equals torchvision's, the published files load with `strict=True`, and the forward passes
run the same operators in the same order (tests/test_paper_metrics.py compares them with torchvision's own modules
wherever torchvision imports). Only what inference needs is kept: no weight initialisation schemes, no stochastic
depth (identity in eval mode), no auxiliary-logits forward (Inception runs it only in training).

Each network has a `features(x)` method returning the flattened tap Brain-Diffuser hooks, (N, 3, 224, 224) float32
in, (N, D) out. Loading: `load_feature_net(name, path)` reads the file with `torch.load(weights_only=True)`, checks
every key and shape against the architecture, and refuses a wrong or missing file in one line naming the file,
what was expected and what was found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainrecon.errors import InputError, MissingFileError

# ----------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """torchvision `alexnet` (Krizhevsky 2014, "One weird trick"): 61,100,840 parameters.

    Brain-Diffuser's AlexNet(2) is the output of `features[4]` (ReLU after the 2nd conv, (N, 192, 27, 27) at 224 px)
    and AlexNet(5) the output of `features[11]` (ReLU after the 5th conv, (N, 256, 13, 13)).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),  # [4]: AlexNet(2)
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),  # [11]: AlexNet(5)
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def taps(self, x: Tensor, indices: tuple[int, ...] = (4, 11)) -> list[Tensor]:
        """The outputs of `features[i]` for each i, flattened: (N, C*H*W) in C, H, W order, as numpy's reshape of
        the hooked output in Brain-Diffuser's evaluation. Copies: later in-place ReLUs cannot change them."""
        outputs = {}
        for i, layer in enumerate(self.features[: max(indices) + 1]):
            x = layer(x)
            if i in indices:
                outputs[i] = torch.flatten(x, 1).clone()
        return [outputs[i] for i in indices]


# ----------------------------------------------------------------------------- Inception v3


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionAux(nn.Module):
    """Present for the state dict only (torchvision's pretrained file carries it); it runs only in training."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = BasicConv2d(in_channels, 128, kernel_size=1)
        self.conv1 = BasicConv2d(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)


class InceptionV3(nn.Module):
    """torchvision `inception_v3` (Szegedy et al. 2016) as `inception_v3(pretrained=True)` builds it:
    `aux_logits=True` (the `AuxLogits.*` keys of inception_v3_google-0cc3c7bd.pth) and `transform_input=True`
    (the weights were trained on inputs in [-1, 1]: the ImageNet-normalised input is mapped back to that range).
    27,161,264 parameters. Brain-Diffuser feeds 224×224 (not 299); the adaptive pool makes that (N, 2048).
    """

    def __init__(self, num_classes: int = 1000, transform_input: bool = True, dropout: float = 0.5) -> None:
        super().__init__()
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.AuxLogits = InceptionAux(768, num_classes)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)

    def _transform_input(self, x: Tensor) -> Tensor:
        if not self.transform_input:
            return x
        # the same expressions as torchvision (float32 tensor times Python floats), so the bits agree
        x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x_ch0, x_ch1, x_ch2), 1)

    def _pooled(self, x: Tensor) -> Tensor:
        x = self._transform_input(x)  # (N, 3, 224, 224)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # (N, 192, 25, 25) at 224 px
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)  # (N, 768, 12, 12)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 5, 5)
        return self.avgpool(x)  # (N, 2048, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode logits (N, num_classes), as torchvision's eval forward."""
        x = torch.flatten(self.dropout(self._pooled(x)), 1)
        return self.fc(x)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self._pooled(x), 1)  # (N, 2048)


# ----------------------------------------------------------------------------- EfficientNet-B1


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation with BatchNorm2d: conv (no bias), BN, optional SiLU; "same" padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),  # default eps 1e-5: efficientnet_b* passes no norm_layer
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with SiLU inside and a sigmoid gate."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision.models._utils._make_divisible (from the TF mobilenet code)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class MBConv(nn.Module):
    """Inverted residual: [expand 1×1] → depthwise k×k → squeeze-excitation → project 1×1 (+ input if same shape).
    Stochastic depth is the identity in eval mode and is left out (it has no state)."""

    def __init__(
        self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        expanded = _make_divisible(input_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded, kernel_size=1))
        layers.append(
            Conv2dNormActivation(expanded, expanded, kernel_size=kernel, stride=stride, groups=expanded)
        )
        layers.append(SqueezeExcitation(expanded, max(1, input_channels // 4)))
        layers.append(Conv2dNormActivation(expanded, out_channels, kernel_size=1, act=False))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


@dataclass(frozen=True)
class StageConfig:
    """One row of the EfficientNet paper's Table 1 (before width/depth scaling)."""

    expand_ratio: int
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


EFFICIENTNET_B0_STAGES = (
    StageConfig(1, 3, 1, 32, 16, 1),
    StageConfig(6, 3, 2, 16, 24, 2),
    StageConfig(6, 5, 2, 24, 40, 2),
    StageConfig(6, 3, 2, 40, 80, 3),
    StageConfig(6, 5, 1, 80, 112, 3),
    StageConfig(6, 5, 2, 112, 192, 4),
    StageConfig(6, 3, 1, 192, 320, 1),
)


class EfficientNetB1(nn.Module):
    """torchvision `efficientnet_b1` (Tan & Le 2019): width ×1.0, depth ×1.1, dropout 0.2; 7,794,184 parameters.
    Brain-Diffuser's `efficientnet_b1(weights=True)` selects IMAGENET1K_V1 (efficientnet_b1_rwightman-bac287d4.pth,
    the weights ported from rwightman/pytorch-image-models); the tap is `avgpool`, (N, 1280)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.1) -> None:
        super().__init__()
        stages = [
            StageConfig(
                s.expand_ratio,
                s.kernel,
                s.stride,
                _make_divisible(s.input_channels * width_mult),
                _make_divisible(s.out_channels * width_mult),
                int(math.ceil(s.num_layers * depth_mult)),
            )
            for s in EFFICIENTNET_B0_STAGES
        ]
        layers: list[nn.Module] = [Conv2dNormActivation(3, stages[0].input_channels, kernel_size=3, stride=2)]
        for s in stages:
            blocks = [
                MBConv(
                    s.expand_ratio,
                    s.kernel,
                    s.stride if i == 0 else 1,
                    s.input_channels if i == 0 else s.out_channels,
                    s.out_channels,
                )
                for i in range(s.num_layers)
            ]
            layers.append(nn.Sequential(*blocks))
        last_in = stages[-1].out_channels
        layers.append(Conv2dNormActivation(last_in, 4 * last_in, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(4 * last_in, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features_pooled(x))

    def features_pooled(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)  # (N, 1280)


# ----------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (the stride on the 3×3 conv)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """torchvision `resnet50` (He et al. 2016, v1.5): 25,557,032 parameters with the classifier.

    `num_classes=None` builds the backbone only (no `fc`): SwAV's checkpoint has no classifier (its hub entry leaves
    `fc` randomly initialised) and Brain-Diffuser taps `avgpool`, (N, 2048), before it. SwAV's own ResNet pads by 1
    in a separate layer and convolves with padding 2; torchvision's conv1 pads by 3 with zeros: the same numbers.
    """

    def __init__(self, num_classes: int | None = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes) if num_classes is not None else None

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 2048, 7, 7)
        return torch.flatten(self.avgpool(x), 1)  # (N, 2048)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, or the pooled features when built without a classifier."""
        pooled = self.features(x)
        return pooled if self.fc is None else self.fc(pooled)


# ----------------------------------------------------------------------------- the published files


@dataclass(frozen=True)
class FeatureNetSpec:
    """One published weight file and the network it loads into."""

    file: str
    url: str
    what: str
    build: Callable[[], nn.Module]
    strip_prefix: str = ""  # removed from every key (SwAV's DistributedDataParallel "module.")
    drop_prefixes: tuple[str, ...] = ()  # keys the feature network has no use for (SwAV's heads)


FEATURE_NETS: dict[str, FeatureNetSpec] = {
    "alexnet": FeatureNetSpec(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "torchvision AlexNet (IMAGENET1K_V1)",
        AlexNet,
    ),
    "inceptionv3": FeatureNetSpec(
        "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        "torchvision Inception v3 (IMAGENET1K_V1)",
        InceptionV3,
    ),
    "efficientnet": FeatureNetSpec(
        "efficientnet_b1_rwightman-bac287d4.pth",
        "https://download.pytorch.org/models/efficientnet_b1_rwightman-bac287d4.pth",
        "torchvision EfficientNet-B1 (IMAGENET1K_V1)",
        EfficientNetB1,
    ),
    "swav": FeatureNetSpec(
        "swav_800ep_pretrain.pth.tar",
        "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        "SwAV ResNet-50 (facebookresearch/swav hub, 800 epochs)",
        lambda: ResNet50(num_classes=None),
        strip_prefix="module.",
        drop_prefixes=("projection_head.", "prototypes."),
    ),
}

# BatchNorm's step counter is used only in training; checkpoints saved before PyTorch 0.4.1 lack it and
# BatchNorm's own loader fills it in, so its absence is not an error.
OPTIONAL_KEY_SUFFIX = "num_batches_tracked"


def _shape(value) -> str:
    return "x".join(str(d) for d in value.shape) if isinstance(value, Tensor) else type(value).__name__


def checked_state_dict(spec: FeatureNetSpec, path: Path, model: nn.Module) -> dict[str, Tensor]:
    """The file's tensors under the model's key names, or a one-line error naming the file and the first misfit."""
    if not path.is_file():
        raise MissingFileError(path, f"{spec.what} weights", f"the published {spec.file}: {spec.url}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or a pickle that is more than a state dict
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise InputError(
            path, f"a torch state dict ({spec.what})", f"{type(exc).__name__}: {reason}"
        ) from exc
    if not isinstance(raw, dict):
        raise InputError(path, f"a state dict of tensors ({spec.what})", type(raw).__name__)
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        name = (
            key[len(spec.strip_prefix) :] if spec.strip_prefix and key.startswith(spec.strip_prefix) else key
        )
        if any(name.startswith(p) for p in spec.drop_prefixes):
            continue
        state[name] = value
    expected = model.state_dict()
    problems = []
    for key, ref in expected.items():
        if key not in state:
            if not key.endswith(OPTIONAL_KEY_SUFFIX):
                problems.append(f"missing key {key}")
        elif not isinstance(state[key], Tensor) or state[key].shape != ref.shape:
            problems.append(f"{key} of shape {_shape(state[key])} (expected {_shape(ref)})")
    problems += [f"unexpected key {key}" for key in state if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(path, f"the {spec.what} state dict in torchvision's layout", f"{problems[0]}{more}")
    return state


def load_feature_net(name: str, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """One of FEATURE_NETS from its published file: keys and shapes checked, loaded strictly, eval mode, fp32."""
    if name not in FEATURE_NETS:
        raise InputError("feature net", f"one of {sorted(FEATURE_NETS)}", repr(name))
    spec = FEATURE_NETS[name]
    model = spec.build()
    state = checked_state_dict(spec, Path(path), model)
    # a fresh dict has no `_metadata`: BatchNorm then fills in a missing num_batches_tracked itself
    model.load_state_dict(state, strict=True)
    return model.eval().to(device=device, dtype=torch.float32)
