"""What every quantized linear layer offers to the rest of the system."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant.kernels import LinearKernel, LinearSpec, choose_kernel


class QuantizedLinear(nn.Module):
    """Base of the layers that replace `nn.Linear`.

    Subclasses declare their buffers in __init__ (ending it with `select_kernel()`), fill them
    in `from_linear` (quantize the weights) and implement `forward` (call `self.linear_kernel`
    with their tensors). `dequantize_weight` gives the float weight they represent, for error
    reports and reference checks.

    The kernel is chosen from `kernel_spec()` when the layer is built, and again whenever
    `.to()` (or `.half()`, `.cuda()`, ...) converts its storage; `forward` never re-decides.
    """

    kernel_format: ClassVar[str]  # a storage format of quant.kernels (its candidate kernels)
    in_features: int
    out_features: int
    linear_kernel: LinearKernel  # a plain attribute (not a buffer): the kernel forward runs
    act_dtype: torch.dtype  # the activations' dtype the kernel was chosen for (the model's compute dtype)

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.act_dtype = torch.float32
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    @property
    def kernel(self) -> str:
        """The name of the kernel this layer runs (what QuantReport.kernels and /info count)."""
        return self.linear_kernel.name

    def kernel_spec(self) -> LinearSpec:
        """The layer as the kernels see it: storage format, shape, scale dtypes, device, activation dtype."""
        raise NotImplementedError

    def _spec(self, storage: torch.Tensor, **details: object) -> LinearSpec:
        """The spec of this layer, whose main storage tensor is `storage`, plus format details (group size, ...)."""
        return LinearSpec(
            self.kernel_format,
            self.in_features,
            self.out_features,
            device=storage.device.type,
            act_dtype=self.act_dtype,
            **details,
        )

    def select_kernel(self) -> LinearKernel:
        # live_isa: once per layer, name the ISA the library runs now (whoever set it)
        self.linear_kernel = choose_kernel(self.kernel_spec(), live_isa=True)
        return self.linear_kernel

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() convert the storage (and the compute dtype a float cast implies):
        # choose again for what the layer now holds.
        super()._apply(fn, recurse)
        self.act_dtype = fn(torch.empty(0, dtype=self.act_dtype)).dtype
        self.select_kernel()
        return self

    def _placed_like(self, linear: nn.Linear) -> QuantizedLinear:
        """On `linear`'s device, for activations of its dtype; `.to()` chooses the kernel for that (see _apply)."""
        self.act_dtype = linear.weight.dtype
        return self.to(linear.weight.device)

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
