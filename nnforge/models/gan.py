"""DCGAN and conditional DCGAN: generators and discriminators for 16-128 px images, grayscale or RGB.

    python -c "from nnforge.models import create_model; print(create_model('dcgan_generator', image_size=32))"

DCGAN (Radford et al., 2016): strided (transposed) convolutions instead of pooling, BatchNorm, ReLU in the
generator and LeakyReLU(0.2) in the discriminator, weights drawn from N(0, 0.02). A generator starts from a 4x4 map
and doubles it until the image size; the discriminator mirrors it down to 4x4 and reads one score with a 4x4 conv.
At 64 px these are the networks of the paper and of the PyTorch example; at 32 px one stage fewer.

The conditional pair: the generator concatenates a learned class embedding to z; the discriminator is a projection
discriminator (Miyato & Koyama, 2018): score(x, y) = w . phi(x) + embed(y) . phi(x), with phi(x) the pooled
features. `spectral_norm` puts spectral normalisation on every discriminator layer (and drops its BatchNorm, as
SN-GAN does).

A generator takes ONE float tensor, so that export and serving need one input: (B, z_dim) for DCGAN, and for the
conditional one (B, z_dim + 1) whose last column is the class index (exact as a float below 2**24).
`forward(z, y)` with the labels apart is what training calls.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nnforge.models.registry import register_model

GAN_DATA_ARGS = frozenset({"channels", "image_size", "num_classes", "z_dim", "spectral_norm"})


def _stages(image_size: int) -> int:
    """Doublings from 4x4 to the image size: 16 -> 2, 32 -> 3, 64 -> 4, 128 -> 5."""
    k = math.log2(image_size) - 2 if image_size > 0 else 0
    if image_size not in (16, 32, 64, 128):
        raise ValueError(f"image_size {image_size}: DCGAN models take 16, 32, 64 or 128 px images "
                         "(other sizes: --image-size resizes the data)")
    return int(k)


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, z_dim: int = 128, channels: int = 3, image_size: int = 32, width: int = 64,
                 num_classes: int = 0, embed_dim: int = 32):
        super().__init__()
        stages = _stages(image_size)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        c = width * 2 ** (stages - 1)  # 32 px, width 64: 256 -> 128 -> 64 -> channels
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim + (embed_dim if num_classes else 0), c, 4, 1, 0,
                                                      bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]  # (B, c, 4, 4)
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (B, channels, S, S)
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, z_dim) noise [+ class index column, or labels y (B,)] -> (B, C, S, S) images in [-1, 1]."""
        if self.embed is not None:
            if y is None:  # the served form: the class index rides in the last column
                z, y = z[:, :self.z_dim], z[:, self.z_dim].long()
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, channels: int = 3, image_size: int = 32, width: int = 64, num_classes: int = 0,
                 spectral_norm: bool = False):
        super().__init__()
        stages = _stages(image_size)
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)

        def norm(c: int) -> nn.Module:
            return nn.Identity() if spectral_norm else nn.BatchNorm2d(c)

        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, True)]
        c = width
        for _ in range(stages - 1):  # no BatchNorm on the first layer, as in the paper
            layers += [sn(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False)), norm(2 * c), nn.LeakyReLU(0.2, True)]
            c *= 2
        self.features = nn.Sequential(*layers)  # (B, c, 4, 4)
        self.score = sn(nn.Conv2d(c, 1, 4, 1, 0, bias=False))  # (B, 1, 1, 1)
        self.embed = sn(nn.Embedding(num_classes, c)) if num_classes else None
        dcgan_init(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, S, S) images [and labels (B,)] -> (B,) scores (logits: higher means real)."""
        h = self.features(x)
        out = self.score(h).flatten()
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional discriminator needs the labels")
            out = out + (self.embed(y) * h.sum((2, 3))).sum(1)  # the projection term
        return out


@register_model("dcgan_generator", task="gan", data_args=GAN_DATA_ARGS)
def dcgan_generator(z_dim: int = 128, channels: int = 3, image_size: int = 32, width: int = 64):
    """DCGAN generator: z -> transposed convs with BatchNorm and ReLU -> tanh image."""
    return Generator(z_dim, channels, image_size, width)


@register_model("dcgan_discriminator", task="gan", data_args=GAN_DATA_ARGS)
def dcgan_discriminator(channels: int = 3, image_size: int = 32, width: int = 64, spectral_norm: bool = False):
    """DCGAN discriminator: strided convs with BatchNorm and LeakyReLU -> one score."""
    return Discriminator(channels, image_size, width, 0, spectral_norm)


@register_model("cdcgan_generator", task="gan", data_args=GAN_DATA_ARGS)
def cdcgan_generator(num_classes: int, z_dim: int = 128, channels: int = 3, image_size: int = 32, width: int = 64,
                     embed_dim: int = 32):
    """Conditional DCGAN generator: z and a class embedding, concatenated."""
    return Generator(z_dim, channels, image_size, width, num_classes, embed_dim)


@register_model("cdcgan_discriminator", task="gan", data_args=GAN_DATA_ARGS)
def cdcgan_discriminator(num_classes: int, channels: int = 3, image_size: int = 32, width: int = 64,
                         spectral_norm: bool = False):
    """Projection discriminator on the DCGAN body (Miyato & Koyama, 2018)."""
    return Discriminator(channels, image_size, width, num_classes, spectral_norm)
