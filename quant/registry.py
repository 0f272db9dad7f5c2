"""Registry of precision modes, keyed by the name users put in QS_PRECISION."""

from __future__ import annotations

import importlib
import pkgutil

from quant.config import QuantConfig, QuantOptions

_MODES: dict[str, type[QuantConfig]] = {}
REFERENCE_MODE = "fp32"  # the mode every other is compared with: quality, weight ratios


def register_mode(config_cls: type[QuantConfig]) -> type[QuantConfig]:
    """Class decorator: make `config_cls` selectable by its `name`."""
    config_cls.check_fields()
    name = config_cls.name
    if name in _MODES and _MODES[name] is not config_cls:
        raise ValueError(f"precision mode {name!r} registered twice")
    _MODES[name] = config_cls
    return config_cls


def _load_modes() -> None:
    # Each file in quant/modes registers itself on import.
    import quant.modes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def list_modes() -> list[str]:
    """Names of every registered mode, in a stable order."""
    _load_modes()
    return sorted(_MODES, key=_sort_key)


def _sort_key(name: str) -> tuple[float, str]:
    return (-_MODES[name].bits, name)


def get_mode(name: str) -> type[QuantConfig]:
    _load_modes()
    try:
        return _MODES[name]
    except KeyError:
        raise KeyError(f"unknown precision mode {name!r}; accepted: {', '.join(list_modes())}") from None


def make_config(name: str, options: QuantOptions | None = None) -> QuantConfig:
    """The typed config of mode `name`, built from the user's generic options."""
    return get_mode(name).from_options(options or QuantOptions())
