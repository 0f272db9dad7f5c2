"""bitsandbytes backends: `Linear8bitLt` (LLM.int8()) and `Linear4bit` (nf4 / fp4), wrapped
so that the rest of the system sees an ordinary `QuantizedLinear`.

bitsandbytes keeps part of its state outside parameters and buffers (the int8
row scales, the 4-bit `quant_state`); `extra_tensors` exposes them so weight
bytes are counted honestly. Its CPU backend repacks 4-bit weights for its
bf16 kernel on the first inference forward; `from_linear` runs that forward
at once, so bytes and errors describe the format that actually serves.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from quant.config import ModeUnavailableError
from quant.kernels import BNB, BNB_INT8, LinearSpec
from quant.layers.base import QuantizedLinear

if TYPE_CHECKING:
    from types import ModuleType

BLOCK_SIZE_4BIT = 64  # bitsandbytes' default block of the 4-bit formats, stated explicitly

# Its CPU 4-bit repacking works on blocks of 32 output rows.
_CPU_4BIT_ROW_BLOCK = 32

# bitsandbytes' CPU backend tries to fetch an optional kernel from a model hub at
# import and warns when it cannot (always, here); its built-in kernel is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def import_bitsandbytes(mode: str, device: str) -> ModuleType:
    """bitsandbytes, or ModeUnavailableError with one line saying why `mode` cannot run on `device`."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as error:  # ImportError, or a broken native library
        raise ModeUnavailableError(
            f"precision {mode} needs bitsandbytes (pip install 'bitsandbytes>=0.50'): {error}"
        ) from None
    if device not in ("cpu", "cuda"):
        raise ModeUnavailableError(f"precision {mode}: bitsandbytes does not support device {device!r}")
    return bnb


class BnbLinear(QuantizedLinear):
    """A bitsandbytes linear module (`inner`) behind the QuantizedLinear interface."""

    kernel_format: ClassVar[str] = BNB

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__(inner.in_features, inner.out_features, bias=False)
        self.inner = inner  # holds the bias too
        self.select_kernel()

    def kernel_spec(self) -> LinearSpec:
        return self._spec(self.inner.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.inner)

    @staticmethod
    def _quantize_on_device(
        inner: nn.Linear, linear: nn.Linear, device: torch.device, bias_dtype: torch.dtype = torch.float32
    ) -> nn.Linear:
        """Give `inner` the float bias, then move it to `device`: bitsandbytes quantizes on that move."""
        if linear.bias is not None:
            inner.bias = nn.Parameter(linear.bias.detach().cpu().to(bias_dtype, copy=True), requires_grad=False)
        return inner.to(device).eval()

    @staticmethod
    def _float_weight(linear: nn.Linear, device: torch.device) -> torch.Tensor:
        # bitsandbytes quantizes on the move to the device; its kernels take float16 sources on GPUs.
        weight = linear.weight.detach().cpu().clone()
        return weight.to(torch.float16) if device.type == "cuda" else weight.float()


class BnbInt8Linear(BnbLinear):
    """`Linear8bitLt`: int8 rows with absmax scales; activation features above `threshold` stay in float16."""

    kernel_format: ClassVar[str] = BNB_INT8  # casts inputs to float16, the dtype its matmul works in

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> BnbInt8Linear:
        import bitsandbytes as bnb

        device = linear.weight.device
        inner = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=threshold,
            device="meta",
        )
        inner.weight = bnb.nn.Int8Params(cls._float_weight(linear, device), requires_grad=False, has_fp16_weights=False)
        # float16 bias: bitsandbytes would convert it at the first forward anyway (its matmul runs in float16)
        inner = cls._quantize_on_device(inner, linear, device, bias_dtype=torch.float16)
        return cls(inner)

    def _row_scales(self) -> torch.Tensor:
        # absmax per output row; bitsandbytes moves it from the weight to its matmul state at the first forward
        scales = self.inner.weight.SCB
        return self.inner.state.SCB if scales is None else scales

    def dequantize_weight(self) -> torch.Tensor:
        # Outlier features multiply these same dequantized columns, so this is the weight applied.
        return self.inner.weight.data.float() * (self._row_scales().float()[:, None] / 127)

    def extra_tensors(self) -> list[torch.Tensor]:
        return [self._row_scales()]


class Bnb4bitLinear(BnbLinear):
    """`Linear4bit`: blockwise (64) absmax 4-bit codes, NormalFloat or FP4, with bitsandbytes'
    default double quantization of the block scales."""

    @staticmethod
    def supports(out_features: int, device: torch.device) -> bool:
        return device.type != "cpu" or out_features % _CPU_4BIT_ROW_BLOCK == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: Literal["nf4", "fp4"] = "nf4") -> Bnb4bitLinear:
        import bitsandbytes as bnb

        device = linear.weight.device
        inner = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            quant_type=quant_type,
            device="meta",
        )
        inner.weight = bnb.nn.Params4bit(
            cls._float_weight(linear, device),
            requires_grad=False,
            blocksize=BLOCK_SIZE_4BIT,
            quant_type=quant_type,
            module=inner,
        )
        inner = cls._quantize_on_device(inner, linear, device)
        with torch.no_grad():  # settle the serving layout now (see the module docstring)
            inner(torch.zeros(1, linear.in_features, device=device))
        return cls(inner)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight this layer applies, read back by feeding it the identity matrix.

        Works whatever bitsandbytes' (device-dependent) 4-bit layout, and includes its arithmetic
        (e.g. bf16 activations on CPU), so it is what the layer really computes.
        """
        probe = torch.eye(self.in_features, device=self.inner.weight.device)
        with torch.no_grad():
            out = self(probe).float()
        if self.inner.bias is not None:
            out = out - self.inner.bias.float()
        return out.t().contiguous()

    def extra_tensors(self) -> list[torch.Tensor]:
        state = self.inner.weight.quant_state
        tensors = [state.absmax, state.code]
        nested = getattr(state, "state2", None)
        if getattr(state, "nested", False) and nested is not None:
            tensors += [nested.absmax, nested.code, state.offset]
        return [t for t in tensors if isinstance(t, torch.Tensor)]
