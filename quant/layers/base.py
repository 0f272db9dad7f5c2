"""What every quantized linear layer offers to the rest of the system."""

from __future__ import annotations

import torch
from torch import nn


class QuantizedLinear(nn.Module):
    """Base of the layers that replace `nn.Linear`.

    Subclasses declare their buffers in __init__, fill them in `from_linear`
    (quantize the weights) and implement `forward` (run the quantized layer).
    `dequantize_weight` gives the float weight they represent, for error reports
    and reference checks.
    """

    in_features: int
    out_features: int
    kernel: str = "reference"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def dequantize_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_tensors(self) -> list[torch.Tensor]:
        """Tensors the layer stores outside its parameters and buffers (counted in weight bytes)."""
        return []

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().float().clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"
