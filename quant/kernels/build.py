"""Build (once) and load the C++ kernels in `csrc/` as the `torch.ops.quantserve` library.

torch.utils.cpp_extension compiles them with ninja into a persistent cache,
`$QS_CACHE_DIR/kernels/<key>` (default ~/.cache/quantserve/kernels/<key>), where the key
hashes the sources, flags, torch version and machine: a fresh checkout builds once (about
a minute on 2 cores), every later process only loads the shared library.
No CUDA toolkit is needed. The ISA units pick their instruction sets with
`#pragma GCC target`, so one library serves AVX2 and AVX-512 machines alike.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

from quant.checkpoints import default_cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# decoder.cpp: the native decode step (quantserve.NativeDecoder / NativeLinear);
# grouped_ops.cpp: quantserve::int8_g32_linear (the Q8_0-layout output head);
# lut_ops.cpp: quantserve::fp8_linear and nf4_linear.
SOURCES = ("ops.cpp", "avx2.cpp", "avx512.cpp", "decoder.cpp", "grouped_ops.cpp", "lut_ops.cpp")
HEADERS = ("qs_kernels.h", "qs_impl.h", "qs_decode_impl.h", "qs_runtime.h")
# -fopenmp: at::parallel_for is inline; compiled without OpenMP it silently runs on one thread.
CFLAGS = ("-O3", "-fopenmp", "-std=c++20")  # std::atomic wait/notify (the team's futex barrier) are C++20
LDFLAGS = ("-fopenmp",)


def cache_root() -> Path:
    return default_cache_dir() / "kernels"


def build_key() -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join((*CFLAGS, *LDFLAGS, torch.__version__, platform.machine(), platform.system())).encode())
    return digest.hexdigest()[:16]


def load_library() -> Path:
    """Load the kernels library, building it first if the cache has none for these sources.

    Raises whatever the build raises (no compiler, no ninja, compile error); callers
    turn that into a logged fallback.
    """
    key = build_key()
    name = f"quantserve_kernels_{key}"
    build_dir = cache_root() / key
    library = build_dir / f"{name}.so"
    if library.exists():
        try:
            torch.ops.load_library(str(library))
            return library
        except OSError as exc:  # e.g. half-written by a concurrent build: build (or wait for it) below
            log.warning("could not load cached kernels %s (%s); rebuilding", library, exc)
    from torch.utils import cpp_extension  # slow import, only needed to build

    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("building quantserve kernels in %s (first use; about a minute on 2 cores)", build_dir)
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    log.info("built quantserve kernels in %.1f s", time.perf_counter() - start)
    return library
