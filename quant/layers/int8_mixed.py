"""LLM.int8()-style mixed int8: outlier input features in float, the rest W8A8."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from quant.kernels import INT8_DYNAMIC
from quant.layers.int8 import Int8WeightOnlyLinear


class Int8MixedLinear(Int8WeightOnlyLinear):
    """LLM.int8() (Dettmers et al. 2022): input features where any token's |x| exceeds
    `threshold` are outliers; they multiply the (dequantized) weight columns in
    float, while every other feature goes through the W8A8 path. Without the
    split, one outlier feature would set the per-token scale and flatten the rest.
    The W8A8 part runs on the layer's int8-dynamic kernel.
    """

    kernel_format: ClassVar[str] = INT8_DYNAMIC

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float = 6.0) -> None:
        super().__init__(in_features, out_features, bias)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_max = x.detach().abs().reshape(-1, self.in_features).amax(dim=0)
        outliers = torch.nonzero(feature_max > self.threshold).squeeze(1)
        if outliers.numel() == 0:
            return self.linear_kernel(x, self.weight_int8, self.scale, self.bias)
        regular = x.index_fill(-1, outliers, 0)  # zeroed features add nothing to the int8 product
        y = self.linear_kernel(regular, self.weight_int8, self.scale, self.bias)
        w_outliers = self.weight_int8.index_select(1, outliers).to(x.dtype) * self.scale[:, None].to(x.dtype)
        return y + F.linear(x.index_select(-1, outliers), w_outliers)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"
