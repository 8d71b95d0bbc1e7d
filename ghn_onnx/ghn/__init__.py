"""The graph hypernetwork: GHN-2 (gated GNN) or GHN-3 (graph transformer), with the convolutional decoder."""

from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.model import GHN

__all__ = ["GHN", "GHNConfig"]
