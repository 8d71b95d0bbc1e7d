"""The graph hypernetwork: GHN-2 (gated GNN) or GHN-3 (graph transformer), with the convolutional decoder.

``GHN`` and ``GHNConfig`` import on first access (PEP 562), so that modules of this package that
need no torch (the registry, the decoding rules ``inspect`` reads) load without it.
"""

__all__ = ["GHN", "GHNConfig"]


def __getattr__(name: str):
    if name == "GHN":
        from ghn_onnx.ghn.model import GHN

        return GHN
    if name == "GHNConfig":
        from ghn_onnx.ghn.config import GHNConfig

        return GHNConfig
    raise AttributeError(f"module 'ghn_onnx.ghn' has no attribute {name!r}")
