"""Camera-trap classifiers expressed as an ordered list of blocks: stem, one block per stage, head.

The pipeline cuts a model only between blocks, and every block boundary is a *stage*
boundary. Torch-Pruning prunes a slice consistently only when no block of it starts with an
identity shortcut (such a residual input has no producer inside the slice), so every ResNet
stage here opens with a projection shortcut: any cut between blocks is then a valid slice.

Three architectures share this layout (``TrapNetConfig.arch``): ``resnet`` (:class:`TrapNet`,
the deployed default), ``vgg`` (:class:`TrapVGG`, plain conv stacks, to show the pruning
machinery is not tied to residual streams) and ``efficientnet-lite0`` (shared/lite0.py, the
ImageNet-pretrained model ``edgeprune classify`` uses for real photos).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.imaging import INPUT_SIZE, MEAN, STD  # the decode path's defaults, a checkpoint's unless it names its own

CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
# Their taxa, as a Camtrap DP consumer (GBIF, camtraptor) matches them: the synthetic set's silhouettes are
# of these animals. A family or class where the silhouette cannot tell species apart.
SCIENTIFIC_NAMES = ("Ursidae", "Aves", "Felis catus", "Bos taurus", "Canis familiaris", "Elephantidae",
                    "Giraffa camelopardalis", "Equus caballus", "Ovis aries", "Equus quagga")
# How a frame of another shape becomes the square input: "squash" stretches it (what every
# checkpoint before class names travelled in the checkpoint did), "letterbox" pads the short side
# with mid-gray, "crop" cuts the centre square. The last two keep the animal's proportions.
RESIZE_MODES = ("squash", "letterbox", "crop")

ARCHITECTURES = ("resnet", "vgg", "efficientnet-lite0")


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if projection:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Head(nn.Module):
    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class TrapNetConfig:
    """The model's shape *and* what its outputs and inputs mean, so a checkpoint is self-describing.

    Nodes name results, and decode frames, from these fields rather than from module constants,
    so a model trained on one's own photos needs no code change. Checkpoints written before they
    existed load with today's defaults (the ten synthetic classes and their taxa, 64 px, squash, MEAN/STD).
    ``num_classes`` 0 means "as many as ``class_names``"; ``scientific_names`` are optional
    (empty strings where unknown).
    """

    width: int = 32
    blocks_per_stage: tuple[int, ...] = (1, 1, 1, 1)
    num_classes: int = 0
    arch: str = "resnet"
    class_names: tuple[str, ...] = ()
    scientific_names: tuple[str, ...] = ()
    input_size: int = INPUT_SIZE
    resize: str = "squash"
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose from {ARCHITECTURES}")
        if self.width < 1 or not self.blocks_per_stage or min(self.blocks_per_stage) < 1:
            raise ValueError(f"invalid model shape: width {self.width}, blocks {self.blocks_per_stage}")
        names = self.class_names or (CLASS_NAMES if self.num_classes in (0, len(CLASS_NAMES))
                                     else tuple(f"class-{i}" for i in range(self.num_classes)))
        if self.num_classes not in (0, len(names)):
            raise ValueError(f"{self.num_classes} classes but {len(names)} class names")
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"class names must be at least two and distinct: {names}")
        scientific = self.scientific_names or (SCIENTIFIC_NAMES if names == CLASS_NAMES else ("",) * len(names))
        if len(scientific) != len(names):
            raise ValueError(f"{len(scientific)} scientific names for {len(names)} classes")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; choose from {RESIZE_MODES}")
        if not 16 <= self.input_size <= 1024 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"invalid input: size {self.input_size}, mean {self.mean}, std {self.std}")
        object.__setattr__(self, "class_names", tuple(names))
        object.__setattr__(self, "scientific_names", tuple(scientific))
        object.__setattr__(self, "num_classes", len(names))

    def preprocessing(self) -> dict[str, Any]:
        """Keyword arguments of :func:`shared.imaging.decode_frame` that turn a photo into this model's input."""
        return {"size": self.input_size, "fit": self.resize, "mean": self.mean, "std": self.std}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrapNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class BlockNet(nn.Module):
    """What the pipeline needs of a model: ``blocks`` run in order, cut only between blocks."""

    config: TrapNetConfig
    blocks: nn.ModuleList
    # Pruning keeps a multiple of this many channels per layer (shared.pruning.kept_channels).
    channel_multiple: int = 1

    def __init__(self, config: TrapNetConfig) -> None:
        super().__init__()
        self.config = config
        # A fixed channel order (shared.pruning.fix_channel_order), BatchNorm name -> score; {}: rank by L1.
        self.channel_scores: dict[str, torch.Tensor] = {}
        # Per-ratio BatchNorm statistics from the checkpoint (see shared.pruning); not weights.
        self.bn_tables: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        # ... and per (own ratio, upstream ratio) for the block a slice starts with
        self.entry_bn_tables: dict[str, dict[str, dict[str, dict[str, torch.Tensor]]]] = {}
        self.blocks = nn.ModuleList(self.make_blocks(config))

    def make_blocks(self, config: TrapNetConfig) -> list[nn.Module]:
        """Stem (stride 2), one block per stage of :meth:`make_stage` doubling the width, pooled linear head."""
        w = config.width
        blocks: list[nn.Module] = [conv_bn_relu(3, w, stride=2)]
        c_in = w
        for i, n in enumerate(config.blocks_per_stage):
            c_out = w * 2**i
            blocks.append(self.make_stage(i, n, c_in, c_out))
            c_in = c_out
        blocks.append(Head(c_in, config.num_classes))
        return blocks

    def make_stage(self, index: int, layers: int, c_in: int, c_out: int) -> nn.Sequential:
        """Stage ``index`` (0-based) of ``layers`` layers, ``c_in`` -> ``c_out`` channels."""
        raise NotImplementedError

    def stage_output_norm(self, stage: nn.Sequential) -> nn.BatchNorm2d:
        """The BatchNorm that produces a stage's output channels."""
        raise NotImplementedError

    def output_norm(self, block: int) -> nn.BatchNorm2d | None:
        """The BatchNorm in whose dependency group the block's output channels are (None: head, logits)."""
        if block == 0:
            return self.blocks[0][1]
        if block == self.n_blocks - 1:
            return None
        return self.stage_output_norm(self.blocks[block])

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_names(self) -> list[str]:
        return ["stem"] + [f"stage{i + 1}" for i in range(len(self.config.blocks_per_stage))] + ["head"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(x, 0, self.n_blocks - 1)

    def run_blocks(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for block in self.blocks[first:last + 1]:
            x = block(x)
        return x

    def slice(self, first: int, last: int) -> nn.Sequential:
        """A stand-alone module for blocks ``first..last`` (shares parameters with the model)."""
        if not 0 <= first <= last < self.n_blocks:
            raise ValueError(f"slice {first}..{last} outside blocks 0..{self.n_blocks - 1}")
        return nn.Sequential(*self.blocks[first:last + 1])


class TrapNet(BlockNet):
    """ResNet-style: stem (stride 2), stages of BasicBlocks doubling width, pooled linear head."""

    def __init__(self, config: TrapNetConfig = TrapNetConfig()):
        super().__init__(config)

    def make_stage(self, index: int, layers: int, c_in: int, c_out: int) -> nn.Sequential:
        stride = 1 if index == 0 else 2
        return nn.Sequential(*[
            BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, projection=j == 0)
            for j in range(layers)])

    def stage_output_norm(self, stage: nn.Sequential) -> nn.BatchNorm2d:
        return stage[-1].bn2


class TrapVGG(BlockNet):
    """VGG-style: stem (stride 2), stages of plain 3x3 conv-BN-ReLU layers each ending in a 2x2 max-pool."""

    def __init__(self, config: TrapNetConfig = TrapNetConfig(arch="vgg")):
        super().__init__(config)

    def make_stage(self, index: int, layers: int, c_in: int, c_out: int) -> nn.Sequential:
        convs: list[nn.Module] = [conv_bn_relu(c_in if j == 0 else c_out, c_out) for j in range(layers)]
        if index > 0:
            convs.append(nn.MaxPool2d(2))
        return nn.Sequential(*convs)

    def stage_output_norm(self, stage: nn.Sequential) -> nn.BatchNorm2d:
        return [m for m in stage if isinstance(m, nn.Sequential)][-1][1]


def make_model(config: TrapNetConfig) -> BlockNet:
    """A freshly initialised model of ``config``'s architecture."""
    if config.arch == "efficientnet-lite0":
        from shared.lite0 import EfficientNetLite0  # it builds on BlockNet, defined above

        return EfficientNetLite0(config)
    return TrapNet(config) if config.arch == "resnet" else TrapVGG(config)


MODEL_NAME = "trapnet"
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "trapnet.pt"
# The ImageNet-pretrained EfficientNet-Lite0: a small file naming the pinned weights (``"pretrained"``), so the
# accuracy model and profile sit beside it like any checkpoint's. `edgeprune classify`'s default.
IMAGENET_CHECKPOINT = DEFAULT_CHECKPOINT.with_name("efficientnet-lite0.pt")
PRETRAINED = "efficientnet-lite0-imagenet"


def accuracy_model_beside(checkpoint: Path | None) -> Path:
    """The accuracy model `edgeprune calibrate` writes for ``checkpoint``: ``X.pt`` -> ``X.accuracy.json``."""
    return (checkpoint or DEFAULT_CHECKPOINT).with_suffix(".accuracy.json")

# Checkpoint keys: "config" (TrapNetConfig.to_dict), "model" (state dict), optional
# "bn_tables" ({ratio as str: {BatchNorm name in the full model: {"mean": t, "var": t}}}),
# optional "entry_bn_tables" ({own ratio: {upstream ratio: {BatchNorm name: {"mean", "var"}}}}),
# optional "channel_scores" ({BatchNorm name: per-channel score}: the fixed pruning order, shared.pruning),
# optional "meta" (training regime, accuracy, ... : plain JSON-like values).
# Or only "pretrained": PRETRAINED, weights from their pinned package (shared/lite0.py).


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict. ``weights_only=True`` never unpickles arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(checkpoint: Path | None = None, seed: int = 0) -> BlockNet:
    """The deployed model in eval mode: from ``checkpoint`` if given and present, else seeded weights.

    Seeded weights are identical on every device (torch's CPU generator is portable), so a
    pipeline works before any training; ``shared/assets/trapnet.pt`` is the trained model.
    """
    path = checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT
    if path.exists():
        state = load_checkpoint(path)
        if state.get("pretrained") is not None:
            return _pretrained(state["pretrained"])
        model = make_model(TrapNetConfig.from_dict(state.get("config", {})))
        model.load_state_dict(state["model"])
        model.bn_tables = state.get("bn_tables", {})
        model.entry_bn_tables = state.get("entry_bn_tables", {})
        model.channel_scores = state.get("channel_scores", {})
    else:
        if checkpoint is not None:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        torch.manual_seed(seed)
        model = TrapNet()
        randomise_bn(model, seed)
    return model.eval()


def _pretrained(name: str) -> BlockNet:
    if name != PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r} (known: {PRETRAINED})")
    from shared.lite0 import imagenet_model

    return imagenet_model()


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Give untrained BatchNorm layers non-trivial statistics so tests see realistic numbers."""
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of the weights: nodes and gateway check they run the same model."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
