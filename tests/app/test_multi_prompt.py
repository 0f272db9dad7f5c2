"""/v1/completions with a list of prompts: one refused prompt refuses all and frees the others' slots;
streamed, every prompt's chunks carry its index and end with its own finish_reason."""

from __future__ import annotations

import json

import pytest

from tests.support.live_server import record_steps, wait_idle

GOOD = ["The capital of France is", "Python is a"]
LONG = 100  # tokens each good prompt would generate if nobody cancelled it: 1 s at 10 ms a step
OVER_INPUT = "word " * 200  # far over QS_MAX_INPUT_TOKENS (64)
OVER_TOTAL = "Functions are defined with the def statement " * 4  # under 64 tokens, but with LONG over 128


def sse_data(response) -> list[str]:
    return [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("prompts", "limit"),
    [
        ([*GOOD, OVER_INPUT], "QS_MAX_INPUT_TOKENS"),
        ([GOOD[0], OVER_TOTAL, GOOD[1]], "QS_MAX_TOTAL_TOKENS"),
    ],
    ids=["over-input-last", "over-total-middle"],
)
def test_one_refused_prompt_refuses_all_and_frees_the_siblings(make_client, monkeypatch, prompts, limit, stream):
    recorders = record_steps(monkeypatch, step_seconds=0.01)
    with make_client() as client:
        app, recorder = client.app, recorders[-1]
        tokenizer = app.state.service.loaded.tokenizer
        assert len(tokenizer(OVER_TOTAL)["input_ids"]) <= 64  # refused for the sum, not the prompt alone
        prefills, steps = len(recorder.slots("prefill")), len(recorder.slots("decode"))
        body = {"prompt": prompts, "max_tokens": LONG, "ignore_eos": True, "stream": stream}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 422, response.text
        assert response.json() == {"error": response.json()["error"], "error_type": "validation"}
        assert limit in response.json()["error"]
        assert wait_idle(app) == (0, 0)
        # the good prompts opened before the refusal were cancelled, not run to their end
        opened = next(i for i, p in enumerate(prompts) if p not in GOOD)  # good prompts before the refused one
        assert len(recorder.slots("prefill")) - prefills <= opened
        assert len(recorder.slots("decode")) - steps < LONG // 10
        # every slot is free again: a full batch of requests is served
        follow_up = client.post("/v1/completions", json={"prompt": GOOD * 4, "max_tokens": 3, "ignore_eos": True})
        assert follow_up.status_code == 200, follow_up.text
        assert [c["finish_reason"] for c in follow_up.json()["choices"]] == ["length"] * 8


def test_an_empty_prompt_among_good_ones_is_422_before_anything_runs(make_client, monkeypatch):
    recorders = record_steps(monkeypatch)
    with make_client() as client:
        prefills = len(recorders[-1].slots("prefill"))
        response = client.post("/v1/completions", json={"prompt": [GOOD[0], ""], "max_tokens": 4})
        assert response.status_code == 422
        assert response.json()["error_type"] == "validation"
        assert len(recorders[-1].slots("prefill")) == prefills
        assert client.app.state.service.engine.stats() == (0, 0)


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_prompts_carry_their_index_and_each_ends_with_its_finish_reason(client, echo):
    prompts = [*GOOD, "Exceptions are"]
    n = 6
    body = {"prompt": prompts, "max_tokens": n, "temperature": 0, "ignore_eos": True, "echo": echo}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        assert response.status_code == 200
        data = sse_data(response)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n * len(prompts)
    texts = {i: "" for i in range(len(prompts))}
    finished: dict[int, str] = {}
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        index = choice["index"]
        assert index not in finished, f"prompt {index} got a chunk after its finish_reason"
        texts[index] += choice["text"]
        if choice["finish_reason"] is not None:
            finished[index] = choice["finish_reason"]
    assert finished == {i: "length" for i in range(len(prompts))}
    assert [texts[i] for i in range(len(prompts))] == [c["text"] for c in whole["choices"]]
    if echo:
        assert all(texts[i].startswith(p) for i, p in enumerate(prompts))
