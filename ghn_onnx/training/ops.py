"""The 15 DeepNets-1M cell operations (GHN2_FACTS §5.1), written for clean ONNX export.

Each operation is a small module whose parameter names follow the layout of DeepNets-1M
networks (``op.1.weight`` for the convolution of a ReLU-Conv-BN, ``conv_1`` / ``conv_2`` / ``bn`` for
a factorized reduction, ``fc1`` / ``fc2`` for squeeze-excitation), so graphs read from our ONNX
exports name their nodes the way the reference graphs do.

:data:`CELL_OPS` fixes the order in which the generator samples operations; :data:`OP_FACTORIES`
maps each name to a factory ``(c_in, c_out, stride, norm) -> nn.Module``. ``none`` has no module:
a cell skips it (the reference's ``Zero`` op, whose output the cell treats as absent).

With ``fast`` on (the default; :func:`set_fast_ops`) ``msa`` attends through
:func:`torch.nn.functional.scaled_dot_product_attention`, and strided ``msa`` and ``cse`` blocks
compute only the pixels they keep (the transformer's queries, residual and FFN; the gate's
product). The values are those of the reference forward (``forward_reference``: full attention
matrix, full-resolution output, then subsampling) within float rounding, bit for bit for ``cse``.
ONNX export always traces the reference forward, so the graphs a GHN sees do not depend on the
flag. Depthwise convolutions (:class:`DepthwiseConv2d`) run NHWC inputs in fp32 under CPU
autocast, where oneDNN's bf16 depthwise kernels are the slower ones.

Normalisation is injected as a :data:`NormFactory`: DeepNets use BatchNorm with batch statistics
only (``track_running_stats=False``); an ONNX export needs running statistics to emit
``BatchNormalization`` nodes, so exports build the same network with tracking on (parameter names
and shapes are identical either way, see :func:`norm_factory`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Cell operations in the reference sampling order (``PRIMITIVES_DARTS_EXT``).
CELL_OPS: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
    "dil_conv_3x3", "dil_conv_5x5", "conv_1x1", "conv_7x1_1x7", "conv_3x3", "conv_5x5", "conv_7x7",
    "msa", "cse",
)
#: Operations allowed in an "only pool" reduction cell (no trainable layers).
POOL_ONLY_OPS: tuple[str, ...] = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")

NormFactory = Callable[[int], nn.Module]

#: Attention heads of the ``msa`` block.
MSA_HEADS = 8
#: Squeeze-excitation channel reduction of the ``cse`` block.
SE_REDUCTION = 2


def norm_factory(norm: str, track_running_stats: bool = False) -> NormFactory:
    """``"bn"``: BatchNorm2d (batch statistics only unless ``track_running_stats``); ``"none"``:
    an Identity placeholder, so module indices (``op.2``) stay where they are with BN."""
    if norm == "bn":
        return lambda c: nn.BatchNorm2d(c, track_running_stats=track_running_stats)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"Expected norm 'bn' or 'none' (got {norm!r})")


class ReLUConvBN(nn.Module):
    """ReLU → Conv(k×k) → norm, or ReLU → Conv(1×k) → Conv(k×1) → norm when ``factorized``."""

    def __init__(self, c_in: int, c_out: int, ks: int, stride: int, norm: NormFactory,
                 factorized: bool = False) -> None:
        super().__init__()
        p = ks // 2
        if factorized:
            convs = [nn.Conv2d(c_in, c_in, (1, ks), stride=(1, stride), padding=(0, p), bias=False),
                     nn.Conv2d(c_in, c_out, (ks, 1), stride=(stride, 1), padding=(p, 0), bias=False)]
        else:
            convs = [nn.Conv2d(c_in, c_out, ks, stride=stride, padding=p, bias=False)]
        self.op = nn.Sequential(nn.ReLU(), *convs, norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DepthwiseConv2d(nn.Conv2d):
    """A bias-free depthwise ``k×k`` convolution (``groups = channels``) that runs an NHWC input
    in fp32 under CPU autocast: oneDNN's bf16 depthwise kernels are slower than its fp32 NHWC ones,
    while dense convolutions run about twice as fast in bf16. Fwd + bwd, one thread, 64×32×32×32,
    5×5: fp32 NHWC 38 ms, bf16 NHWC 71 ms, bf16 NCHW 81 ms, fp32 NCHW 114 ms (so an NCHW input
    stays in bf16). Otherwise it is ``nn.Conv2d``, whose parameter (``weight``) and ONNX export
    it keeps."""

    def __init__(self, c: int, ks: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__(c, c, ks, stride=stride, padding=padding, dilation=dilation, groups=c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or x.is_contiguous()
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())


class SepConv(nn.Module):
    """Two rounds of ReLU → depthwise k×k → pointwise 1×1 → norm; only the first depthwise conv
    strides."""

    def __init__(self, c_in: int, c_out: int, ks: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        p = ks // 2
        self.op = nn.Sequential(
            nn.ReLU(),
            DepthwiseConv2d(c_in, ks, stride=stride, padding=p),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            norm(c_in),
            nn.ReLU(),
            DepthwiseConv2d(c_in, ks, stride=1, padding=p),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            norm(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU → depthwise k×k with dilation 2 → pointwise 1×1 → norm."""

    def __init__(self, c_in: int, c_out: int, ks: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            DepthwiseConv2d(c_in, ks, stride=stride, padding=ks - ks % 2, dilation=2),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            norm(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing every other pixel: two stride-2 1×1 convs, the second
    on the input shifted by one pixel, concatenated (``c_out / 2`` channels each), then norm."""

    def __init__(self, c_in: int, c_out: int, norm: NormFactory) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"Expected an even number of output channels (got {c_out})")
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class Subsample(nn.Module):
    """Every other pixel (``x[:, :, ::2, ::2]``): the parameter-free stand-in for a factorized
    reduction when a network has no preprocessing layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2]


class ChannelSE(nn.Module):
    """Squeeze-excitation: ``x * hardswish(fc2(relu(fc1(mean_hw(x)))))``, reduction 2.

    The reference gates with Hardswish (not a sigmoid); a strided instance subsamples its output.
    The squeeze always averages the full-resolution input; with ``fast`` the gate multiplies only
    the pixels the subsampling keeps (the same values, bit for bit).
    """

    def __init__(self, c: int, stride: int = 1, fast: bool = True) -> None:
        super().__init__()
        self.stride = stride
        self.fast = fast
        self.fc1 = nn.Linear(c, c // SE_REDUCTION)
        self.fc2 = nn.Linear(c // SE_REDUCTION, c)
        self.relu = nn.ReLU()
        self.gate = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or self.stride == 1 or torch.onnx.is_in_onnx_export():
            return self.forward_reference(x)
        b, c = x.shape[:2]
        g = self._gate(x)                                               # (B, C)
        return x[:, :, ::self.stride, ::self.stride] * g.reshape(b, c, 1, 1)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        out = x * self._gate(x).reshape(b, c, 1, 1)
        return out[:, :, ::self.stride, ::self.stride] if self.stride > 1 else out

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        squeezed = x.reshape(b, c, -1).mean(dim=2)                      # (B, C)
        return self.gate(self.fc2(self.relu(self.fc1(squeezed))))      # (B, C)


class Transformer(nn.Module):
    """Pre-LN transformer block over the pixels of a feature map (the ``msa`` op).

    ``y = x + W_out · MSA(LN1(x))``; ``out = y + FFN(LN2(y))`` with 8 heads, a bias-free qkv
    projection and an FFN of width ``dim`` with GELU. Shapes: ``(B, C, H, W) -> (B, C, H', W')``,
    ``H' = ceil(H / stride)``.

    With ``fast`` (the default) attention is ``F.scaled_dot_product_attention`` (no ``(T, T)``
    matrix is kept for backward; except for short sequences under CPU bf16 autocast, see
    :data:`SDPA_MIN_TOKENS_CPU_BF16`) and a strided block computes attention, residual and FFN
    only for the ``T' = H' W'`` pixels it keeps; keys and values still come from every pixel. Cost
    of the attention: ``O(T' T d)`` instead of ``O(T² d)``.
    """

    def __init__(self, dim: int, stride: int = 1, heads: int = MSA_HEADS, fast: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Expected dim divisible by {heads} heads (got {dim})")
        self.stride = stride
        self.heads = heads
        self.fast = fast
        self.ln1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or torch.onnx.is_in_onnx_export():
            return self.forward_reference(x)
        b, c, h, w = x.shape
        s = self.stride
        t = x.reshape(b, c, h * w).transpose(1, 2)                      # (B, T, C)
        q, k, v = self.to_qkv(self.ln1(t)).chunk(3, dim=-1)            # 3 x (B, T, C)
        h2, w2 = -(-h // s), -(-w // s)
        if s > 1:  # only the kept pixels' queries (and residuals) are needed
            q, t = (z.reshape(b, h, w, c)[:, ::s, ::s].reshape(b, h2 * w2, c) for z in (q, t))  # (B, T', C)
        d = c // self.heads
        q, k, v = (z.reshape(b, -1, self.heads, d).transpose(1, 2) for z in (q, k, v))  # (B, h, T|T', d)
        if _sdpa_pays(q, h * w):
            y = F.scaled_dot_product_attention(q, k, v)                 # (B, h, T', d), scale d^-0.5
        else:
            y = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1) @ v  # (B, h, T', d)
        y = y.transpose(1, 2).reshape(b, h2 * w2, c)                    # (B, T', C)
        y = self.to_out(y) + t
        y = self.ff(self.ln2(y)) + y
        return y.transpose(1, 2).reshape(b, c, h2, w2)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation (what ONNX export traces): the full ``(T, T)`` attention
        matrix, every pixel through residual and FFN, then subsampling."""
        b, c, h, w = x.shape
        t = x.reshape(b, c, h * w).transpose(1, 2)                      # (B, T, C)
        q, k, v = self.to_qkv(self.ln1(t)).chunk(3, dim=-1)            # 3 x (B, T, C)
        d = c // self.heads
        q, k, v = (z.reshape(b, h * w, self.heads, d).transpose(1, 2) for z in (q, k, v))  # (B, h, T, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)  # (B, h, T, T)
        y = (attn @ v).transpose(1, 2).reshape(b, h * w, c)             # (B, T, C)
        y = self.to_out(y) + t
        y = self.ff(self.ln2(y)) + y
        out = y.transpose(1, 2).reshape(b, c, h, w)
        return out[:, :, ::self.stride, ::self.stride] if self.stride > 1 else out


#: Under CPU bf16 autocast, sequences shorter than this attend faster through the materialised
#: ``(T', T)`` matrix than through ``scaled_dot_product_attention`` (one thread, 64 images, fwd +
#: bwd of a block: 11×11 tokens, C 32: 57 ms vs 199 ms; 16×16, C 64: 546 ms vs 380 ms; 32×32:
#: 5.6 s vs 3.0 s). In fp32 and on GPUs SDPA is faster at every size measured.
SDPA_MIN_TOKENS_CPU_BF16 = 256


def _sdpa_pays(q: torch.Tensor, tokens: int) -> bool:
    cpu_bf16 = (q.device.type == "cpu" and q.dtype == torch.bfloat16) or (
        q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return not cpu_bf16 or tokens >= SDPA_MIN_TOKENS_CPU_BF16


def set_fast_ops(net: nn.Module, fast: bool) -> int:
    """Switch every ``msa`` / ``cse`` block of ``net`` to the fast (True) or the reference forward;
    returns how many blocks it set."""
    blocks = [m for m in net.modules() if isinstance(m, (Transformer, ChannelSE))]
    for m in blocks:
        m.fast = fast
    return len(blocks)


class PosEnc(nn.Module):
    """A learned positional encoding ``(1, C, s, s)`` added to the patch embedding."""

    def __init__(self, c: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, c, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


def _same_width(name: str, c_in: int, c_out: int) -> None:
    if c_in != c_out:
        raise ValueError(f"{name}: expected equal input and output channels (got {c_in} -> {c_out})")


def _skip(c_in: int, c_out: int, stride: int, norm: NormFactory) -> nn.Module:
    if stride == 1:
        _same_width("skip_connect", c_in, c_out)
        return nn.Identity()
    return FactorizedReduce(c_in, c_out, norm)


def _msa(c_in: int, c_out: int, stride: int, norm: NormFactory) -> nn.Module:
    _same_width("msa", c_in, c_out)
    return Transformer(c_in, stride)


def _cse(c_in: int, c_out: int, stride: int, norm: NormFactory) -> nn.Module:
    _same_width("cse", c_in, c_out)
    return ChannelSE(c_in, stride)


OpFactory = Callable[[int, int, int, NormFactory], nn.Module]

#: Cell op name → module factory ``(c_in, c_out, stride, norm)``; ``none`` has no module.
OP_FACTORIES: dict[str, OpFactory | None] = {
    "none": None,
    "max_pool_3x3": lambda ci, co, s, n: nn.MaxPool2d(3, stride=s, padding=1),
    "avg_pool_3x3": lambda ci, co, s, n: nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda ci, co, s, n: SepConv(ci, co, 3, s, n),
    "sep_conv_5x5": lambda ci, co, s, n: SepConv(ci, co, 5, s, n),
    "dil_conv_3x3": lambda ci, co, s, n: DilConv(ci, co, 3, s, n),
    "dil_conv_5x5": lambda ci, co, s, n: DilConv(ci, co, 5, s, n),
    "conv_1x1": lambda ci, co, s, n: ReLUConvBN(ci, co, 1, s, n),
    "conv_7x1_1x7": lambda ci, co, s, n: ReLUConvBN(ci, co, 7, s, n, factorized=True),
    "conv_3x3": lambda ci, co, s, n: ReLUConvBN(ci, co, 3, s, n),
    "conv_5x5": lambda ci, co, s, n: ReLUConvBN(ci, co, 5, s, n),
    "conv_7x7": lambda ci, co, s, n: ReLUConvBN(ci, co, 7, s, n),
    "msa": _msa,
    "cse": _cse,
}


def make_op(name: str, c_in: int, c_out: int, stride: int, norm: NormFactory) -> nn.Module | None:
    """The module of cell op ``name`` (None for ``none``)."""
    try:
        factory = OP_FACTORIES[name]
    except KeyError:
        raise ValueError(f"Expected a cell op from {list(CELL_OPS)} (got {name!r})") from None
    return None if factory is None else factory(c_in, c_out, stride, norm)
