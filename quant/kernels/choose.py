"""Kernel objects and the chooser: which implementation runs a quantized linear layer.

Each kernel is a small object with a `name` (what `/info` reports) and
`can_implement(spec) -> str | None`: None when it can run a layer described by `spec`,
else why not. `choose_kernel(spec)` walks the candidates of the spec's storage format in
preference order and returns the first that can, logging once per reason why a better one
was skipped. A layer chooses when it is built (and again when `.to()` converts its
storage), keeps the object, and its `forward` calls it.

Kernel objects are stateless and shared by every layer that chose them; they call the
pure tensor functions below them (`quant.kernels.reference`, `torch.ops.quantserve`).
"""

from __future__ import annotations

import functools
import logging
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from quant.kernels import native, reference
from quant.kernels.native import REFERENCE
from quant.primitives import NF4_CODE

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # what the native kernels take
INT8_DYNAMIC_MAX_K = 65536  # the native kernel's int32 row accumulator stays exact below this
KNOWN_ISAS = ("avx512vnni", "avx2")  # the library's ISA units, best first (csrc/ops.cpp)

# Storage formats (LinearSpec.format); see quant/kernels/__init__.py for their tensors.
INT8 = "int8"  # int8 [N, K] + float scale [N]; activations stay float
INT8_DYNAMIC = "int8-dynamic"  # the int8 storage; activations quantized per token at run time
INT8_G32 = "int8-g32"  # int8 [N, K] + float16 scale per 32 inputs [N, K // 32] (llama.cpp's Q8_0)
INT4 = "int4"  # packed uint8 [N, K // 2] + float16 scales and mins [N, K // g]
NF4 = "nf4"  # packed NF4 indices [N, K // 2] + float16 absmax [N, K // block]
FP8 = "fp8"  # float8 [N, K] + float32 scale [N]
BNB = "bitsandbytes"  # a bitsandbytes module that runs itself
BNB_INT8 = "bitsandbytes-int8"  # bitsandbytes' Linear8bitLt (float16 inputs)


class LinearSpec(NamedTuple):
    """What a kernel needs to know about a layer to say whether it can run it."""

    format: str
    in_features: int
    out_features: int
    group_size: int | None = None  # int4 group, nf4 block
    scale_dtype: torch.dtype | None = None
    min_dtype: torch.dtype | None = None  # int4's mins
    device: str = "cpu"  # device type of the weights
    act_dtype: torch.dtype = torch.float32  # activations (the model's compute dtype)


def int4_group_size_reason(group_size: int) -> str:
    """Why the int4 kernel cannot take this group size ("" if it can)."""
    if group_size % 32 == 0 and (group_size <= 64 or group_size % 128 == 0):
        return ""
    return f"group_size {group_size} (kernels take 32, 64 or multiples of 128)"


class LinearKernel:
    """y = x·Wᵀ + b for one storage format. Call it with the activations and the format's tensors."""

    name: str = REFERENCE
    format: ClassVar[str]
    enabled: bool = True  # False: not in use in this process (why: can_implement); skipped without a warning

    def can_implement(self, spec: LinearSpec) -> str | None:
        return None

    def __call__(self, x: torch.Tensor, *tensors) -> torch.Tensor:
        raise NotImplementedError

    # Kernels are shared, stateless objects: copies of a layer share them, pickles name them.
    def __copy__(self) -> LinearKernel:
        return self

    def __deepcopy__(self, memo: dict) -> LinearKernel:
        return self

    def __reduce__(self):
        return _instance, (type(self), getattr(self, "isa", None))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---- reference kernels: dequantize-then-matmul, any device and dtype ------------


class ReferenceInt8Kernel(LinearKernel):
    format = INT8

    def __call__(self, x, w_int8, scale, bias):
        return reference.int8_linear(x, w_int8, scale, bias)


class ReferenceInt8DynamicKernel(LinearKernel):
    format = INT8_DYNAMIC

    def __call__(self, x, w_int8, w_scale, bias):
        return reference.int8_dynamic_linear(x, w_int8, w_scale, bias)


class ReferenceInt8G32Kernel(LinearKernel):
    format = INT8_G32

    def __call__(self, x, weight_int8, scales, bias):
        return reference.int8_g32_linear(x, weight_int8, scales, bias)


class ReferenceInt4Kernel(LinearKernel):
    format = INT4

    def __call__(self, x, packed, scales, mins, group_size, bias):
        return reference.int4_linear(x, packed, scales, mins, group_size, bias)


class ReferenceNF4Kernel(LinearKernel):
    format = NF4

    def __call__(self, x, packed, absmax, block_size, bias):
        return reference.nf4_linear(x, packed, absmax, block_size, bias)


class ReferenceFp8Kernel(LinearKernel):
    format = FP8

    def __call__(self, x, weight_fp8, scale, bias):
        return reference.fp8_linear(x, weight_fp8, scale, bias)


# ---- bitsandbytes: its own modules run themselves ----------------------------------


class BitsandbytesKernel(LinearKernel):
    name = "bitsandbytes"
    format = BNB

    def __call__(self, x: torch.Tensor, inner: nn.Module) -> torch.Tensor:
        return inner(x)


class BitsandbytesInt8Kernel(BitsandbytesKernel):
    format = BNB_INT8

    def __call__(self, x: torch.Tensor, inner: nn.Module) -> torch.Tensor:
        # Its matmul works on float16 inputs (and warns at every call when it has to cast them itself).
        return inner(x.to(torch.float16)).to(x.dtype)


# ---- our C++ kernels (torch.ops.quantserve) ------------------------------------------


def runtime_reason(x: torch.Tensor) -> str:
    """Why the native kernels cannot take these activations now ("" if they can).

    The only checks made on every call: what quantize time cannot know. A layer's kernel is
    chosen for its weights' device and the model's compute dtype, but a caller may still pass
    activations from another device or of another dtype, or ones that require grad.
    """
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (the kernels are CPU only)"
    if x.dtype not in ACTIVATION_DTYPES:
        return f"{x.dtype} activations"
    if x.requires_grad and torch.is_grad_enabled():
        return "inputs that require grad (the kernels have no backward)"
    return ""


class QuantserveKernel(LinearKernel):
    """A `torch.ops.quantserve` op on one ISA: activations quantized to int8 on the fly, integer SIMD dots.

    The ISA is process-wide in the library (`configure(isa=)`); the object records the one
    it was chosen under, which is the one its name reports.
    """

    op: ClassVar[str]  # in torch.ops.quantserve
    reference_kernel: ClassVar[type[LinearKernel]]  # what runs the inputs the op cannot take

    def __init__(self, isa: str | None) -> None:
        self.isa = isa  # None: the library is not in use
        self.enabled = isa is not None
        self.name = f"quantserve-{isa}" if isa else "quantserve"
        self.reference = _instance(self.reference_kernel)

    def can_implement(self, spec: LinearSpec) -> str | None:
        if self.isa is None:
            return f"kernels not in use ({native.unavailable_reason() or 'no ISA'})"
        if spec.device != "cpu":
            return f"{spec.device} tensors (the kernels are CPU only)"
        if spec.act_dtype not in ACTIVATION_DTYPES:
            return f"{spec.act_dtype} activations"
        return self.can_take(spec)

    def can_take(self, spec: LinearSpec) -> str | None:
        """The format's own limits (shape, group size, scale dtype)."""
        return None

    def op_args(self, tensors: tuple) -> tuple:
        """The op's arguments after x, from the layer's (the same unless a format adds constants)."""
        return tensors

    def __call__(self, x: torch.Tensor, *tensors) -> torch.Tensor:
        if native.reference_forced():  # use_reference(): the explicit A/B switch
            return self.reference(x, *tensors)
        reason = runtime_reason(x)
        if reason:  # only what cannot be known at quantize time (see runtime_reason)
            native.log_once((self.format, reason), logging.WARNING, "%s: reference path for %s", self.format, reason)
            return self.reference(x, *tensors)
        return getattr(torch.ops.quantserve, self.op).default(x, *self.op_args(tensors))


class QuantserveInt8Kernel(QuantserveKernel):
    format = INT8
    op = "int8_linear"
    reference_kernel = ReferenceInt8Kernel


class QuantserveInt8DynamicKernel(QuantserveKernel):
    format = INT8_DYNAMIC
    op = "int8_dynamic_linear"
    reference_kernel = ReferenceInt8DynamicKernel

    def can_take(self, spec: LinearSpec) -> str | None:
        if spec.in_features > INT8_DYNAMIC_MAX_K:
            return f"K = {spec.in_features} > {INT8_DYNAMIC_MAX_K}"
        return None


class QuantserveInt8G32Kernel(QuantserveKernel):
    format = INT8_G32
    op = "int8_g32_linear"
    reference_kernel = ReferenceInt8G32Kernel

    def can_take(self, spec: LinearSpec) -> str | None:
        if spec.scale_dtype != torch.float16:
            return f"scales of dtype {spec.scale_dtype} (the kernel takes float16)"
        if spec.in_features % 32:
            return f"in_features {spec.in_features} is not a multiple of 32"
        return None


class QuantserveInt4Kernel(QuantserveKernel):
    format = INT4
    op = "int4_linear"
    reference_kernel = ReferenceInt4Kernel

    def can_take(self, spec: LinearSpec) -> str | None:
        if spec.scale_dtype != torch.float16 or spec.min_dtype != torch.float16:
            return f"scales/mins of dtype {spec.scale_dtype}/{spec.min_dtype} (kernels take float16)"
        return int4_group_size_reason(spec.group_size or 0) or None


class QuantserveFp8Kernel(QuantserveKernel):
    """float8 codes widened exactly to float32 (no activation rounding); e4m3 and e5m2."""

    format = FP8
    op = "fp8_linear"
    reference_kernel = ReferenceFp8Kernel


@functools.cache
def nf4_code_table() -> torch.Tensor:
    """The 16 NF4 levels as the kernels take them (float32 [16]; one tensor per process)."""
    with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
        return torch.tensor(NF4_CODE, dtype=torch.float32)


class QuantserveNF4Kernel(QuantserveKernel):
    """NF4 levels looked up per code; the layer's tensors plus the level table."""

    format = NF4
    op = "nf4_linear"
    reference_kernel = ReferenceNF4Kernel

    def can_take(self, spec: LinearSpec) -> str | None:
        if spec.scale_dtype != torch.float16:
            return f"absmax of dtype {spec.scale_dtype} (the kernel takes float16)"
        return None

    def op_args(self, tensors: tuple) -> tuple:
        packed, absmax, block_size, bias = tensors
        return packed, absmax, nf4_code_table(), block_size, bias


# ---- the chooser ---------------------------------------------------------------------

# Candidates per storage format, best first; the last of each can run anything.
CANDIDATES: dict[str, tuple[type[LinearKernel], ...]] = {
    INT8: (QuantserveInt8Kernel, ReferenceInt8Kernel),
    INT8_DYNAMIC: (QuantserveInt8DynamicKernel, ReferenceInt8DynamicKernel),
    INT8_G32: (QuantserveInt8G32Kernel, ReferenceInt8G32Kernel),
    INT4: (QuantserveInt4Kernel, ReferenceInt4Kernel),
    NF4: (QuantserveNF4Kernel, ReferenceNF4Kernel),
    FP8: (QuantserveFp8Kernel, ReferenceFp8Kernel),
    BNB: (BitsandbytesKernel,),
    BNB_INT8: (BitsandbytesInt8Kernel,),
}


_INSTANCES: dict[tuple[type[LinearKernel], str | None], LinearKernel] = {}


def _instance(cls: type[LinearKernel], isa: str | None = None) -> LinearKernel:
    """The shared object of a kernel class (one per ISA for the native kernels)."""
    key = (cls, isa)
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(isa) if issubclass(cls, QuantserveKernel) else cls()  # type: ignore[call-arg]
    return _INSTANCES[key]


def _build_instances(classes: tuple[type[LinearKernel], ...]) -> None:
    # Built up front, so that choosing (also while torch.compile traces an op) creates no object.
    for cls in classes:
        for isa in (*KNOWN_ISAS, None) if issubclass(cls, QuantserveKernel) else (None,):
            _instance(cls, isa)


for _classes in CANDIDATES.values():
    _build_instances(_classes)


def register_format(fmt: str, classes: tuple[type[LinearKernel], ...]) -> None:
    """Add a storage format's candidates (best first; the last must run anything), e.g. from its layer module."""
    if CANDIDATES.get(fmt, classes) != classes:
        raise ValueError(f"storage format {fmt!r} already has candidates {CANDIDATES[fmt]}")
    CANDIDATES[fmt] = classes
    _build_instances(classes)


def candidates(fmt: str, *, live_isa: bool = False) -> list[LinearKernel]:
    """The kernels that may run layers of `fmt`, best first; the native ones for the active ISA.

    `live_isa` re-reads that ISA from the library (one dispatcher call: for a layer's choice, not
    per op call). Formats without native kernels never load the library.
    """
    if fmt not in CANDIDATES:
        raise ValueError(f"no kernels for storage format {fmt!r}; known: {sorted(CANDIDATES)}")
    classes = CANDIDATES[fmt]
    isa = None
    if any(issubclass(cls, QuantserveKernel) for cls in classes):
        isa = native.refresh_isa() if live_isa else native.active_isa()
    return [_instance(cls, isa if issubclass(cls, QuantserveKernel) else None) for cls in classes]


def choose_kernel(spec: LinearSpec, *, log_skips: bool = True, live_isa: bool = False) -> LinearKernel:
    """The first candidate of `spec.format` that can run `spec`; why better ones could not is logged once."""
    skipped: list[tuple[LinearKernel, str]] = []
    for kernel in candidates(spec.format, live_isa=live_isa):
        reason = kernel.can_implement(spec)
        if reason is None:
            if log_skips:
                for better, why in skipped:
                    _log_skip(spec.format, better, why, kernel)
            return kernel
        skipped.append((kernel, reason))
    raise LookupError(f"no kernel can run {spec}: " + "; ".join(f"{k.name}: {why}" for k, why in skipped))


def _log_skip(fmt: str, skipped: LinearKernel, why: str, chosen: LinearKernel) -> None:
    # A kernel not in use at all was logged once by the loader: repeat that only at debug level.
    level = logging.WARNING if skipped.enabled else logging.DEBUG
    runs = "reference path" if chosen.name == REFERENCE else chosen.name
    native.log_once((fmt, skipped.name, why), level, "%s: %s for %s (%s cannot take it)", fmt, runs, why, skipped.name)


def kernel_name(fmt: str, **spec: object) -> str:
    """The kernel a CPU float32 layer of `fmt` would get now (spec fields default to a shape any kernel takes)."""
    fields = {"in_features": 64, "out_features": 1, **spec}
    return choose_kernel(LinearSpec(fmt, **fields), log_skips=False).name  # type: ignore[arg-type]


def int8_kernel_name() -> str:
    return kernel_name(INT8)


def int4_kernel_name(group_size: int | None = None) -> str:
    """The kernel int4 layers of this group size run on (any supported size if None)."""
    g = 64 if group_size is None else group_size
    return kernel_name(INT4, in_features=g, group_size=g, scale_dtype=torch.float16, min_dtype=torch.float16)
