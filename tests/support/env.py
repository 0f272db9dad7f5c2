"""The suite's view of the environment: no `QS_*` setting of the developer's shell leaks in.

`QS_CACHE_DIR` alone is kept: it says where converted checkpoints and built kernels are
kept (CI points it inside the clone), not how to serve.
"""

from __future__ import annotations

import os

KEPT_SETTINGS = ("QS_CACHE_DIR",)


def leaked_settings() -> list[str]:
    return [name for name in os.environ if name.startswith("QS_") and name not in KEPT_SETTINGS]


def drop_leaked_settings() -> None:
    for name in leaked_settings():
        del os.environ[name]


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment for a child `quantserve`: this process's, less every `QS_*` setting but the kept ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QS_") or k in KEPT_SETTINGS}
    return {**env, **overrides}
