"""Settings parsing and the one-line error messages."""

from __future__ import annotations

import pytest

from app.settings import SettingsError, load_settings
from quant import list_modes


def test_defaults():
    settings = load_settings()
    assert settings.precision == "fp32"
    assert settings.port == 8000
    assert settings.api_key is None


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("QS_PRECISION", "int8")
    monkeypatch.setenv("QS_SKIP_MODULES", "lm_head, model.layers.0.* ,")
    monkeypatch.setenv("QS_API_KEY", "k")
    settings = load_settings()
    assert settings.precision == "int8"
    assert settings.skip_modules == ("lm_head", "model.layers.0.*")
    assert settings.api_key.get_secret_value() == "k"


def test_unknown_precision_names_variable_and_modes():
    with pytest.raises(SettingsError) as error:
        load_settings(precision="int3")
    message = str(error.value)
    assert "\n" not in message
    assert "QS_PRECISION" in message
    for mode in list_modes():
        assert mode in message


def test_inconsistent_limits_are_rejected():
    with pytest.raises(SettingsError, match="QS_MAX_INPUT_TOKENS"):
        load_settings(max_input_tokens=100, max_total_tokens=50)


def test_group_size_is_restricted():
    with pytest.raises(SettingsError, match="QS_GROUP_SIZE"):
        load_settings(group_size=48)
