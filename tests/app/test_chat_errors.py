"""/v1/chat/completions when the chat template cannot format the conversation: 422, never a 500."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.model_loader import LoadedModel, load_model
from app.settings import Settings

USER_ONLY = [{"role": "user", "content": "hi"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *USER_ONLY]
# as many real templates do (Gemma, Mistral): no system turn
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def loader_with_template(template: str | None) -> Callable[[Settings], LoadedModel]:
    def load(settings: Settings) -> LoadedModel:
        loaded = load_model(settings)
        loaded.tokenizer.chat_template = template
        return loaded

    return load


def assert_validation_error(response, *words: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body.keys() == {"error", "error_type"}
    assert body["error_type"] == "validation"
    for word in words:
        assert word in body["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_model_without_chat_template_is_422(make_client, stream):
    with make_client(loader=loader_with_template(None)) as client:
        body = {"messages": USER_ONLY, "max_tokens": 2, "stream": stream}
        assert_validation_error(client.post("/v1/chat/completions", json=body), "no chat template")
        assert client.app.state.service.engine.stats() == (0, 0)  # nothing was queued
        # raw completions still work on the same model
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_template_that_rejects_the_messages_is_422(make_client, stream):
    with make_client(loader=loader_with_template(NO_SYSTEM_TEMPLATE)) as client:
        body = {"messages": WITH_SYSTEM, "max_tokens": 2, "stream": stream}
        response = client.post("/v1/chat/completions", json=body)
        assert_validation_error(response, "chat template rejects", "System role not supported")
        # "developer" is sent to the template as "system": rejected the same way
        developer = [{"role": "developer", "content": "Be brief."}, *USER_ONLY]
        response = client.post("/v1/chat/completions", json={**body, "messages": developer})
        assert_validation_error(response, "System role not supported")
        assert client.app.state.service.engine.stats() == (0, 0)
        # the same template formats a conversation it accepts
        accepted = client.post("/v1/chat/completions", json={**body, "messages": USER_ONLY, "stream": False})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["choices"][0]["finish_reason"] in {"stop", "length"}
