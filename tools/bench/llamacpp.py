"""The peer engine: llama.cpp's prebuilt tools (`llama-quantize`, `llama-bench`, `llama-server`) in a folder.

`quantserve-bench --llama-cpp DIR` measures them in the same run as our modes. DIR holds
either a `run` wrapper (`DIR/run llama-bench ARGS...`, as `../shared/peers/llama.cpp` has)
or the binaries themselves (`DIR/llama-bench`). They are a yardstick, never a dependency.

- `LlamaCpp.prepare`: the counterpart GGUFs (F32, Q8_0, Q4_0) made from the model's GGUF with
  `llama-quantize --allow-requantize`, cached under `<cache dir>/llama.cpp/` and reused;
- `LlamaCpp.bench` + `parse_llama_bench`: prefill and decode tok/s from `llama-bench -o json`,
  and the CPU back end it loaded (`loaded_backend`);
- `LlamaCpp.server_command`: `llama-server -np N`, driven by our own load generator
  (`tools.bench.serving.running_llama_server`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.checkpoints import DEFAULT_MODEL, embedded_gguf

TOOLS = ("llama-bench", "llama-server", "llama-quantize")
REQUANTIZED = ("F32", "Q8_0", "Q4_0")  # made from the shipped GGUF (speed comparisons only)
QUANTIZE_DIR = "llama.cpp"  # under the bench's cache directory
_BACKEND = re.compile(r"loaded CPU backend from (\S+)")


class PeerError(RuntimeError):
    """A llama.cpp tool could not run or gave no result; the message says why."""


def gguf_for(model: str) -> Path | None:
    """The GGUF llama.cpp can load for `model`, or None (an HF directory has none)."""
    if model == DEFAULT_MODEL:
        return embedded_gguf()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_file_type(path: Path) -> str:
    """The file's type as llama-quantize names it (`Q4_1`, `F32`...): `general.file_type`, else its dominant tensor type."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    entry = reader.fields.get("general.file_type")
    if entry is not None:
        try:
            name = LlamaFileType(int(entry.parts[entry.data[0]][0])).name
        except ValueError:
            name = None
        if name:
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
    return max(by_type, key=by_type.__getitem__)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def loaded_backend(log: str) -> str | None:
    """The CPU back end llama.cpp loaded (`libggml-cpu-zen4.so`), from its first log lines; None if not named."""
    match = _BACKEND.search(log)
    return Path(match.group(1)).name if match else None


@dataclass(frozen=True)
class BenchStat:
    """One llama-bench test (prefill or decode) as llama-bench reports it."""

    tokens: int
    avg_ts: float  # llama-bench's figure: mean tok/s over the repetitions
    stddev_ts: float
    samples_ts: list[float] = field(default_factory=list)

    @property
    def median_ts(self) -> float:
        return statistics.median(self.samples_ts) if self.samples_ts else self.avg_ts

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "avg_ts": self.avg_ts,
            "stddev_ts": self.stddev_ts,
            "median_ts": self.median_ts,
            "samples_ts": list(self.samples_ts),
        }


@dataclass(frozen=True)
class BenchResult:
    prefill: BenchStat | None
    decode: BenchStat | None
    model_type: str | None  # llama-bench's own description, e.g. "llama 256M Q4_1"
    model_bytes: int | None
    threads: int | None
    cpu_info: str | None


def parse_llama_bench(text: str) -> BenchResult:
    """`llama-bench -o json` output: one entry per test; `-p N` gives n_prompt=N, n_gen=0, `-n N` the reverse."""
    start = text.find("[")
    if start < 0:
        raise PeerError(f"llama-bench printed no JSON: {_last_line(text)}")
    try:
        entries = json.loads(text[start:])
    except json.JSONDecodeError as error:
        raise PeerError(f"llama-bench printed invalid JSON: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise PeerError("llama-bench printed no test results")
    prefill = decode = None
    for entry in entries:
        stat = BenchStat(
            tokens=int(entry["n_prompt"] or entry["n_gen"]),
            avg_ts=float(entry["avg_ts"]),
            stddev_ts=float(entry.get("stddev_ts") or 0.0),
            samples_ts=[float(x) for x in entry.get("samples_ts") or []],
        )
        if entry["n_prompt"] and not entry["n_gen"] and not entry.get("n_depth"):
            prefill = stat
        elif entry["n_gen"] and not entry["n_prompt"] and not entry.get("n_depth"):
            decode = stat
    first = entries[0]
    return BenchResult(
        prefill=prefill,
        decode=decode,
        model_type=first.get("model_type"),
        model_bytes=first.get("model_size"),
        threads=first.get("n_threads"),
        cpu_info=first.get("cpu_info"),
    )


@dataclass(frozen=True)
class LlamaCpp:
    """A folder of llama.cpp tools: a `run` wrapper, or the binaries themselves."""

    folder: Path

    @classmethod
    def find(cls, folder: str | Path) -> LlamaCpp:
        """The folder's tools, or PeerError naming what is missing."""
        peer = cls(Path(folder).expanduser().resolve())
        if not peer.folder.is_dir():
            raise PeerError(f"{folder} is not a directory")
        if not peer.wrapper:
            missing = [tool for tool in TOOLS if not os.access(peer.folder / tool, os.X_OK)]
            if missing:
                raise PeerError(
                    f"{folder} has no executable `run` wrapper and lacks the executable(s) {', '.join(missing)}"
                )
        return peer

    @property
    def wrapper(self) -> bool:
        return os.access(self.folder / "run", os.X_OK) and (self.folder / "run").is_file()

    def command(self, tool: str, *args: str | Path) -> list[str]:
        head = [str(self.folder / "run"), tool] if self.wrapper else [str(self.folder / tool)]
        return head + [str(arg) for arg in args]

    def _call(self, tool: str, args: list[str | Path], log_path: Path, timeout: float) -> str:
        """Run a tool to its end; stderr goes to `log_path`; return its stdout."""
        with log_path.open("w") as log:
            try:
                completed = subprocess.run(
                    self.command(tool, *args),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise PeerError(f"{tool} killed after {timeout:.0f} s (see {log_path.name})") from None
            except OSError as error:
                raise PeerError(f"{tool} did not start: {error}") from None
        if completed.returncode != 0:
            tail = _last_line(completed.stdout + "\n" + log_path.read_text(errors="replace"))
            raise PeerError(f"{tool} exited with code {completed.returncode}: {tail}")
        return completed.stdout

    # --- the counterpart files ---

    def prepare(
        self, source: Path, gguf_type: str, cache_dir: Path, log_path: Path, timeout: float = 900.0
    ) -> tuple[Path, bool]:
        """`source` requantized to `gguf_type` (cached): (path, whether it was made now)."""
        target = quantized_path(source, gguf_type, cache_dir)
        if target.is_file():
            return target, False
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")  # an interrupted run never leaves a file to reuse
        partial.unlink(missing_ok=True)
        try:
            self._call("llama-quantize", ["--allow-requantize", source, partial, gguf_type], log_path, timeout)
            if not partial.is_file():
                raise PeerError(f"llama-quantize wrote no {partial.name}")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target, True

    # --- llama-bench ---

    def bench(
        self,
        gguf: Path,
        *,
        threads: int,
        prompt_tokens: int,
        decode_tokens: int,
        repeats: int,
        log_path: Path,
        timeout: float,
    ) -> tuple[BenchResult, str | None]:
        """(llama-bench's prefill and decode figures, the CPU back end it loaded)."""
        args: list[str | Path] = ["-m", gguf, "-t", str(threads), "-p", str(prompt_tokens), "-n", str(decode_tokens)]
        args += ["-r", str(repeats), "-o", "json"]
        stdout = self._call("llama-bench", args, log_path, timeout)
        return parse_llama_bench(stdout), loaded_backend(log_path.read_text(errors="replace"))

    # --- llama-server ---

    def server_command(self, gguf: Path, *, slots: int, threads: int, context: int, port: int) -> list[str]:
        return self.command(
            "llama-server",
            *("-m", gguf, "-np", str(slots), "-t", str(threads), "-c", str(context)),
            *("--host", "127.0.0.1", "--port", str(port)),
        )


def quantized_path(source: Path, gguf_type: str, cache_dir: Path) -> Path:
    """Where `source` requantized to `gguf_type` is cached: keyed by the source's path, size and mtime."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(cache_dir) / QUANTIZE_DIR / f"{source.stem}-{key}" / f"{gguf_type}.gguf"


def peer_row_values(result: BenchResult, backend: str | None) -> dict[str, Any]:
    """BenchRow fields from a llama-bench result: llama-bench's mean tok/s, the other statistics in `peer`."""
    values: dict[str, Any] = {"backend": backend, "weight_bytes": result.model_bytes}
    if result.prefill is not None:
        values.update({"prefill_tokens": result.prefill.tokens, "prefill_tok_s": result.prefill.avg_ts})
    if result.decode is not None:
        values.update({"decode_tokens": result.decode.tokens, "decode_tok_s": result.decode.avg_ts})
    return values


def bench_details(result: BenchResult) -> dict[str, Any]:
    return {
        "llama_bench": {
            "prefill": None if result.prefill is None else result.prefill.to_dict(),
            "decode": None if result.decode is None else result.decode.to_dict(),
            "model_type": result.model_type,
            "threads": result.threads,
            "cpu_info": result.cpu_info,
        }
    }
