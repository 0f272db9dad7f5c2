"""Exact token limits: prompt + max_new_tokens == QS_MAX_TOTAL_TOKENS is served in full; one more is 422.

QS_MAX_TOTAL_TOKENS is also the lean runner's static KV cache length, so a request at the limit uses the
cache to its end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine.llama_runner import LlamaRunner
from app.engine.runner import HFRunner

MAX_INPUT = 64
MAX_TOTAL = 128
PROMPT = "The capital of France is"


def prompt_tokens(client, text: str) -> int:
    return len(client.app.state.service.loaded.tokenizer(text)["input_ids"])


def text_of(client, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens (with the tokenizer's special tokens)."""
    for word in (" x", " the", " a b", "."):
        for repeat in range(1, 4 * tokens):
            if prompt_tokens(client, "Say" + word * repeat) == tokens:
                return "Say" + word * repeat
    raise AssertionError(f"no prompt of {tokens} tokens found")


def assert_validation_error(response, *words: str) -> None:
    assert response.status_code == 422, response.text
    assert response.json().keys() == {"error", "error_type"}
    assert response.json()["error_type"] == "validation"
    for word in words:
        assert word in response.json()["error"]


def test_the_served_runner_caches_exactly_max_total_tokens(client):
    runner = client.app.state.service.engine.runner
    assert isinstance(runner, LlamaRunner)  # the cases below run the lean runner, not transformers'
    assert runner.max_len == MAX_TOTAL


def test_prompt_plus_max_tokens_equal_to_the_total_generates_every_token(client):
    n = prompt_tokens(client, PROMPT)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOTAL - n, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage == {"prompt_tokens": n, "completion_tokens": MAX_TOTAL - n, "total_tokens": MAX_TOTAL}
    assert response.json()["choices"][0]["finish_reason"] == "length"
    too_many = client.post("/v1/completions", json={**body, "max_tokens": MAX_TOTAL - n + 1})
    assert_validation_error(too_many, "QS_MAX_TOTAL_TOKENS")
    # TGI's route checks the same sum
    tgi = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOTAL - n, "details": True}}
    assert client.post("/generate", json=tgi).status_code == 200
    tgi["parameters"]["max_new_tokens"] += 1
    assert_validation_error(client.post("/generate", json=tgi), "QS_MAX_TOTAL_TOKENS")
    assert client.app.state.service.engine.stats() == (0, 0)


def test_streamed_request_at_the_total_ends_with_length(client):
    n = prompt_tokens(client, PROMPT)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOTAL - n, "ignore_eos": True, "seed": 1, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    assert '"error"' not in "".join(lines)  # no error event at the cache's end
    assert f'"completion_tokens":{MAX_TOTAL - n}' in lines[-2]


def test_chat_default_budget_fills_the_total(client):
    """Without max_tokens, a chat may generate as many tokens as the total leaves: the exact limit again."""
    body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["total_tokens"] == MAX_TOTAL and usage["completion_tokens"] > 1


def test_prompt_of_exactly_max_input_tokens_is_accepted_and_one_more_is_422(client):
    exact, over = text_of(client, MAX_INPUT), text_of(client, MAX_INPUT + 1)
    body = {"max_tokens": MAX_TOTAL - MAX_INPUT, "ignore_eos": True}
    response = client.post("/v1/completions", json={"prompt": exact, **body})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] == MAX_TOTAL
    assert_validation_error(client.post("/v1/completions", json={"prompt": over, **body}), "QS_MAX_INPUT_TOKENS")


def test_lean_runner_decodes_at_its_last_cache_position(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    max_len, cpu = 16, torch.device("cpu")
    lean, hf = LlamaRunner(model, cpu, 1, max_len), HFRunner(model, cpu)
    for runner in (lean, hf):
        runner.prefill(0, [5, 17])
    for token in range(max_len - 2):  # the last one writes position max_len - 1
        torch.testing.assert_close(lean.decode([0], [token]), hf.decode([0], [token]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=f"max_len {max_len}"):
        lean.decode([0], [1])
