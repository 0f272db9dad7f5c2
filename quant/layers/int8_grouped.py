"""int8 weights with one float16 scale per 32 inputs: llama.cpp's Q8_0 layout, for the output head.

Storage (format "int8-g32"): `weight_int8` int8 [out, in] and `scales` float16 [out, in // 32];
w[n, k] = weight_int8[n, k] * scales[n, k // 32]. A row of `weight_int8` with its scales is
also an embedding row (`embedding_rows`), so a tied head and embedding can share the tensor.

Quantization takes each block's scale as max|w| / 127, rounds it to its stored float16 first,
then picks every weight's nearest code on that stored grid (clamped to ±127). A weight that
already lies on such a grid, e.g. a Q8_0 GGUF tensor de-quantized to float, comes back as the
very same codes and scales.

Kernels: `torch.ops.quantserve.int8_g32_linear` (csrc/grouped_ops.cpp; activations quantized
to int8 per 32-block, as the other int8 kernels do) or the reference (dequantize, float matmul),
chosen by `quant.kernels.choose` for the format "int8-g32".
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant.kernels.choose import INT8_G32, LinearSpec
from quant.kernels.reference import dequantize_int8_g32
from quant.layers.base import QuantizedLinear

BLOCK = 32
QMAX = 127
_FP16_MAX = 65504.0


def quantize_int8_g32(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scales float16 [N, K // 32]) of a float weight [N, K] with K % 32 == 0."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    scales = (blocks.abs().amax(-1) / QMAX).clamp_max(_FP16_MAX).to(torch.float16)
    step = scales.float()[..., None]
    # an all-zero block (or one whose scale underflows float16) keeps scale 0 and codes 0
    codes = torch.where(step > 0, torch.round(blocks / step.clamp_min(2.0**-24)), torch.zeros_like(blocks))
    codes = codes.clamp(-QMAX, QMAX).to(torch.int8)
    return codes.reshape(n, k).contiguous(), scales.contiguous()


def embedding_rows(codes: torch.Tensor, scales: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The de-quantized rows `token_ids` of an int8 g32 table, float32 [..., in_features]."""
    rows = codes[token_ids].float().unflatten(-1, (-1, BLOCK))
    return (rows * scales[token_ids].float()[..., None]).flatten(-2)


class Int8G32Linear(QuantizedLinear):
    """y = x · (weight_int8 * scales per 32-block)ᵀ + b."""

    kernel_format: ClassVar[str] = INT8_G32
    group_size: ClassVar[int] = BLOCK

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        if not self.supports(in_features):
            raise ValueError(f"in_features {in_features} is not a multiple of {BLOCK}")
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // BLOCK, dtype=torch.float16))
        self.select_kernel()

    @staticmethod
    def supports(in_features: int) -> bool:
        return in_features % BLOCK == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8G32Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight_int8, layer.scales = quantize_int8_g32(linear.weight)
        layer._copy_bias(linear)
        return layer._placed_like(linear)

    def kernel_spec(self) -> LinearSpec:
        return self._spec(self.weight_int8, group_size=BLOCK, scale_dtype=self.scales.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_int8_g32(self.weight_int8, self.scales)

    def embedding_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the de-quantized weight, float32 [..., in_features]: the tied embedding lookup."""
        return embedding_rows(self.weight_int8, self.scales, token_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.weight_int8, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={BLOCK}"


class Int8G32Embedding(nn.Module):
    """The input embedding of a tied model whose head is an `Int8G32Linear`: it reads the head's rows.

    It registers the head's own tensors, so the model holds one copy (counted once in weight bytes).
    """

    def __init__(self, head: Int8G32Linear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("weight_int8", head.weight_int8)
        self.register_buffer("scales", head.scales)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self.weight_int8, self.scales, token_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 with a float16 scale per {BLOCK} (the head's table)"
