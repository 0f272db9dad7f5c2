"""`python -m tools.bench` / `quantserve-bench`: compare precision modes on this machine, as a report with charts."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

import quant
from quant.checkpoints import DEFAULT_MODEL, default_cache_dir
from quant.prequantized import NATIVE
from tools.bench.compare import counterpart_pairs
from tools.bench.llamacpp import LlamaCpp, PeerError, gguf_for
from tools.bench.machine import describe_machine, load_average
from tools.bench.report import render_comparison, render_table, write_report
from tools.bench.run import BenchOptions, BenchRun, available_modes, run_bench

DEFAULT_MAX_TOKENS = 4096


def _split_modes(values: list[str] | None) -> list[str]:
    """`--modes fp32 int8` and `--modes fp32,int8` both work."""
    return [name for value in values or [] for name in value.split(",") if name]


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantserve-bench",
        description="Measure every precision mode on this machine (load, memory, prefill, decode, serving under "
        "concurrent load, quality against fp32) and write report.md, results.json and PNG charts.",
    )
    parser.add_argument("--model", default=os.environ.get("QS_MODEL", DEFAULT_MODEL), help="as QS_MODEL")
    parser.add_argument(
        "--modes",
        nargs="+",
        metavar="MODE",
        help="modes to compare (default: every registered mode that can run on the device)",
    )
    parser.add_argument("--text", help="quality text file (default: the quality tool's default text)")
    parser.add_argument(
        "--max-tokens",
        type=_count(0),
        default=DEFAULT_MAX_TOKENS,
        help="quality token budget per mode; 0 skips quality (default: %(default)s, so that every mode fits in "
        "about 30 minutes on a 2-core CPU; `quantserve-eval` defaults to 16384)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-report"), help="output directory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="default: QS_CACHE_DIR")
    parser.add_argument("--prompt-tokens", type=_count(1), default=512, help="prefill prompt length")
    parser.add_argument("--decode-tokens", type=_count(1), default=128, help="greedy decode steps at batch 1")
    parser.add_argument("--prefill-repeats", type=_count(1), default=2, help="prefill runs, best one kept")
    parser.add_argument("--concurrency", type=_count(1), default=8, help="concurrent streams against the server")
    parser.add_argument("--stream-tokens", type=_count(1), default=64, help="tokens each stream asks for")
    parser.add_argument("--requests-per-client", type=_count(1), default=1, help="streamed requests per client")
    parser.add_argument("--no-serve", action="store_true", help="skip the server phase")
    peer = parser.add_argument_group(
        "llama.cpp peer",
        "With --llama-cpp DIR, the same run measures llama.cpp's counterpart of each mode (fp32: F32, int8: Q8_0, "
        "int4: Q4_0 and the GGUF as shipped): files made from the model's GGUF with llama-quantize "
        "--allow-requantize (cached under the cache directory), decode and prefill from llama-bench, "
        "the 1-stream and N-stream rows from llama-server -np N driven by the same load generator.",
    )
    peer.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="folder with llama.cpp's llama-bench, llama-server and llama-quantize, or with a `run` wrapper "
        "(`DIR/run llama-bench ...`), e.g. ../shared/peers/llama.cpp",
    )
    peer.add_argument(
        "--llama-cpp-threads", type=_count(1), help="llama.cpp's -t (default: torch's threads, as our modes run)"
    )
    peer.add_argument("--llama-cpp-repeats", type=_count(1), default=3, help="llama-bench -r (default: %(default)s)")
    peer.add_argument(
        "--llama-cpp-context",
        type=_count(1),
        help="llama-server -c, shared by its slots (default: --concurrency x max(1024, --stream-tokens + 256))",
    )
    parser.add_argument("--mode-timeout", type=float, default=1800.0, help="seconds before a mode's worker is killed")
    return parser


def exact_command() -> str:
    """The command line as typed: `python -m tools.bench ...` or the console script."""
    argv = sys.orig_argv
    if len(argv) > 2 and argv[1] == "-m":
        return shlex.join(["python", *argv[1:]])
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from app.model_loader import resolve_device

    try:
        device = resolve_device(args.device).type
    except RuntimeError as error:
        parser.error(str(error))
    requested = _split_modes(args.modes)
    accepted = [*quant.list_modes(), NATIVE]  # native: a pre-quantized --model (a GGUF's own types) as stored
    unknown = [name for name in requested if name not in accepted]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    ready, unavailable = available_modes(device)
    modes = requested or ready
    if args.llama_cpp is not None:
        try:
            LlamaCpp.find(args.llama_cpp)
        except PeerError as error:
            parser.error(f"--llama-cpp: {error}")
        if gguf_for(args.model) is None:
            parser.error(f"--llama-cpp needs a GGUF model; {args.model!r} is not one")

    options = BenchOptions(
        model=args.model,
        modes=tuple(modes),
        text=args.text,
        max_tokens=args.max_tokens,
        out=args.out,
        device=device,
        cache_dir=args.cache_dir,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        prefill_repeats=args.prefill_repeats,
        concurrency=args.concurrency,
        stream_tokens=args.stream_tokens,
        requests_per_client=args.requests_per_client,
        serve=not args.no_serve,
        mode_timeout=args.mode_timeout,
        llama_cpp=args.llama_cpp,
        llama_cpp_threads=args.llama_cpp_threads or torch.get_num_threads(),
        llama_cpp_repeats=args.llama_cpp_repeats,
        llama_cpp_context=args.llama_cpp_context,
    )
    machine = describe_machine()
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = exact_command()
    print(f"comparing {', '.join(modes)} on {device}; output in {args.out}", file=sys.stderr)
    skipped = {} if requested else unavailable

    def write(run: BenchRun) -> Path:
        run.skipped.update(skipped)
        machine["load_average_end"] = load_average()
        return write_report(run, machine, command, created)

    run = run_bench(options, on_row=write)  # a report after every mode: an interrupted run keeps its rows
    path = write(run)
    print(render_table(run.rows, options.concurrency))
    if counterpart_pairs(run.rows):
        print(render_comparison(run.rows, options.concurrency))
    print(f"report: {path}")
    return 0 if all(row.status == "ok" for row in run.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
