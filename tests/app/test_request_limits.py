"""What one request may ask before any heavy work: body size (413), prompt length in characters (422
before tokenizing), stop string length (422); and tokenization runs on the service's pool, not the loop."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, normalizers
from transformers import PreTrainedTokenizerFast

from app.schemas import MAX_STOP_CHARS
from app.service import max_chars_per_token
from app.settings import load_settings
from tests.support.live_server import serve_app

LIMIT = 4000


def assert_error(response, status: int, error_type: str, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.json().keys() == {"error", "error_type"}
    assert response.json()["error_type"] == error_type
    for word in words:
        assert word in response.json()["error"]


def test_body_over_the_limit_is_413_with_or_without_content_length(make_client):
    with make_client(max_request_bytes=LIMIT) as client:
        over = json.dumps({"inputs": "x" * LIMIT}).encode()
        declared = client.post("/generate", content=over, headers={"content-type": "application/json"})
        assert_error(declared, 413, "payload_too_large", "QS_MAX_REQUEST_BYTES")
        # an iterator body goes out chunked: no Content-Length, counted as it arrives
        chunked = client.post(
            "/v1/completions", content=iter([over[:3000], over[3000:]]), headers={"content-type": "application/json"}
        )
        assert_error(chunked, 413, "payload_too_large")
        under = json.dumps({"inputs": "x y z", "parameters": {"max_new_tokens": 2}}).encode()
        accepted = client.post(
            "/generate", content=iter([under[:5], under[5:]]), headers={"content-type": "application/json"}
        )
        assert accepted.status_code == 200, accepted.text
        counted = [line for line in client.get("/metrics").text.splitlines() if line.startswith("qs_requests_total{")]
        assert any('status="413"' in line and 'error_type="payload_too_large"' in line for line in counted), counted


def test_chunked_body_over_the_limit_on_a_real_socket(tiny_model_dir: Path, tmp_path: Path):
    """Through uvicorn: the 413 comes while the client is still sending, after about the limit."""
    settings = load_settings(model=str(tiny_model_dir), device="cpu", cache_dir=tmp_path, max_request_bytes=LIMIT)
    with serve_app(settings) as (url, _app):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b'{"inputs": "' + b"x" * 1000
            for _ in range(LIMIT // 1000 + 1):  # just over the limit, and no final chunk: the body never ends
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                chunk = b"x" * 1000
            answer = b""
            while b"payload_too_large" not in answer and (data := sock.recv(65536)):
                answer += data
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b'"error_type":"payload_too_large"' in answer


def test_prompt_longer_in_characters_than_any_tokenization_is_422_before_tokenizing(make_client):
    with make_client() as client:
        service = client.app.state.service
        bound = service.max_chars_per_token
        vocabulary = service.loaded.tokenizer.get_vocab()
        assert bound == max(len(entry) for entry in vocabulary)
        calls: list[str] = []
        tokenizer = service.loaded.tokenizer
        service.loaded.tokenizer = CountingTokenizer(tokenizer, calls)
        too_long = "y" * (64 * bound + 1)  # QS_MAX_INPUT_TOKENS is 64 here
        refused = client.post("/generate", json={"inputs": too_long})
        assert_error(refused, 422, "validation", "characters", "QS_MAX_INPUT_TOKENS")
        assert calls == []  # never tokenized
        chat = {"messages": [{"role": "user", "content": too_long}]}
        assert_error(client.post("/v1/chat/completions", json=chat), 422, "validation", "characters")
        # within the character bound it is tokenized, and refused on its token count
        counted = client.post("/generate", json={"inputs": "y " * 100})
        assert_error(counted, 422, "validation", "QS_MAX_INPUT_TOKENS")
        assert "characters" not in counted.json()["error"] and calls


@pytest.mark.parametrize("text", ["y" * 5000, " " * 5000, "\n" * 3000, "é" * 2000, "the " * 1000])
def test_the_character_bound_never_refuses_a_prompt_the_tokenizer_keeps_short(make_client, text):
    """Safe: n characters are at least n / bound tokens, whatever the text (runs, spaces, multi-byte)."""
    with make_client() as client:
        service = client.app.state.service
        tokens = len(service.loaded.tokenizer(text)["input_ids"])
        assert tokens * service.max_chars_per_token >= len(text)
        longest = max(service.loaded.tokenizer.get_vocab(), key=len)
        spelled = service.loaded.tokenizer.convert_tokens_to_string([longest]) * 50
        assert len(service.loaded.tokenizer(spelled)["input_ids"]) * service.max_chars_per_token >= len(spelled)


def word_level(normalizer: Any) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "▁world": 2}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def test_no_character_bound_when_the_normalizer_may_shorten_the_text():
    assert max_chars_per_token(word_level(None)) == len("▁world")
    keeps_length = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert max_chars_per_token(word_level(keeps_length)) == len("▁world")
    for shortening in (normalizers.NFC(), normalizers.Strip(), normalizers.Sequence([normalizers.NFKC()])):
        assert max_chars_per_token(word_level(shortening)) is None


def test_stop_strings_longer_than_the_limit_are_422(client):
    longest, over = "s" * MAX_STOP_CHARS, "s" * (MAX_STOP_CHARS + 1)
    ok = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2, "stop": [longest]}})
    assert ok.status_code == 200, ok.text
    refused = client.post("/generate", json={"inputs": "Hello", "parameters": {"stop": [over]}})
    assert_error(refused, 422, "validation", str(MAX_STOP_CHARS))
    for stop in (over, [over]):
        body = {"prompt": "Hello", "max_tokens": 2, "stop": stop}
        assert_error(client.post("/v1/completions", json=body), 422, "validation")


class CountingTokenizer:
    """The served tokenizer, noting the thread of each call that tokenizes or applies the chat template."""

    def __init__(self, tokenizer: Any, calls: list[str]) -> None:
        self._tokenizer = tokenizer
        self.calls = calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(threading.current_thread().name)
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(threading.current_thread().name)
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def test_tokenizing_and_chat_templating_run_on_the_pool_not_the_event_loop(client):
    service = client.app.state.service
    calls: list[str] = []
    service.loaded.tokenizer = CountingTokenizer(service.loaded.tokenizer, calls)
    assert client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    body = {"prompt": ["a b", "c d"], "max_tokens": 2, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        response.read()
    assert len(calls) == 1 + 2 + 2  # TGI; chat: template and tokens; two prompts
    assert all(name.startswith("qs-tokenize") for name in calls), calls
