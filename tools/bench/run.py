"""Run the comparison: one worker process per mode, then the mode's real server under load; then, with
`--llama-cpp DIR`, llama.cpp's counterpart files through llama-bench and llama-server, in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import quant
from quant import REFERENCE_MODE
from tools.bench.compare import peer_types
from tools.bench.llamacpp import (
    LlamaCpp,
    PeerError,
    bench_details,
    gguf_file_type,
    gguf_for,
    loaded_backend,
    peer_row_values,
)
from tools.bench.results import PEER_ENGINE, BenchRow
from tools.bench.serving import ServerError, ServerSpec, measure_serving, running_llama_server, running_server
from tools.bench.worker import PROTOCOL_PREFIX, WorkerSpec


@dataclass(frozen=True)
class BenchOptions:
    model: str
    modes: tuple[str, ...]
    text: str | None
    max_tokens: int
    out: Path
    device: str
    cache_dir: str
    prompt_tokens: int = 512
    decode_tokens: int = 128
    prefill_repeats: int = 2
    concurrency: int = 8
    stream_tokens: int = 64
    requests_per_client: int = 1
    context: int = 1024  # quality windows, as `tools.quality`'s defaults
    stride: int = 768
    serve: bool = True
    mode_timeout: float = 1800.0
    # the llama.cpp peer: a folder of its tools (None: no peer rows), its threads, repetitions, server context
    llama_cpp: Path | None = None
    llama_cpp_threads: int | None = None  # None: torch's thread count, as our modes run with
    llama_cpp_repeats: int = 3
    llama_cpp_context: int | None = None  # llama-server -c, shared by its slots; None: 1024 per slot or more

    @property
    def server_context(self) -> int:
        if self.llama_cpp_context is not None:
            return self.llama_cpp_context
        return self.concurrency * max(1024, self.stream_tokens + 256)


@dataclass
class BenchRun:
    """Everything results.json holds, besides the machine and the command."""

    options: BenchOptions
    rows: list[BenchRow] = field(default_factory=list)
    reference: BenchRow | None = None  # the REFERENCE_MODE job, also when it is not a requested row
    skipped: dict[str, str] = field(default_factory=dict)  # modes and peer engines that could not run, with why
    seconds: float | None = None  # wall time of the whole comparison


def available_modes(device: str) -> tuple[list[str], dict[str, str]]:
    """(modes whose `check_available()` passes on `device`, {mode: why not} for the others)."""
    ready, unavailable = [], {}
    for name in quant.list_modes():
        try:
            quant.make_config(name, quant.QuantOptions(device=device)).check_available()
        except quant.ModeUnavailableError as error:
            unavailable[name] = str(error)
            continue
        ready.append(name)
    return ready, unavailable


def _worker_spec(
    options: BenchOptions,
    mode: str,
    reference_path: Path | None,
    *,
    is_reference: bool,
    speed: bool,
) -> WorkerSpec:
    return WorkerSpec(
        mode=mode,
        model=options.model,
        cache_dir=options.cache_dir,
        device=options.device,
        text=options.text,
        prompt_tokens=options.prompt_tokens,
        decode_tokens=options.decode_tokens,
        prefill_repeats=options.prefill_repeats,
        max_tokens=options.max_tokens,
        context=options.context,
        stride=options.stride,
        reference_path=None if reference_path is None else str(reference_path),
        is_reference=is_reference,
        measure_speed=speed,
    )


def run_worker(spec: WorkerSpec, log_path: Path, timeout: float, on_event: Callable[[dict], None]) -> BenchRow:
    """Run one job in a fresh interpreter; a crash or a timeout becomes a failed row, never an exception."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.worker", spec.to_json()],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            # the same cache as the server's: converted checkpoints and built kernels are reused
            env={**os.environ, "QS_CACHE_DIR": spec.cache_dir},
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        result: BenchRow | None = None
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if not line.startswith(PROTOCOL_PREFIX):
                    log.write(line)
                    continue
                message: dict[str, Any] = json.loads(line.removeprefix(PROTOCOL_PREFIX))
                if message["event"] == "result":
                    result = BenchRow.from_dict(message["data"])
                else:
                    on_event(message)
            process.wait()
        finally:
            timer.cancel()
    if result is not None:
        return result
    result = spec.empty_row()
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    if timed_out.is_set():
        result.fail("worker", f"killed after {timeout:.0f} s (see {log_path.name})")
    else:
        result.fail("worker", f"exited with code {process.returncode}: {last}")
    return result


def serve_and_load(options: BenchOptions, result: BenchRow, log_path: Path) -> None:
    spec = ServerSpec(
        mode=result.mode,
        model=options.model,
        cache_dir=options.cache_dir,
        device=options.device,
        max_concurrent_requests=max(16, options.concurrency),
    )
    try:
        with running_server(spec, log_path) as base_url:
            result.update(
                measure_serving(base_url, options.concurrency, options.stream_tokens, options.requests_per_client)
            )
    except ServerError as error:
        result.fail("serve", str(error))
    except Exception as error:  # the load generator's failures: report, and go on with the next mode
        result.fail("serve", f"{type(error).__name__}: {error}".splitlines()[0])


def finish_figures(run: BenchRun) -> None:
    """Ratios against the reference, from bytes and perplexities measured in this run."""
    reference = run.reference
    for row in run.rows:
        if reference is None or row.is_peer:
            continue
        if row.weight_bytes and reference.weight_bytes:
            row.fp32_weight_bytes = reference.weight_bytes
            row.weight_ratio = row.weight_bytes / reference.weight_bytes
        if row.perplexity is not None and reference.perplexity:
            row.perplexity_increase = row.perplexity / reference.perplexity - 1


class ModeProgress:
    """One tqdm bar per mode: one step per phase, the current phase in the postfix."""

    def __init__(self, label: str, phases: list[str]) -> None:
        self._phases = phases
        self._bar = tqdm(total=len(phases), desc=f"{label:>14}", unit="phase", leave=True, dynamic_ncols=True)
        self._done = 0

    def __call__(self, message: dict[str, Any]) -> None:
        """A worker event: a new phase, or progress inside one."""
        if message["event"] == "phase":
            self.phase(message["name"])
        elif message["event"] == "progress":
            self._bar.set_postfix_str(f"quality {message['done']}/{message['total']} tokens")

    def phase(self, name: str) -> None:
        if name in self._phases:
            self._advance_to(self._phases.index(name))
        self._bar.set_postfix_str(name)

    def _advance_to(self, index: int) -> None:
        if index > self._done:
            self._bar.update(index - self._done)
            self._done = index

    def close(self, result: BenchRow) -> None:
        self._advance_to(len(self._phases))
        self._bar.set_postfix_str("ok" if result.status == "ok" else f"FAILED ({result.error})")
        self._bar.close()


def _phases(options: BenchOptions, *, speed: bool, serve: bool) -> list[str]:
    phases = ["load"]
    if speed:
        phases += ["prefill", "decode"]
    if options.max_tokens > 0:
        phases.append("quality")
    if serve:
        phases.append("serve")
    return phases


def run_bench(options: BenchOptions, on_row: Callable[[BenchRun], None] = lambda run: None) -> BenchRun:
    """Run every job in turn; `on_row` sees the run after each row (to write partial reports)."""
    run = BenchRun(options)
    started = time.perf_counter()
    logs = options.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantserve-bench-") as scratch:
        reference_path = Path(scratch) / "reference.pt"
        modes = list(options.modes)
        if REFERENCE_MODE in modes:  # the reference runs first: every other mode compares with it
            modes.remove(REFERENCE_MODE)
            modes.insert(0, REFERENCE_MODE)
        else:
            progress = ModeProgress(f"{REFERENCE_MODE} (ref)", _phases(options, speed=False, serve=False))
            spec = _worker_spec(options, REFERENCE_MODE, reference_path, is_reference=True, speed=False)
            run.reference = run_worker(spec, logs / "reference.log", options.mode_timeout, progress)
            progress.close(run.reference)
        for mode in modes:
            is_reference = mode == REFERENCE_MODE
            progress = ModeProgress(mode, _phases(options, speed=True, serve=options.serve))
            spec = _worker_spec(options, mode, reference_path, is_reference=is_reference, speed=True)
            result = run_worker(spec, logs / f"{mode}.log", options.mode_timeout, progress)
            if options.serve and result.weight_bytes is not None:  # loading works: serve it
                progress.phase("serve")
                serve_started = time.perf_counter()
                serve_and_load(options, result, logs / f"{mode}.server.log")
                result.phase_seconds["serve"] = time.perf_counter() - serve_started
            progress.close(result)
            run.rows.append(result)
            if is_reference:
                run.reference = result
            finish_figures(run)
            run.seconds = time.perf_counter() - started
            on_row(run)
    if options.llama_cpp is not None:

        def peer_done(run: BenchRun) -> None:
            run.seconds = time.perf_counter() - started
            on_row(run)

        run_peers(run, logs, peer_done)
    finish_figures(run)
    run.seconds = time.perf_counter() - started
    return run


PEER_PHASES = ["quantize", "llama-bench", "serve"]


def run_peers(run: BenchRun, logs: Path, on_row: Callable[[BenchRun], None] = lambda run: None) -> None:
    """One peer row per llama.cpp counterpart of the run's modes, and one for the GGUF as shipped."""
    assert run.options.llama_cpp is not None
    # the figures the peer runs with, recorded as such in results.json
    run.options = options = replace(
        run.options,
        llama_cpp_threads=run.options.llama_cpp_threads or torch.get_num_threads(),
        llama_cpp_context=run.options.server_context,
    )
    source = gguf_for(options.model)
    if source is None:
        run.skipped[PEER_ENGINE] = f"llama.cpp needs a GGUF; {options.model!r} is not one"
        return
    try:
        peer = LlamaCpp.find(options.llama_cpp)
        shipped = gguf_file_type(source)
    except (PeerError, OSError, ValueError) as error:
        run.skipped[PEER_ENGINE] = str(error)
        return
    for gguf_type in peer_types(options.modes, shipped):
        row = BenchRow(None, engine=PEER_ENGINE, gguf_type=gguf_type)
        progress = ModeProgress(row.label, PEER_PHASES if options.serve else PEER_PHASES[:-1])
        measure_peer(options, peer, source, shipped, row, logs, progress)
        progress.close(row)
        run.rows.append(row)
        on_row(run)


def measure_peer(
    options: BenchOptions,
    peer: LlamaCpp,
    source: Path,
    shipped: str,
    row: BenchRow,
    logs: Path,
    progress: ModeProgress,
) -> None:
    """Fill one peer row: make (or reuse) its file, llama-bench it, then serve it with llama-server -np N."""
    gguf_type = row.gguf_type
    assert gguf_type is not None
    name = f"{PEER_ENGINE}-{gguf_type}"
    progress.phase("quantize")
    started = time.perf_counter()
    if gguf_type == shipped:
        path, made = source, False
    else:
        try:
            path, made = peer.prepare(source, gguf_type, Path(options.cache_dir), logs / f"{name}.quantize.log")
        except PeerError as error:
            row.fail("quantize", str(error))
            return
    row.phase_seconds["quantize"] = time.perf_counter() - started
    row.peer = {
        "folder": str(peer.folder),
        "file": str(path),
        "made": "shipped" if gguf_type == shipped else ("requantized" if made else "requantized (cached)"),
        "threads": options.llama_cpp_threads,
    }

    progress.phase("llama-bench")
    started = time.perf_counter()
    try:
        result, backend = peer.bench(
            path,
            threads=options.llama_cpp_threads,
            prompt_tokens=options.prompt_tokens,
            decode_tokens=options.decode_tokens,
            repeats=options.llama_cpp_repeats,
            log_path=logs / f"{name}.bench.log",
            timeout=options.mode_timeout,
        )
    except PeerError as error:
        row.fail("llama-bench", str(error))
    else:
        row.update(peer_row_values(result, backend))
        row.peer.update(bench_details(result))
    row.phase_seconds["llama-bench"] = time.perf_counter() - started

    if not options.serve:
        return
    progress.phase("serve")
    started = time.perf_counter()
    row.peer["server"] = {"slots": options.concurrency, "context": options.server_context}
    try:
        with running_llama_server(
            peer,
            path,
            slots=options.concurrency,
            threads=options.llama_cpp_threads,
            context=options.server_context,
            log_path=logs / f"{name}.server.log",
        ) as base_url:
            row.update(
                measure_serving(base_url, options.concurrency, options.stream_tokens, options.requests_per_client)
            )
    except ServerError as error:
        row.fail("serve", str(error))
    except Exception as error:  # the load generator's failures: report, and go on
        row.fail("serve", f"{type(error).__name__}: {error}".splitlines()[0])
    if row.backend is None:
        row.backend = loaded_backend((logs / f"{name}.server.log").read_text(errors="replace"))
    row.phase_seconds["serve"] = time.perf_counter() - started
