"""edgeprune: pipelined CNN inference on edge devices, balanced by on-the-spot pruning."""

__version__ = "0.1.0"
