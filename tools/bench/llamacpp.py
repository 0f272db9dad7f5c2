"""Optional peer row: llama.cpp (through `llama-cpp-python`) on the same GGUF, same prompt lengths.

Only used when `llama_cpp` is importable. It is not a dependency: its wheel
compiles llama.cpp from source (~10 minutes on 2 cores), so it stays out of CI.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from quant.checkpoints import DEFAULT_MODEL, embedded_gguf


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_for(model: str) -> Path | None:
    """The GGUF llama.cpp can load for `model`, or None (an HF directory has none)."""
    if model == DEFAULT_MODEL:
        return embedded_gguf()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_weight_bytes(path: Path) -> tuple[int, str]:
    """(bytes of the tensors, their dominant storage type), read from the GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        by_type[name] = by_type.get(name, 0) + int(tensor.n_bytes)
    return sum(by_type.values()), max(by_type, key=by_type.__getitem__)


def measure_llama_cpp(model: str, text: str, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict[str, Any]:
    from llama_cpp import Llama

    path = gguf_for(model)
    if path is None:
        raise ValueError(f"llama.cpp needs a GGUF; {model!r} is not one")
    weight_bytes, storage = gguf_weight_bytes(path)
    started = time.perf_counter()
    llm = Llama(
        model_path=str(path),
        n_ctx=prompt_tokens + decode_tokens + 16,
        n_batch=max(prompt_tokens, 8),
        n_threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        verbose=False,
    )
    load_seconds = time.perf_counter() - started

    ids = llm.tokenize(text[: prompt_tokens * 16].encode(), add_bos=True)
    while len(ids) < prompt_tokens:
        ids = ids + ids
    ids = ids[:prompt_tokens]
    best = float("inf")
    for _ in range(repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - started)

    llm.reset()
    llm.eval(ids[:8])
    started = time.perf_counter()
    for _ in range(decode_tokens):
        token = llm.sample(temp=0.0)  # greedy
        llm.eval([token])
    decode_seconds = time.perf_counter() - started
    return {
        "backend": f"llama.cpp {storage}",
        "compute_dtype": storage,
        "load_seconds": load_seconds,
        "weight_bytes": weight_bytes,
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": prompt_tokens / best,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_seconds,
    }
