"""Training data for a GHN: a seeded DeepNets-1M-like architecture space, its networks, and their
graphs read through the ONNX converter.

- :mod:`.spec`: :class:`Genotype` / :class:`ArchSpec` (width-free, JSON, hashed by ``key``).
- :mod:`.sampling`: :func:`sample_arch` per split, with the reference's rejection rules, and
  :func:`sample_width` (per-draw ``C`` / ``fc_dim``).
- :mod:`.ops`, :mod:`.network`: the 15 cell ops and :func:`build_net`.
- :mod:`.generator`: :func:`arch_graph`, :func:`refresh_shapes`, :func:`eval_specs`,
  :class:`TrainingStream`, :class:`ArchPool`.
"""

from ghn_onnx.training.generator import (
    EVAL_SIZES, ArchPool, Draw, GraphRefreshError, PoolSample, TrainingStream, arch_graph, arch_onnx,
    eval_keys, eval_specs, eval_width, export_onnx, refresh_shapes,
)
from ghn_onnx.training.network import Network, build_net, count_params, plan_network
from ghn_onnx.training.ops import CELL_OPS
from ghn_onnx.training.sampling import SPLITS, rejection_reason, sample_arch, sample_genotype, sample_width
from ghn_onnx.training.spec import ArchSpec, Genotype

__all__ = [
    "ArchPool", "ArchSpec", "CELL_OPS", "Draw", "EVAL_SIZES", "Genotype", "GraphRefreshError", "Network",
    "PoolSample", "SPLITS", "TrainingStream", "arch_graph", "arch_onnx", "build_net", "count_params",
    "eval_keys", "eval_specs", "eval_width", "export_onnx", "plan_network", "refresh_shapes",
    "rejection_reason", "sample_arch", "sample_genotype", "sample_width",
]
