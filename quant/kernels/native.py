"""The C++ kernels library (`torch.ops.quantserve`) and the process-wide kernel options.

`configure(kernels=, isa=)` is the single entry point (the service calls it from its settings
before loading); until it is called, the environment's QS_KERNELS / QS_KERNEL_ISA apply, for
the CLIs (read here and nowhere else). The ISA is set from here through the library's
`set_isa`; the C++ side reads no environment. The library is loaded (built on first use)
once per configuration, lazily, by the first `native_ops()`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger("quant.kernels")

REFERENCE = "reference"


def _env_defaults() -> dict[str, str]:
    """QS_KERNELS and QS_KERNEL_ISA: the defaults for processes that never call `configure` (CLIs)."""
    return {
        "kernels": os.environ.get("QS_KERNELS", "auto").strip().lower() or "auto",
        "isa": os.environ.get("QS_KERNEL_ISA", "auto").strip().lower() or "auto",
    }


_requested = _env_defaults()
_LOGGED: set[tuple[str, ...]] = set()  # once-only log keys; cleared by configure()


class _Native:
    """The loaded kernels library, or the reason it is not used (resolved once per configuration)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resolved = False
        self.ops = None
        self.reason = ""
        self.isa: str | None = None  # the ISA Python set (a raw ops.set_isa is picked up by refresh_isa)

    def reset(self) -> None:
        with self._lock:
            self._resolved = False
            self.ops, self.reason, self.isa = None, "", None

    def get(self):
        if not self._resolved:
            with self._lock:
                if not self._resolved:
                    self.ops, self.reason = _load_native()
                    self.isa = self.ops.isa() if self.ops is not None else None
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
        ops.set_isa("auto")
        log.warning("QS_KERNEL_ISA=%s is not available on this CPU; using %s", requested, ops.isa())
    log.info("quantserve kernels loaded (isa %s)", ops.isa())
    return ops, ""


def _register_fakes() -> None:
    """Shape-only implementations so that torch.compile can trace through the ops."""

    def linear_out(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n))

    torch.library.register_fake("quantserve::int8_g32_linear")(lambda x, w, s, b: linear_out(x, w.shape[0]))
    torch.library.register_fake("quantserve::int8_linear")(lambda x, w, s, b: linear_out(x, w.shape[0]))
    torch.library.register_fake("quantserve::int8_dynamic_linear")(lambda x, w, s, b: linear_out(x, w.shape[0]))
    torch.library.register_fake("quantserve::int4_linear")(lambda x, p, s, m, g, b: linear_out(x, p.shape[0]))
    torch.library.register_fake("quantserve::nf4_linear")(lambda x, p, a, c, g, b: linear_out(x, p.shape[0]))
    torch.library.register_fake("quantserve::fp8_linear")(lambda x, w, s, b: linear_out(x, w.shape[0]))


_NATIVE = _Native()


class _Switch:
    """use_reference()'s flag, read by the native kernels on every call (an explicit A/B switch)."""

    forced_reference = False


_SWITCH = _Switch()


def configure(kernels: str = "auto", isa: str = "auto") -> None:
    """Choose the kernels (`auto` or `reference`) and ISA (`auto`, `avx2`, `avx512vnni`) for this process.

    Call it before quantizing: layers choose their kernel when they are built (and keep it).
    """
    if _requested == {"kernels": kernels, "isa": isa}:
        return
    _requested.update(kernels=kernels, isa=isa)
    _NATIVE.reset()  # resolved again on the next call; the built library is only loaded once
    _LOGGED.clear()


def native_ops():
    """`torch.ops.quantserve` when the kernels are built and enabled, else None."""
    return _NATIVE.get()


def unavailable_reason() -> str:
    """Why the native kernels are not in use ("" when they are)."""
    return "" if native_ops() is not None else _NATIVE.reason


def active_isa() -> str | None:
    """The ISA the native kernels run (None when they are not in use)."""
    native_ops()
    return _NATIVE.isa


def refresh_isa() -> str | None:
    """`active_isa()`, re-read from the library (which a caller may have switched with its raw `set_isa`).

    One dispatcher call: for the choice of a layer's kernel, not for every call of an op.
    """
    ops = native_ops()
    if ops is not None:
        _NATIVE.isa = ops.isa()
    return _NATIVE.isa


def reference_forced() -> bool:
    return _SWITCH.forced_reference


@contextmanager
def use_reference() -> Iterator[None]:
    """Run every call in this block (in all threads) on the reference path: for A/B measurements.

    Layers keep (and report) the kernel they chose; only what runs changes inside the block.
    """
    previous, _SWITCH.forced_reference = _SWITCH.forced_reference, True
    try:
        yield
    finally:
        _SWITCH.forced_reference = previous


def log_once(key: tuple[str, ...], level: int, msg: str, *args: object) -> None:
    """Log `msg` the first time `key` is seen (until the next `configure` or `_LOGGED.clear()`)."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, msg, *args)
