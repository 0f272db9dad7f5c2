"""Log-probabilities on every route (issue 18), on the tiny model through `fastapi.testclient`.

The numbers are checked against transformers' own forward of the same checkpoint: the
log-softmax of the raw logits, whatever the sampler did.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.live_server import record_steps

PROMPT = "The capital of France is"
PROMPTS = ["The capital of France is", "def main():", "Numbers: 1, 2, 3,"]
TOLERANCE = 1e-4  # our lean forward against transformers', float32


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """transformers' forward of the tiny checkpoint, and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the log-softmax of the logits after ids[: i + 1]."""
    model, _ = reference
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def sse_payloads(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        data = [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def assert_validation_error(response, *words: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation"
    for word in words:
        assert word in body["error"], body["error"]


# --- /v1/completions ------------------------------------------------------------
def test_echo_scores_the_prompt_as_the_model_does(client, reference):
    ids = reference[1](PROMPT)["input_ids"]
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 3}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"])
    assert logprobs["tokens"] == [reference[1].decode([i]) for i in ids]
    assert "".join(logprobs["tokens"]) == PROMPT
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
    # OpenAI's shape: nothing predicts the first token
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = reference_logprobs(reference, ids)
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert logprobs["token_logprobs"][position] == pytest.approx(float(row[ids[position]]), abs=TOLERANCE)
        top = logprobs["top_logprobs"][position]
        best = torch.topk(row, 3)
        # the 3 most likely (tokens decoding alike share a key), plus the prompt's own token
        texts = {reference[1].decode([i]) for i in best.indices.tolist()}
        assert set(top) - texts <= {logprobs["tokens"][position]}
        assert max(top.values()) == pytest.approx(float(best.values[0]), abs=TOLERANCE)
        assert min(top.values()) >= min(float(best.values[2]), logprobs["token_logprobs"][position]) - TOLERANCE


def test_echo_with_generation_appends_the_generated_tokens(client):
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 4, "logprobs": 1, "temperature": 0, "ignore_eos": True}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    prompt_only = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]
    prompt_tokens = len(prompt_only["logprobs"]["tokens"])
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == prompt_tokens + 4
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:prompt_tokens] == prompt_only["logprobs"]["token_logprobs"][1:]
    assert choice["text"] == PROMPT + "".join(logprobs["tokens"][prompt_tokens:])
    assert logprobs["text_offset"][prompt_tokens] == len(PROMPT)


def test_greedy_chooses_the_most_likely_token(client):
    """Without a repetition penalty, greedy's token has the highest log-prob at every step."""
    body = {"prompt": PROMPT, "max_tokens": 12, "logprobs": 5, "temperature": 0, "ignore_eos": True}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 12
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 5  # five most likely; those decoding alike share a key
        assert chosen == max(top.values())  # exactly: the same row of log-probs


def test_sampled_tokens_report_the_raw_logprobs(client, reference):
    """Temperature and top-k shape the choice, not the reported numbers (vLLM's default)."""
    raw = reference_logprobs(reference, reference[1](PROMPT)["input_ids"])[-1]
    chosen = set()
    for seed in range(8):
        parameters = {"max_new_tokens": 1, "details": True, "temperature": 1.7, "top_k": 3, "seed": seed}
        [token] = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()["details"][
            "tokens"
        ]
        assert token["logprob"] == pytest.approx(float(raw[token["id"]]), abs=TOLERANCE)
        chosen.add(token["id"])
    assert len(chosen) > 1  # some draws were not the argmax: the sampler really ran


def test_prompt_logprobs_of_a_batched_prefill_equal_a_solo_one(make_client):
    body = {"echo": True, "max_tokens": 0, "logprobs": 2}
    with make_client(max_batch_size=4) as client:
        together = client.post("/v1/completions", json={**body, "prompt": PROMPTS}).json()["choices"]
        alone = [client.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0] for p in PROMPTS]
    assert [c["index"] for c in together] == [0, 1, 2]
    for batched, solo in zip(together, alone, strict=True):
        assert batched["logprobs"] == solo["logprobs"]


def test_token_id_prompts_score_like_text(client, reference):
    ids = reference[1](PROMPT)["input_ids"]
    body = {"echo": True, "max_tokens": 0, "logprobs": 1}
    as_text = client.post("/v1/completions", json={**body, "prompt": PROMPT}).json()["choices"][0]
    as_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()["choices"][0]
    as_batch = client.post("/v1/completions", json={**body, "prompt": [ids, ids[:3]]}).json()["choices"]
    assert as_ids == as_text
    assert as_batch[0]["logprobs"] == as_text["logprobs"]
    assert len(as_batch[1]["logprobs"]["tokens"]) == 3


def test_streamed_logprobs_add_up_to_the_whole(client):
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 6, "logprobs": 2, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = [c["choices"][0] for c in sse_payloads(client, "/v1/completions", {**body, "stream": True})]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    merged = {key: [v for c in chunks for v in c["logprobs"][key]] for key in whole["logprobs"]}
    assert merged == whole["logprobs"]
    assert chunks[-1]["finish_reason"] == "length"


def test_streamed_echo_of_max_tokens_0_ends_after_the_prompt(client):
    for logprobs in (None, 1):
        body = {"prompt": PROMPT, "echo": True, "max_tokens": 0, "stream": True, "logprobs": logprobs}
        chunks = [c["choices"][0] for c in sse_payloads(client, "/v1/completions", body)]
        assert "".join(c["text"] for c in chunks) == PROMPT
        assert chunks[-1]["finish_reason"] == "length"
        assert (chunks[0]["logprobs"] is None) == (logprobs is None)


def test_without_logprobs_nothing_is_computed_for_them(make_client, monkeypatch):
    """Only echo with logprobs asks the runner for every prompt position's logits."""
    recorders = record_steps(monkeypatch)
    with make_client() as client:
        recorder = recorders[-1]
        recorder.prefill_all_positions.clear()  # the warm-up
        plain = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).json()["choices"][0]
        client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logprobs": 2})
        client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "echo": True})
        client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
        client.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True}})
        client.post("/generate", json={"inputs": PROMPT, "parameters": {"decoder_input_details": True}})
    assert plain["logprobs"] is None
    assert recorder.prefill_all_positions == [False, False, False, True, False, True]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"logprobs": 21}, ["logprobs", "less than or equal to 20"]),
        ({"logprobs": -1}, ["logprobs", "greater than or equal to 0"]),
        ({"max_tokens": 0}, ["max_tokens 0", "echo"]),
        ({"prompt": [10**9]}, ["token id 1000000000", "vocabulary"]),
    ],
)
def test_completion_bad_logprob_requests_are_422(client, body, words):
    assert_validation_error(client.post("/v1/completions", json={"prompt": PROMPT, **body}), *words)


# --- /v1/chat/completions ---------------------------------------------------------
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_chat_logprobs_have_openais_shape(client):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    response = client.post("/v1/chat/completions", json=body).json()
    choice = response["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == response["usage"]["completion_tokens"]
    for entry in content:
        assert entry.keys() == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy, no penalty
    streamed = sse_payloads(client, "/v1/chat/completions", {**body, "stream": True})
    streamed_content = [
        e for c in streamed if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed_content == content


def test_chat_without_logprobs_has_none(client):
    body = {"messages": MESSAGES, "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"echo": True}, ["echo is not supported", "/v1/completions"]),
        ({"logprobs": True, "top_logprobs": 21}, ["top_logprobs", "20"]),
        ({"top_logprobs": 2}, ["top_logprobs needs logprobs"]),
    ],
)
def test_chat_bad_logprob_requests_are_422(client, body, words):
    assert_validation_error(client.post("/v1/chat/completions", json={"messages": MESSAGES, **body}), *words)


# --- TGI ------------------------------------------------------------------------
def test_generate_details_carry_tokens_top_tokens_and_prefill(client, reference):
    ids = reference[1](PROMPT)["input_ids"]
    parameters = {"max_new_tokens": 5, "details": True, "top_n_tokens": 2, "decoder_input_details": True}
    body = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()
    details = body["details"]
    assert [t["id"] for t in details["prefill"]] == ids
    assert details["prefill"][0] == {"id": ids[0], "text": reference[1].decode([ids[0]]), "logprob": None}
    expected = reference_logprobs(reference, ids)
    for position, token in enumerate(details["prefill"][1:], start=1):
        assert token["logprob"] == pytest.approx(float(expected[position - 1][ids[position]]), abs=TOLERANCE)
    assert len(details["tokens"]) == len(details["top_tokens"]) == details["generated_tokens"]
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert token.keys() == {"id", "text", "logprob", "special"}
        assert [t.keys() for t in top] == [token.keys()] * 2
        assert token["logprob"] == top[0]["logprob"] and token["id"] == top[0]["id"]  # greedy
        assert top[0]["logprob"] >= top[1]["logprob"]
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]


def test_decoder_input_details_alone_gives_details(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    details = client.post("/generate", json=body).json()["details"]
    assert len(details["prefill"]) > 1 and "top_tokens" not in details


def test_generate_stream_carries_top_tokens(client):
    parameters = {"max_new_tokens": 4, "top_n_tokens": 3, "details": True}
    events = sse_payloads(client, "/generate_stream", {"inputs": PROMPT, "parameters": parameters})
    whole = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()["details"]
    assert [e["token"] for e in events] == whole["tokens"]
    assert [e["top_tokens"] for e in events] == whole["top_tokens"]
    assert all(len(e["top_tokens"]) == 3 for e in events)


@pytest.mark.parametrize(
    ("path", "parameters", "words"),
    [
        ("/generate", {"top_n_tokens": 21}, ["top_n_tokens", "20"]),
        ("/generate_stream", {"top_n_tokens": 21}, ["top_n_tokens", "20"]),
        ("/generate_stream", {"decoder_input_details": True}, ["decoder_input_details", "streaming"]),
    ],
)
def test_tgi_bad_logprob_requests_are_422(client, path, parameters, words):
    assert_validation_error(client.post(path, json={"inputs": PROMPT, "parameters": parameters}), *words)


def test_max_new_tokens_0_finishes_without_a_token(client):
    """The engine's end of `max_tokens: 0`: one finish, no generated token, the prompt counted."""
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 0}
    response = client.post("/v1/completions", json=body).json()
    assert response["choices"][0]["text"] == PROMPT and response["choices"][0]["logprobs"] is None
    assert response["usage"]["completion_tokens"] == 0 and response["usage"]["prompt_tokens"] > 0
    assert response["choices"][0]["finish_reason"] == "length"
