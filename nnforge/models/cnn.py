"""Image classifiers: the tutorial's two-conv net, a fast residual CNN for small images, and torchvision's nets.

    python -c "from nnforge.models import create_model; print(create_model('resnet_tiny', num_classes=10, in_chans=1))"

All take (num_classes, in_chans, img_size, pretrained) and map (B, C, H, W) images to (B, num_classes) logits;
forward_features(x) gives the (B, D) features the head reads.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from nnforge.models.registry import IMAGE_CLASSIFIER_ARGS, IMAGENET_NORM, register_model

# ----------------------------------------------------------------------------------------------------------
# seed_cnn: conv 32 -> pool -> conv 64 -> pool -> fc 128 -> fc, as in the well-known tutorial, except that the
# flatten size follows the input size (the original hard-codes 64*4*4, which only fits 28x28 inputs).


class SeedCNN(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3, img_size: int = 28):
        super().__init__()
        if img_size < 16:
            raise ValueError(f"seed_cnn needs img_size >= 16 (two 5x5 convs and two 2x pools); got {img_size}")
        self.conv1 = nn.Conv2d(in_chans, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.pool = nn.MaxPool2d(2)
        side = ((img_size - 4) // 2 - 4) // 2  # 28 -> 4, 32 -> 5
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.head = nn.Linear(128, num_classes)

    def forward_features(self, x):  # (B, C, H, W) -> (B, 128)
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return torch.relu(self.fc1(torch.flatten(x, 1)))

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.forward_features(x))


@register_model("seed_cnn", task="classify", input="image", head="head", data_args=IMAGE_CLASSIFIER_ARGS)
def seed_cnn(num_classes: int, in_chans: int = 3, img_size: int = 28, pretrained: bool = False):
    """The two-conv tutorial network, with a flatten size that follows the input size."""
    _no_pretrained("seed_cnn", pretrained)
    return SeedCNN(num_classes, in_chans, img_size)


# ----------------------------------------------------------------------------------------------------------
# resnet_tiny: a small ResNet in the spirit of the DAWNBench CIFAR-10 winners (conv-pool stages with one
# residual block each, max-pooled head with a scaled logit), narrow enough to train Fashion-MNIST in minutes
# on two CPU cores.


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def conv_pool_bn(c_in: int, c_out: int) -> nn.Sequential:
    # Pool straight after the convolution, as the fast CIFAR-10 trainers do: BatchNorm and ReLU then run on a
    # quarter of the pixels. On two CPU cores they cost as much as the convolutions, so a step gets ~25% faster.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x):
        return x + self.body(x)


class ResNetTiny(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 16,
                 last_width: int | None = None):
        super().__init__()
        w, last = width, last_width or 8 * width
        stages = [
            conv_bn(in_chans, w),  # (B, w, H, W)
            nn.Sequential(conv_pool_bn(w, 2 * w), Residual(2 * w)),  # (B, 2w, H/2, W/2)
            nn.Sequential(conv_pool_bn(2 * w, 4 * w), Residual(4 * w)),  # (B, 4w, H/4, W/4)
            conv_pool_bn(4 * w, last),  # (B, last, H/8, W/8)
        ]
        # Larger inputs get one more stride-2 stage per doubling past 64 px, so the cost stays bounded.
        extra, side = 0, img_size
        while side > 64:
            extra, side = extra + 1, side // 2
        for _ in range(extra):
            stages.insert(1, conv_pool_bn(w, w))
        self.body = nn.Sequential(*stages, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(last, num_classes, bias=False)
        self.logit_scale = 0.125  # a small logit scale keeps early softmax outputs soft (faster, stabler start)

    def forward_features(self, x):  # (B, C, H, W) -> (B, last_width)
        return self.body(x)

    def forward(self, x):
        return self.head(self.forward_features(x)) * self.logit_scale


@register_model("resnet_tiny", task="classify", input="image", head="head", data_args=IMAGE_CLASSIFIER_ARGS)
def resnet_tiny(num_classes: int, in_chans: int = 3, img_size: int = 32, pretrained: bool = False, width: int = 16,
                last_width: int | None = None):
    """Fast small residual CNN for small images (the default)."""
    _no_pretrained("resnet_tiny", pretrained)
    return ResNetTiny(num_classes, in_chans, img_size, width, last_width)


# ----------------------------------------------------------------------------------------------------------
# torchvision networks. `pretrained` loads torchvision's ImageNet weights by name (a network is needed the first
# time); the head is replaced for num_classes, and a first conv for in_chans != 3 gets the RGB kernels summed.


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; use --weights FILE or a torchvision model")


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    if in_chans == conv.in_channels:
        return conv
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    with torch.no_grad():
        w = conv.weight.sum(dim=1, keepdim=True) if in_chans == 1 else conv.weight.mean(1, keepdim=True)
        new.weight.copy_(w.repeat(1, in_chans, 1, 1) if in_chans > 1 else w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _resnet_features(self, x):  # torchvision's ResNet.forward up to the pooled, flattened features
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)


def _features_then_classifier(self, x):  # MobileNetV3 / EfficientNet: all of the classifier but its last Linear
    x = torch.flatten(self.avgpool(self.features(x)), 1)
    return self.classifier[:-1](x)


def _torchvision(arch: str, num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)
    if arch.startswith("resnet"):
        model.conv1 = _adapt_first_conv(model.conv1, in_chans)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        features = _resnet_features
    else:  # mobilenet_v3 / efficientnet: features[0][0] is the stem conv, classifier[-1] the last Linear
        model.features[0][0] = _adapt_first_conv(model.features[0][0], in_chans)
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
        features = _features_then_classifier
    # Bound to the instance rather than wrapping the model: torchvision's own parameter names stay, so its
    # pretrained weights and the checkpoints of earlier runs load unchanged.
    model.forward_features = types.MethodType(features, model)
    return model


def _register_torchvision(arch: str, head: str, doc: str) -> None:
    def build(num_classes: int, in_chans: int = 3, img_size: int = 224, pretrained: bool = False):
        return _torchvision(arch, num_classes, in_chans, pretrained)

    build.__doc__ = doc
    register_model(arch, task="classify", input="image", head=head, data_args=IMAGE_CLASSIFIER_ARGS,
                   pretrained_norm=IMAGENET_NORM)(build)


_register_torchvision("resnet18", "fc", "torchvision ResNet-18 (11.7M parameters).")
_register_torchvision("resnet34", "fc", "torchvision ResNet-34 (21.8M parameters).")
_register_torchvision("resnet50", "fc", "torchvision ResNet-50 (25.6M parameters).")
_register_torchvision("mobilenet_v3_small", "classifier.3", "torchvision MobileNetV3-Small (2.5M parameters).")
_register_torchvision("efficientnet_b0", "classifier.1", "torchvision EfficientNet-B0 (5.3M parameters).")
