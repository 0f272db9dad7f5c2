"""Activation observers: the per-tensor int8 step of a linear's input, chosen from calibration data.

An observer sees every calibration activation of one input and, at the end, gives the clipping
value c; the int8 step is c / 127 and values beyond c saturate. Three ways to choose c:
- `minmax`: the largest |x| seen (nothing clips; one outlier stretches the step for everyone);
- `percentile`: the `PERCENTILE`th percentile of |x| (the top 0.01% clips);
- `mse`: the c that minimises the expected squared quantization error of the observed values,
  rounding (≈ step²/12 per value, x² for values that round to 0) against clipping ((|x| - c)²).

|x| is kept in a histogram of log2|x| with `BINS` bins over `OCTAVES` octaves below the range's
top (known in advance from the SmoothQuant statistics pass), so the relative resolution is the
same for small and large values (2^(24/4096) ≈ 0.4%); smaller values share the first bin (they
round to 0 whatever c is chosen).
"""

from __future__ import annotations

import math

import torch

from quant.config import ACTIVATION_OBSERVERS as OBSERVERS

PERCENTILE = 99.99
BINS = 4096
OCTAVES = 24
_QMAX = 127


class HistogramObserver:
    """Collects |x| of one input over [0, top] (top: the largest |x| calibration will show)."""

    def __init__(self, top: float) -> None:
        self.top = max(float(top), 1e-12)
        self.high = math.log2(self.top) + 1e-6  # a hair above: the maximum itself falls in the last bin
        self.low = self.high - OCTAVES
        self.counts = torch.zeros(BINS, dtype=torch.float64)
        self.max_seen = 0.0

    def observe(self, x: torch.Tensor) -> None:
        magnitude = x.detach().float().abs().flatten()
        self.max_seen = max(self.max_seen, float(magnitude.max()))
        logs = torch.log2(magnitude.clamp_min(2.0**self.low)).clamp_max(self.high)
        self.counts += torch.histc(logs, bins=BINS, min=self.low, max=self.high).double()

    def _centers(self) -> torch.Tensor:
        edges = torch.linspace(self.low, self.high, BINS + 1, dtype=torch.float64)
        return torch.exp2((edges[:-1] + edges[1:]) / 2)

    def _upper_edges(self) -> torch.Tensor:
        return torch.exp2(torch.linspace(self.low, self.high, BINS + 1, dtype=torch.float64)[1:])

    def clip(self, method: str) -> float:
        """The clipping value c (> 0) the method chooses; the int8 step is c / 127."""
        if self.max_seen <= 0:
            return 1e-12 * _QMAX  # an input that was always zero: any step reproduces it
        if method == "minmax":
            return self.max_seen
        if method == "percentile":
            cumulative = torch.cumsum(self.counts, 0) / self.counts.sum()
            index = int(torch.searchsorted(cumulative, torch.tensor(PERCENTILE / 100, dtype=torch.float64)))
            return min(float(self._upper_edges()[min(index, BINS - 1)]), self.max_seen)
        if method == "mse":
            return self._mse_clip()
        raise ValueError(f"activation observer must be one of {', '.join(OBSERVERS)}, got {method!r}")

    def _mse_clip(self) -> float:
        values, counts = self._centers(), self.counts
        # candidates: every other upper bin edge in the top 12 octaves (0.8% apart), and the maximum
        candidates = self._upper_edges()[BINS // 2 :: 2].clamp_max(self.max_seen)
        candidates = torch.unique(torch.cat([candidates, torch.tensor([self.max_seen], dtype=torch.float64)]))
        step = candidates[:, None] / _QMAX  # [C, 1]
        inside = values[None, :] <= candidates[:, None]
        rounding = torch.minimum(values[None, :] ** 2, step**2 / 12)
        clipped = (values[None, :] - candidates[:, None]) ** 2
        error = (torch.where(inside, rounding, clipped) * counts[None, :]).sum(1)
        return float(candidates[int(torch.argmin(error))])
