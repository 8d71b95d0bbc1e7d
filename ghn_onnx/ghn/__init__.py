"""The graph hypernetwork: GHN-2 (gated GNN + convolutional decoder)."""

from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.model import GHN

__all__ = ["GHN", "GHNConfig"]
