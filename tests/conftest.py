"""Shared fixtures: a tiny random Llama (no download) and the real default model.

The suite never reads the developer's `QS_*` settings: they are dropped here, before any
project module is imported (`tests/__init__.py`), and child processes get `tests.support.env.clean_env()`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import quant.kernels as qk
from app.model_loader import LoadedModel, load_model
from app.settings import Settings, load_settings
from quant.checkpoints import DEFAULT_CACHE_DIR, convert_gguf, embedded_gguf
from tests.support.env import leaked_settings


def _train_tiny_tokenizer(target: Path):
    """A byte-level BPE trained in well under a second on text every Python ships."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values())[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    fast.save_pretrained(target)
    return fast


def build_tiny_llama(target: Path, **overrides) -> Path:
    """Save a randomly initialised tiny Llama + tokenizer as an HF checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer(target)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **overrides,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    return target


@pytest.fixture(autouse=True)
def _isolated_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no QS_* setting, cached settings or once-only kernel logs left by another."""
    from app.settings import get_settings

    for name in leaked_settings():
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    qk._LOGGED.clear()
    qk.configure()


@pytest.fixture(scope="module")
def ops():
    """The native kernels library; failing (not skipping) when it did not build, since the suite clears QS_KERNELS."""
    ops = qk.native_ops()
    if ops is None:
        pytest.fail(f"quantserve kernels did not build/load: {qk._NATIVE.reason}")
    return ops


def _isas() -> list[str]:
    ops = qk.native_ops()
    return list(ops.available_isas()) if ops is not None else ["none"]


@pytest.fixture(params=_isas())
def isa(request, ops):
    """Each ISA variant this CPU runs, set in the library for the test and restored after."""
    from quant.kernels.native import refresh_isa

    previous = ops.isa()
    ops.set_isa(request.param)
    refresh_isa()  # the Python side's record of the ISA follows the library's
    yield request.param
    ops.set_isa(previous)
    refresh_isa()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the default model's converted checkpoint is cached (kept between runs)."""
    return Path(os.environ.get("QS_CACHE_DIR", DEFAULT_CACHE_DIR))


@pytest.fixture(scope="session")
def default_checkpoint(cache_dir: Path) -> Path:
    return convert_gguf(embedded_gguf(), cache_dir)


@pytest.fixture(scope="session")
def real_model(default_checkpoint: Path, cache_dir: Path) -> Callable[..., LoadedModel]:
    """`real_model("int8")` loads the default model in a mode; each mode loads once per session."""
    loaded: dict[tuple, LoadedModel] = {}

    def get(precision: str, **settings) -> LoadedModel:
        key = (precision, tuple(sorted(settings.items())))
        if key not in loaded:
            loaded[key] = load_model(real_settings(cache_dir, precision=precision, **settings))
        return loaded[key]

    return get


def real_settings(cache_dir: Path, **overrides) -> Settings:
    return load_settings(cache_dir=cache_dir, device="cpu", **overrides)


def greedy_complete(loaded: LoadedModel, prompt: str, max_new_tokens: int = 12) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
