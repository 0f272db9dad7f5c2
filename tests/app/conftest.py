"""Fixtures for the HTTP contract: a running app on the tiny random Llama."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import load_settings


@pytest.fixture
def make_client(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Iterator[TestClient]]:
    """`with make_client(api_key="k") as client:` serves the tiny model with those settings."""

    @contextmanager
    def make(loader=None, wait: bool = True, **overrides) -> Iterator[TestClient]:
        values = {
            "model": str(tiny_model_dir),
            "precision": "fp32",
            "device": "cpu",
            "cache_dir": tmp_path,
            "max_input_tokens": 64,
            "max_total_tokens": 128,
        }
        values.update(overrides)
        app = create_app(load_settings(**values), loader, exit_on_load_failure=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            if wait:
                assert app.state.service.wait_until_loaded(timeout=120)
            yield client

    return make


@pytest.fixture
def client(make_client) -> Iterator[TestClient]:
    with make_client() as c:
        yield c
