"""TrapNet: a small ResNet-style camera-trap classifier expressed as an ordered list of blocks.

The pipeline cuts the model only between blocks, and every block boundary is a ResNet
*stage* boundary: Torch-Pruning prunes a slice consistently only when the slice does not
start inside a stage (an identity-shortcut block at the start of a slice has no producer
for its residual input).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
INPUT_SIZE = 64
# Per-channel normalisation of RGB frames in [0, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

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
    width: int = 32
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = len(CLASS_NAMES)


class TrapNet(nn.Module):
    """Blocks: ``stem``, one block per ResNet stage, ``head``. Cut points are between blocks."""

    def __init__(self, config: TrapNetConfig = TrapNetConfig()):
        super().__init__()
        self.config = config
        w = config.width
        blocks: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        ]
        c_in = w
        for i, n in enumerate(config.blocks_per_stage):
            c_out = w * 2**i
            layers = [BasicBlock(c_in if j == 0 else c_out, c_out, 1 if (i == 0 or j > 0) else 2)
                      for j in range(n)]
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        blocks.append(Head(c_in, config.num_classes))
        self.blocks = nn.ModuleList(blocks)

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


MODEL_NAME = "trapnet"
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "trapnet.pt"


def build_model(checkpoint: Path | None = None, seed: int = 0) -> TrapNet:
    """The deployed model in eval mode: from ``checkpoint`` if given and present, else seeded weights.

    Seeded weights are identical on every device (torch's CPU generator is portable), so a
    pipeline works before any training; the model issue ships a trained checkpoint.
    ``torch.load(weights_only=True)`` never unpickles arbitrary objects.
    """
    path = checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = TrapNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in state.get("config", {}).items()})
        model = TrapNet(config)
        model.load_state_dict(state["model"])
    else:
        if checkpoint is not None:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        torch.manual_seed(seed)
        model = TrapNet()
        _randomise_bn(model, seed)
    return model.eval()


def _randomise_bn(model: nn.Module, seed: int) -> None:
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
