"""The lean Llama-family runner against transformers' forward (`HFRunner`).

Tolerance: fp32 logits within atol 1e-4 + rtol 1e-4 of transformers' on the
tiny models, 1e-3 + 1e-4 on the default model (logits up to ~40 there; the
observed gap is ~4e-5: only the order of float operations differs).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import quant
from app.engine import llama_runner
from app.engine.llama_runner import LlamaRunner, unsupported_reason
from app.engine.runner import HFRunner, ModelRunner, make_runner
from quant.layers.int8 import Int8WeightOnlyLinear
from tests.support.runner_steps import replay_release_join

CPU = torch.device("cpu")
MAX_LEN = 64
TINY = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


def random_model(model_cls: type[nn.Module], config) -> nn.Module:
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


PROMPTS = [[5, 17, 42, 7, 99], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [250, 8]]


def greedy(runner: ModelRunner, slots: list[int], prompts: list[list[int]], steps: int) -> list[list[torch.Tensor]]:
    """Logits of each slot's prefill and `steps` batched greedy decode steps."""
    logits = [[runner.prefill(slot, prompt)] for slot, prompt in zip(slots, prompts, strict=True)]
    for _ in range(steps):
        tokens = [int(seq[-1].argmax()) for seq in logits]
        for seq, row in zip(logits, runner.decode(slots, tokens), strict=True):
            seq.append(row)
    return logits


def assert_same_run(actual: list[list[torch.Tensor]], expected: list[list[torch.Tensor]], atol: float = 1e-4) -> None:
    for seq_actual, seq_expected in zip(actual, expected, strict=True):
        assert [int(t.argmax()) for t in seq_actual] == [int(t.argmax()) for t in seq_expected]
        close(torch.stack(seq_actual), torch.stack(seq_expected), atol)


def test_prefill_and_greedy_decode_match_transformers(tiny_llama):
    for prompt in PROMPTS:
        expected = greedy(HFRunner(tiny_llama, CPU), [0], [prompt], steps=8)
        assert_same_run(greedy(LlamaRunner(tiny_llama, CPU, 1, MAX_LEN), [0], [prompt], steps=8), expected)


@pytest.mark.parametrize("serial_positions", [llama_runner._SERIAL_POSITIONS, 0], ids=["serial", "all-threads"])
def test_batched_decode_equals_one_by_one(tiny_llama, monkeypatch, serial_positions):
    monkeypatch.setattr(llama_runner, "_SERIAL_POSITIONS", serial_positions)
    threads = torch.get_num_threads()
    alone = [greedy(LlamaRunner(tiny_llama, CPU, 1, MAX_LEN), [0], [p], steps=6)[0] for p in PROMPTS]
    # slots given out of order and not 0..n-1: rows are the runner's business
    batched = greedy(LlamaRunner(tiny_llama, CPU, 3, MAX_LEN), [7, 2, 5], PROMPTS, steps=6)
    assert_same_run(batched, alone)
    assert torch.get_num_threads() == threads


def test_release_join_and_partial_steps(tiny_llama):
    """A released middle sequence, a late joiner and a step over part of the batch leave the others untouched."""
    hf, lean = HFRunner(tiny_llama, CPU), LlamaRunner(tiny_llama, CPU, 3, MAX_LEN)
    replay_release_join(lean, hf, PROMPTS, lambda actual, expected, what: close(actual, expected))


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (Qwen2ForCausalLM, Qwen2Config(**TINY)),  # q/k/v biases
        (MistralForCausalLM, MistralConfig(**TINY, head_dim=32, sliding_window=4096)),  # head_dim != hidden/heads
        (LlamaForCausalLM, LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "factor": 2.0})),
        (LlamaForCausalLM, LlamaConfig(**{**TINY, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True)),
    ],
    ids=["qwen2", "mistral-head-dim", "llama-linear-rope", "llama-mha-biases"],
)
def test_family_members_match_transformers(model_cls, config):
    model = random_model(model_cls, config)
    assert unsupported_reason(model, MAX_LEN) is None
    expected = greedy(HFRunner(model, CPU), [0, 1], PROMPTS[:2], steps=5)
    assert_same_run(greedy(LlamaRunner(model, CPU, 2, MAX_LEN), [0, 1], PROMPTS[:2], steps=5), expected)


def test_quantized_projections_run_as_black_boxes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    report = quant.quantize_(model, quant.make_config("int8", quant.QuantOptions(quantize_lm_head=False)))
    assert report.layers_quantized == 14  # 7 projections x 2 layers; the tied head stays float
    expected = greedy(HFRunner(model, CPU), [0, 1], PROMPTS[:2], steps=5)
    assert_same_run(greedy(LlamaRunner(model, CPU, 2, MAX_LEN), [0, 1], PROMPTS[:2], steps=5), expected)


def test_bf16_cache_and_compute(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    lean = LlamaRunner(model, CPU, 1, MAX_LEN)
    assert lean.k_cache.dtype == torch.bfloat16
    expected, actual = greedy(HFRunner(model, CPU), [0], PROMPTS[1:2], 4), greedy(lean, [0], PROMPTS[1:2], 4)
    # bf16 keeps ~3 significant digits; the op order differs from transformers'
    torch.testing.assert_close(torch.stack(actual[0]), torch.stack(expected[0]), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_prefill_computes_in_float32_without_16bit_gemm(tiny_model_dir, monkeypatch, dtype):
    """On a CPU without GEMM instructions for the dtype, prefill runs in float32 on widened weights:
    the float32 model's prefill up to the 16-bit embedding table; decode keeps torch's 16-bit path."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    assert LlamaRunner(model, CPU, 1, MAX_LEN).prefill_float32 == (not llama_runner.has_fast_gemm(dtype))
    monkeypatch.setattr(llama_runner, "has_fast_gemm", lambda d: False)
    widened_calls: list[torch.dtype] = []
    real_widened = llama_runner._widened

    def spy(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        widened_calls.append(x.dtype)
        return real_widened(module, x)

    monkeypatch.setattr(llama_runner, "_widened", spy)
    runner = LlamaRunner(model, CPU, 1, MAX_LEN)
    assert runner.prefill_float32 and runner.k_cache.dtype == dtype
    logits = runner.prefill(0, PROMPTS[0])
    assert widened_calls == [torch.float32] * (7 * len(runner.layers))
    runner.decode([0], [int(logits.argmax())])
    assert len(widened_calls) == 7 * len(runner.layers)  # decode: torch's 16-bit path
    # the float32 twin (same weight values): equal but for the 16-bit head and the cache's rounding
    twin = LlamaRunner(copy.deepcopy(model).float(), CPU, 1, MAX_LEN)
    expected = twin.prefill(0, PROMPTS[0])
    torch.testing.assert_close(logits.float(), expected, atol=2e-2, rtol=2e-2)
    tolerance = 2**-7 if dtype == torch.bfloat16 else 2**-10  # one rounding to the cache's dtype
    n = len(PROMPTS[0])
    torch.testing.assert_close(runner.k_cache[:, 0, :, :n].float(), twin.k_cache[:, 0, :, :n], atol=0, rtol=tolerance)


def test_widened_projection_is_the_float32_product_rounded_once():
    torch.manual_seed(3)
    linear = nn.Linear(64, 24).to(torch.float16)
    x = torch.randn(5, 64).to(torch.float16)
    want = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float()).half()
    assert torch.equal(llama_runner._widened(linear, x), want)
    int8 = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 24))
    assert torch.equal(llama_runner._widened(int8, x.float()), int8(x.float()))  # not an nn.Linear: its own forward


def test_make_runner_picks_lean_runner_for_the_llama_family(tiny_llama):
    assert isinstance(make_runner(tiny_llama, CPU, 2, MAX_LEN), LlamaRunner)
    gpt2 = random_model(GPT2LMHeadModel, GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    short_window = random_model(MistralForCausalLM, MistralConfig(**TINY, sliding_window=16))
    dynamic_rope = random_model(
        LlamaForCausalLM, LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    )
    for model, reason in [(gpt2, "model type"), (short_window, "sliding-window"), (dynamic_rope, "rope type")]:
        assert reason in unsupported_reason(model, MAX_LEN)
        assert isinstance(make_runner(model, CPU, 2, MAX_LEN), HFRunner)


def test_limits(tiny_llama):
    lean = LlamaRunner(tiny_llama, CPU, 2, 8)
    with pytest.raises(ValueError, match="prompt of 9 tokens"):
        lean.prefill(0, list(range(9)))
    lean.prefill(0, list(range(7)))
    lean.prefill(1, [1])
    with pytest.raises(RuntimeError, match="all 2 slots"):
        lean.prefill(2, [1])
    lean.decode([0, 1], [1, 2])
    with pytest.raises(ValueError, match="max_len 8"):
        lean.decode([0, 1], [1, 2])
    with pytest.raises(ValueError, match="distinct slots"):
        lean.decode([1, 1], [1, 2])
    lean.prefill(0, [4, 5])  # prefilling a live slot starts it over
    lean.decode([0, 1], [1, 2])


@pytest.mark.real_model
def test_default_model_greedy_and_batched_match_transformers(real_model):
    """Three prompts decoded as one batch give transformers' greedy `generate` tokens and logits."""
    loaded = real_model("fp32")
    prompts = ["The capital of France is", "def fibonacci(n):", "Here is a short story about a robot. Once"]
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    steps = 12
    batched = greedy(LlamaRunner(loaded.model, loaded.device, 3, 128), [0, 1, 2], ids, steps)
    for prompt_ids, lean_run in zip(ids, batched, strict=True):
        with torch.inference_mode():
            out = loaded.model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=steps + 1,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        expected = [logits[0].float() for logits in out.logits]
        assert out.sequences[0, len(prompt_ids) :].tolist() == [int(t.argmax()) for t in expected]
        assert_same_run([lean_run], [expected], atol=1e-3)
