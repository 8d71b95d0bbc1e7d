"""Decoders from node states to parameter blocks (GHN2_FACTS §4.1, §4.3, §4.4).

* :class:`ConvDecoder`: ``hid → (4·hid, s, s)`` spatial template, then a pointwise channel MLP
  ``4·hid → 8·hid → out·in`` shared by every kernel tap: a ``(out, in, kh, kw)`` block from the
  top-left ``kh × kw`` taps. The classifier head maps the 64 "out" rows to ``num_classes``.
* :class:`Decoder1D`: ``hid → 2·hid → 2·out``, viewed ``(2, out)``: row 0 a norm's scale, row 1
  a bias.
"""

from __future__ import annotations

import torch
from torch import nn


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

    def template(self, x: torch.Tensor, taps: tuple[int, int] | None = None) -> torch.Tensor:
        """``(n, hid)`` → ``(n, 4·hid, s, s)``, or only its top-left ``taps = (kh, kw)``:
        ``(n, 4·hid, kh, kw)``, computed from just those output rows of the linear layer."""
        if taps is None or taps == (self.s, self.s):
            return self.fc(x).view(len(x), self.template_ch, self.s, self.s)
        kh, kw = taps
        lin = self.fc[0]
        w = lin.weight.view(self.template_ch, self.s, self.s, -1)[:, :kh, :kw].reshape(-1, lin.in_features)
        b = lin.bias.view(self.template_ch, self.s, self.s)[:, :kh, :kw].reshape(-1)
        return torch.relu(torch.nn.functional.linear(x, w, b)).view(len(x), self.template_ch, kh, kw)

    def blocks(self, template: torch.Tensor, kh: int, kw: int, rows: int | None = None,
               cols: int | None = None) -> torch.Tensor:
        """``(n, 4·hid, s, s)`` → ``(n, rows, cols, kh, kw)`` from the top-left taps.

        ``rows × cols`` (default: all ``out × in``) selects the top-left corner of the channel
        block by computing only those output rows of the last 1×1 conv (row ``o·in + i``), which
        equals decoding the whole block and slicing it, for any ``rows``, ``cols``."""
        rows, cols = rows or self.out_ch, cols or self.in_ch
        x = template[:, :, :kh, :kw]
        if rows == self.out_ch and cols == self.in_ch:
            y = self.conv(x)  # (n, out·in, kh, kw)
        else:
            last = self.conv[2]
            sel = last.weight.view(self.out_ch, self.in_ch, -1)[:rows, :cols].reshape(rows * cols, -1, 1, 1)
            bias = last.bias.view(self.out_ch, self.in_ch)[:rows, :cols].reshape(-1)
            y = torch.nn.functional.conv2d(self.conv[1](self.conv[0](x)), sel, bias)  # (n, rows·cols, kh, kw)
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
