"""The OpenAI-compatible routes, driven by the official `openai` client against a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI

from app.settings import load_settings
from tests.support.live_server import serve_app, wait_idle

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FastAPI]]:
    settings = load_settings(
        model=str(tiny_model_dir),
        device="cpu",
        cache_dir=tmp_path_factory.mktemp("cache"),
        max_input_tokens=64,
        max_total_tokens=128,
        api_key="sk-test",
    )
    with serve_app(settings) as served:
        yield served


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="sk-test", max_retries=0, timeout=60)


def tgi_greedy(server, inputs: str, max_new_tokens: int) -> str:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}}
    response = httpx.post(f"{server[0]}/generate", json=body, headers={"Authorization": "Bearer sk-test"})
    return response.json()["generated_text"]


def served_id(tiny_model_dir: Path) -> str:
    """The id a client sees: the last part of the QS_MODEL path it configured, e.g. "tiny-llama0"."""
    assert tiny_model_dir.name.startswith("tiny-llama")  # the fixture's mktemp name
    return tiny_model_dir.name


def test_models_lists_the_served_model(client, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [f"{served_id(tiny_model_dir)}:fp32"]  # `<model-id>:<mode>`, one mode


def test_completion_is_the_same_engine_as_generate(client, server, tiny_model_dir):
    completion = client.completions.create(model="any", prompt=PROMPT, max_tokens=8, temperature=0)
    choice = completion.choices[0]
    assert choice.text == tgi_greedy(server, PROMPT, 8)
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.model == served_id(tiny_model_dir)


def test_streamed_completion_adds_up_to_the_whole(client):
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model="m", prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_several_prompts_give_one_choice_each(client, server):
    prompts = [PROMPT, "Python is a"]
    completion = client.completions.create(model="m", prompt=prompts, max_tokens=5, temperature=0, echo=True)
    assert [c.index for c in completion.choices] == [0, 1]
    for prompt, choice in zip(prompts, completion.choices, strict=True):
        assert choice.text == prompt + tgi_greedy(server, prompt, 5)


def test_chat_uses_the_chat_template(client, server):
    tokenizer = server[1].state.service.loaded.tokenizer
    template = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0)
    message = chat.choices[0].message
    assert message.role == "assistant"
    assert chat.usage.prompt_tokens == len(tokenizer(template, add_special_tokens=False)["input_ids"])
    assert message.content == tgi_greedy(server, template, 6)


def test_streamed_chat_matches_and_ends_with_done(client, server):
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # the raw stream ends with OpenAI's sentinel
    with httpx.stream(
        "POST",
        f"{server[0]}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 2, "stream": True},
        headers={"Authorization": "Bearer sk-test"},
    ) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_seed_gives_the_same_sample(client):
    def sample(seed: int) -> str:
        chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, seed=seed)
        return chat.choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(3), sample(4), sample(5)}) > 1  # the default temperature 1 samples


def test_stop_sequence_is_never_streamed(client):
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = whole[4:7]
    cut = whole[: whole.index(stop)]
    stopped = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_errors_raise_the_clients_exceptions(client, server):
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="m", messages=MESSAGES, n=2)
    assert invalid.value.response.json()["error_type"] == "validation"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=500)  # over QS_MAX_TOTAL_TOKENS
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="m", prompt=PROMPT, presence_penalty=1.0)
    wrong_key = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert wait_idle(server[1]) == (0, 0)


def test_client_parses_echoed_prompt_logprobs(client, server):
    """lm-evaluation-harness's request: the prompt scored, nothing generated."""
    completion = client.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert choice.text == PROMPT and completion.usage.completion_tokens == 0
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(logprobs.tokens) == len(logprobs.text_offset) == completion.usage.prompt_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value < 0 for value in logprobs.token_logprobs[1:])
    assert all(isinstance(top, dict) and 1 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])
    # token-id prompts (what the harness sends) parse the same
    ids = server[1].state.service.loaded.tokenizer(PROMPT)["input_ids"]
    from_ids = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert from_ids.choices[0].text == PROMPT
    assert from_ids.choices[0].logprobs.token_logprobs == logprobs.token_logprobs


def test_client_parses_streamed_completion_logprobs(client):
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1)
    chunks = list(
        client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, stream=True)
    )
    streamed = [value for c in chunks for value in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    assert len(streamed) == whole.usage.completion_tokens


def test_client_parses_chat_logprobs(client):
    chat = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob  # greedy
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=21)
    assert "top_logprobs" in too_many.value.response.json()["error"]
