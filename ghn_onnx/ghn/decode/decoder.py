"""Decoders from node states to parameter blocks (GHN2_FACTS §4.1, §4.3, §4.4).

* :class:`ConvDecoder`: ``hid → (4·hid, s, s)`` spatial template, then a pointwise channel MLP
  ``4·hid → 8·hid → out·in`` shared by every kernel tap: a ``(out, in, kh, kw)`` block from a
  ``kh × kw`` window of taps (GHN-2: the top-left; GHN-3: the centre). The classifier head maps
  the 64 "out" rows to ``num_classes``. (GHN-3 stores the 1×1 convs as ``Linear`` weights, the
  same numbers: :mod:`~ghn_onnx.ghn.reference_formats` reshapes them on loading.)
* :class:`Decoder1D`: ``hid → 2·hid → 2·out``, viewed ``(2, out)``: row 0 a norm's scale, row 1
  a bias.

Which taps, which corner of the block and which 1-D row a tensor reads are the rules of
:mod:`~ghn_onnx.ghn.decode.rules`; the methods here compute a selection (the ``fc`` rows of some
taps, the outputs of the last 1×1 conv for some channels) without reaching into the layers.
Module names are the reference's state-dict keys (GHN2_FACTS §9): they do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Selected weights kept per decoder (see ConvDecoder.kept); bounded.
_KEPT_ENTRIES = 64


class ConvDecoder(nn.Module):
    def __init__(self, hid: int, max_shape: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.out_ch, self.in_ch, self.s, _ = max_shape
        self.template_ch = 4 * hid
        self.fc = nn.Sequential(nn.Linear(hid, self.template_ch * self.s * self.s), nn.ReLU())
        self.conv = nn.Sequential(
            nn.Conv2d(self.template_ch, 8 * hid, 1), nn.ReLU(), nn.Conv2d(8 * hid, self.out_ch * self.in_ch, 1)
        )
        self.class_layer_predictor = nn.Sequential(nn.ReLU(), nn.Conv2d(self.out_ch, num_classes, 1))
        self._kept: dict[tuple, tuple] = {}  # what kept() selected, with the parameters' stamp

    # -- selections (differentiable) ---------------------------------------------------------
    def tap_rows(self, kh: int, kw: int, tap_major: bool = False, y0: int = 0,
                 x0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The template layer's weight ``(4·hid·kh·kw, hid)`` and bias rows that produce the
        ``kh × kw`` taps from ``(y0, x0)`` of the ``s × s`` template (default the top-left),
        ordered (channel, y, x), or (y, x, channel) with ``tap_major`` (then a product's output
        is ``(n·taps, channels)``)."""
        lin, ch, s = self.fc[0], self.template_ch, self.s
        w = lin.weight.view(ch, s, s, -1)[:, y0:y0 + kh, x0:x0 + kw]
        b = lin.bias.view(ch, s, s)[:, y0:y0 + kh, x0:x0 + kw]
        if tap_major:
            w, b = w.permute(1, 2, 0, 3), b.permute(1, 2, 0)
        return w.reshape(-1, lin.in_features), b.reshape(-1)

    def last_rows(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last 1×1 conv's weight ``(rows·cols, 8·hid)`` and bias rows for the top-left
        ``rows × cols`` corner of the ``out × in`` channel block (output ``o·in + i``)."""
        last = self.conv[2]
        w = last.weight.view(self.out_ch, self.in_ch, -1)[:rows, :cols].reshape(rows * cols, -1)
        b = last.bias.view(self.out_ch, self.in_ch)[:rows, :cols].reshape(-1)
        return w, b

    def kept(self, select: str, *args: int) -> tuple[torch.Tensor, ...]:
        """``getattr(self, select)(*args)``, detached and contiguous, for inference: kept between
        calls while this decoder's parameters stay the same (storage and in-place version
        counter), since selecting rows copies up to 4 MB, as much as a small group's product."""
        stamp = tuple((p.data_ptr(), p._version) for p in self.parameters())
        key = (select, *args)
        hit = self._kept.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = tuple(w.detach().contiguous() for w in getattr(self, select)(*args))
        if len(self._kept) >= _KEPT_ENTRIES:
            self._kept.pop(next(iter(self._kept)))
        self._kept[key] = (stamp, value)
        return value

    # -- layers ------------------------------------------------------------------------------
    def template(self, x: torch.Tensor, taps: tuple[int, int] | None = None,
                 origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """``(n, hid)`` → ``(n, 4·hid, s, s)``, or only its ``taps = (kh, kw)`` from ``origin``
        (default the top-left): ``(n, 4·hid, kh, kw)``, computed from just those output rows of
        the linear layer."""
        if taps is None or taps == (self.s, self.s):
            return self.fc(x).view(len(x), self.template_ch, self.s, self.s)
        kh, kw = taps
        w, b = self.tap_rows(kh, kw, False, *origin)
        return torch.relu(F.linear(x, w, b)).view(len(x), self.template_ch, kh, kw)

    def hidden_rows(self, taps: torch.Tensor) -> torch.Tensor:
        """The channel MLP's first layer (1×1 conv + ReLU) on template taps given as rows:
        ``(m, 4·hid)`` → ``(m, 8·hid)``."""
        first = self.conv[0]
        return F.relu(F.linear(taps, first.weight.view(first.out_channels, self.template_ch), first.bias))

    def blocks(self, template: torch.Tensor, kh: int, kw: int, rows: int | None = None,
               cols: int | None = None) -> torch.Tensor:
        """``(n, 4·hid, s, s)`` → ``(n, rows, cols, kh, kw)`` from the top-left taps.

        ``rows × cols`` (default: all ``out × in``) selects the top-left corner of the channel
        block by computing only those output rows of the last 1×1 conv (:meth:`last_rows`), which
        equals decoding the whole block and slicing it, for any ``rows``, ``cols``."""
        rows, cols = rows or self.out_ch, cols or self.in_ch
        x = template[:, :, :kh, :kw]
        if rows == self.out_ch and cols == self.in_ch:
            y = self.conv(x)  # (n, out·in, kh, kw)
        else:
            sel, bias = self.last_rows(rows, cols)
            hidden = self.conv[1](self.conv[0](x))
            y = F.conv2d(hidden, sel.view(rows * cols, -1, 1, 1), bias)  # (n, rows·cols, kh, kw)
        return y.view(len(y), rows, cols, kh, kw)

    def classifier(self, block: torch.Tensor) -> torch.Tensor:
        """``(n, out, in, 1, 1)`` → ``(n, num_classes, in)``: the head acts on the out axis."""
        return self.class_layer_predictor(block[:, :, :, :, 0])[:, :, :, 0]


class Decoder1D(nn.Module):
    def __init__(self, hid: int, max_ch: int) -> None:
        super().__init__()
        self.max_ch = max_ch
        self.fc = nn.Sequential(nn.Linear(hid, 2 * hid), nn.ReLU(), nn.Linear(2 * hid, 2 * max_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, hid)`` → ``(n, 2, max_ch)``."""
        return self.fc(x).view(len(x), 2, self.max_ch)
