"""Linear-layer kernels for the quantized storage formats, with reference fallbacks.

Layers call these functions and never pick an implementation themselves.
Storage formats (shared by quant modes and kernels):
- int8: `w_int8` int8 [N, K], `scale` float32 [N]; w ≈ w_int8 * scale[:, None].
- int4: `packed` uint8 [N, K // 2] (code of k = 2i in the low nibble, k = 2i+1 in
  the high nibble), `scales` and `mins` float16 [N, K // group_size];
  w[n, k] ≈ code * scales[n, k // g] + mins[n, k // g], codes 0..15.

Backends
- "quantserve-<isa>": our C++ kernels (`csrc/`, ops `torch.ops.quantserve.*`), the default on
  CPU for float32/bfloat16 activations. They quantize activations to int8 on the fly (per
  32-element block; per row for `int8_dynamic_linear`, as its reference does) and run integer
  SIMD dot products: AVX2 everywhere, AVX-512 VNNI where the CPU has it.
- "reference": dequantize-then-float-matmul in plain torch (any device, dtype, shape).
Whenever a call takes the reference path while the kernels are enabled, the reason is logged
once (per op and reason).

Choice: `configure(kernels=..., isa=...)` (the service calls it from its settings before loading);
until then the environment's QS_KERNELS (`reference` forces the reference path, no build) and
QS_KERNEL_ISA (`avx2` or `avx512vnni`; default: the best the CPU runs) apply, for the CLIs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from quant.primitives import quantize_symmetric, unpack_int4

log = logging.getLogger(__name__)

REFERENCE = "reference"
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
INT8_DYNAMIC_MAX_K = 65536  # the kernel's int32 row accumulator stays exact below this


class _Native:
    """The loaded kernels library, or the reason it is not used (resolved once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resolved = False
        self.ops = None
        self.reason = ""

    def reset(self) -> None:
        with self._lock:
            self._resolved = False
            self.ops, self.reason = None, ""

    def get(self):
        if not self._resolved:
            with self._lock:
                if not self._resolved:
                    self.ops, self.reason = _load_native()
                    self._resolved = True
        return self.ops


def _load_native():
    if _requested["kernels"] == REFERENCE:
        log.info("kernels=reference: quantized linears use the reference path")
        return None, "QS_KERNELS=reference"
    try:
        from quant.kernels.build import load_library

        load_library()
        ops = torch.ops.quantserve
        if ops.isa() == "none":
            raise RuntimeError("this CPU has none of the kernels' instruction sets (need AVX2, FMA and F16C)")
    except Exception as exc:  # no compiler/ninja, failed build, unsupported CPU: run the reference path
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        log.warning("quantserve kernels unavailable, quantized linears use the reference path (%s)", reason)
        return None, reason
    _register_fakes()
    requested = _requested["isa"]
    if requested in ("auto", ""):
        ops.set_isa("auto")
    elif requested in ops.available_isas():
        ops.set_isa(requested)
    else:
        log.warning("QS_KERNEL_ISA=%s is not available on this CPU; using %s", requested, ops.isa())
    log.info("quantserve kernels loaded (isa %s)", ops.isa())
    return ops, ""


def _register_fakes() -> None:
    """Shape-only implementations so that torch.compile can trace through the ops."""

    def linear_out(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n))

    torch.library.register_fake("quantserve::int8_linear")(lambda x, w, s, b: linear_out(x, w.shape[0]))
    torch.library.register_fake("quantserve::int8_dynamic_linear")(lambda x, w, s, b: linear_out(x, w.shape[0]))
    torch.library.register_fake("quantserve::int4_linear")(lambda x, p, s, m, g, b: linear_out(x, p.shape[0]))


_NATIVE = _Native()
_LOGGED: set[tuple[str, str]] = set()
_forced_reference = False
_requested = {
    "kernels": os.environ.get("QS_KERNELS", "auto").strip().lower() or "auto",
    "isa": os.environ.get("QS_KERNEL_ISA", "auto").strip().lower() or "auto",
}


def configure(kernels: str = "auto", isa: str = "auto") -> None:
    """Choose the kernels (`auto` or `reference`) and ISA (`auto`, `avx2`, `avx512vnni`) for this process."""
    if _requested == {"kernels": kernels, "isa": isa}:
        return
    _requested.update(kernels=kernels, isa=isa)
    _NATIVE.reset()  # resolved again on the next call; the built library is only loaded once
    _LOGGED.clear()


def native_ops():
    """`torch.ops.quantserve` when the kernels are built and enabled, else None."""
    return _NATIVE.get()


@contextmanager
def use_reference() -> Iterator[None]:
    """Run every call in this block (in all threads) on the reference path: for A/B measurements."""
    global _forced_reference
    previous, _forced_reference = _forced_reference, True
    try:
        yield
    finally:
        _forced_reference = previous


def _fallback(op: str, reason: str) -> None:
    if (op, reason) not in _LOGGED:
        _LOGGED.add((op, reason))
        log.warning("%s: reference path for %s", op, reason)


def _native_op(op: str, x: torch.Tensor, extra_reason: Callable[[], str] | None = None):
    """The native op to run for activations `x`, or None (reason logged once) for the reference path."""
    ops = _NATIVE.get()
    if ops is None or _forced_reference:
        return None
    if x.device.type != "cpu":
        reason = f"{x.device.type} tensors (the kernels are CPU only)"
    elif x.dtype not in ACTIVATION_DTYPES:
        reason = f"{x.dtype} activations"
    elif x.requires_grad and torch.is_grad_enabled():
        reason = "inputs that require grad (the kernels have no backward)"
    else:
        reason = extra_reason() if extra_reason is not None else ""
    if reason:
        _fallback(op, reason)
        return None
    return getattr(ops, op).default


def _kernel_name() -> str:
    ops = _NATIVE.get()
    return REFERENCE if ops is None else f"quantserve-{ops.isa()}"


def int8_kernel_name() -> str:
    return _kernel_name()


def int4_kernel_name(group_size: int | None = None) -> str:
    """The kernel int4 layers of this group size run on (any supported size if None)."""
    if group_size is not None and int4_group_size_reason(group_size):
        return REFERENCE
    return _kernel_name()


def int4_group_size_reason(group_size: int) -> str:
    """Why the int4 kernel cannot take this group size ("" if it can)."""
    if group_size % 32 == 0 and (group_size <= 64 or group_size % 128 == 0):
        return ""
    return f"group_size {group_size} (kernels take 32, 64 or multiples of 128)"


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    grouped = codes.reshape(n, k // group_size, group_size)
    w = grouped * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(n, k)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x · (w_int8 * scale)ᵀ + bias, for x [..., K]."""
    op = _native_op("int8_linear", x)
    if op is not None:
        return op(x, w_int8, scale, bias)
    y = F.linear(x, w_int8.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int8_dynamic_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: x is quantized per token (row) to int8 at run time, then int8 · int8 with int32 accumulation."""

    def too_long() -> str:
        return f"K = {x.shape[-1]} > {INT8_DYNAMIC_MAX_K}" if x.shape[-1] > INT8_DYNAMIC_MAX_K else ""

    op = _native_op("int8_dynamic_linear", x, too_long)
    if op is not None:
        return op(x, w_int8, w_scale, bias)
    x_q, x_scale = quantize_symmetric(x, bits=8)  # grouped view [..., 1, K], scale [..., 1, 1]
    acc = torch.matmul(x_q.squeeze(-2).to(torch.int32), w_int8.t().to(torch.int32))
    y = acc.to(torch.float32) * x_scale.squeeze(-1) * w_scale.float()
    y = y.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x · dequant(packed)ᵀ + bias, for x [..., K]."""

    def unsupported() -> str:
        if scales.dtype != torch.float16 or mins.dtype != torch.float16:
            return f"scales/mins of dtype {scales.dtype}/{mins.dtype} (kernels take float16)"
        return int4_group_size_reason(group_size)

    op = _native_op("int4_linear", x, unsupported)
    if op is not None:
        return op(x, packed, scales, mins, group_size, bias)
    w = dequantize_int4(packed, scales, mins, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
