"""Read the deploy sources: the Dockerfile's instructions (so tests can run what the image runs)
and the generator scripts under deploy/ (plain scripts, not a package)."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line.strip()).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def arguments(keyword: str, path: Path = DOCKERFILE) -> list[str]:
    """The arguments of every `keyword` instruction, in order."""
    return [args for k, args in instructions(path) if k == keyword]


def assignments(keyword: str, path: Path = DOCKERFILE) -> dict[str, str]:
    """NAME=value pairs of every ARG or ENV instruction."""
    return dict(pair.split("=", 1) for args in arguments(keyword, path) for pair in args.split() if "=" in pair)


def command_argv(form: str) -> list[str]:
    """argv of a CMD/RUN in exec form (JSON array) or shell form (run by /bin/sh -c)."""
    return json.loads(form) if form.startswith("[") else ["/bin/sh", "-c", form]


def healthcheck_argv(path: Path = DOCKERFILE) -> list[str]:
    (healthcheck,) = arguments("HEALTHCHECK", path)
    options, _, command = healthcheck.partition("CMD ")
    assert all(option.startswith("--") for option in shlex.split(options)), options
    return command_argv(command)


def load_script(path: Path) -> ModuleType:
    """Import a script under deploy/ by its path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
