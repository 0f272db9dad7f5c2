"""Quality of precision modes: perplexity and top-1 agreement with fp32 over a text.

    python -m tools.quality --modes fp32,int8,int4 --text ../shared/data/wikitext-2/test.txt
    quantserve-eval --modes all            # the same, as the console script
    quantserve-eval --modes int8,int4 --replay traffic.jsonl   # your own traffic: see tools/replay.py

Perplexity uses a fixed context window slid by a stride (Hugging Face's
"perplexity of fixed-length models" recipe): each window scores only the tokens
the previous window did not, with the rest of the window as their context.
Every mode sees exactly the same windows, so `agreement` is the share of scored
positions whose most likely next token equals fp32's (`quant.REFERENCE_MODE`).
Cost: about max_tokens x context / stride token forwards per mode (fp32 is always
evaluated, as the reference).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from quant.api import quantize_
from quant.checkpoints import DEFAULT_CACHE_DIR, DEFAULT_MODEL, default_cache_dir, load_float_model
from quant.config import ModeUnavailableError, QuantOptions
from quant.registry import REFERENCE_MODE, list_modes, make_config


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_target: int  # first token scored (earlier ones are context only)


@dataclass
class QualityResult:
    """One mode's quality over the text, against the reference mode (a row of the quality table)."""

    mode: str
    weight_bytes: int
    quantized_ratio: float | None
    layers_quantized: int
    layers_skipped: int
    layers_fallback: int
    kernels: dict[str, int]
    mean_sqnr_db: float | None
    exact_layers: int
    perplexity: float
    agreement: float  # share of scored positions whose argmax matches the reference's
    tokens_scored: int
    tokens_forwarded: int
    quantize_seconds: float
    eval_seconds: float


def load_text(path: Path | None) -> str:
    """The file at `path`, or Python's bundled documentation topics (real English, always available)."""
    if path is not None:
        return path.read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def tokenize(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of `text` as a 1-D tensor (only a prefix of a long text is tokenized)."""
    chars = max_tokens * 8  # English BPE averages ~4 characters per token; double it to be safe
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens or chars >= len(text):
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows of `context` tokens every `stride`; each scores the tokens after the previous window's end."""
    if not 0 < stride <= context or context < 2:
        raise ValueError(f"need 0 < stride <= context and context >= 2, got stride {stride}, context {context}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens of text, got {n_tokens}")
    windows, begin, scored_until = [], 0, 1  # token 0 has no context: nothing predicts it
    while True:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, scored_until))
        if end == n_tokens:
            break
        # the next window starts at least one token before its first scored token, its context
        begin, scored_until = min(begin + stride, end - 1), end
    return windows


@dataclass
class Scores:
    nll_sum: float
    count: int
    top1: torch.Tensor  # argmax prediction for every scored position, in order


def score(
    model: nn.Module,
    ids: torch.Tensor,
    context: int,
    stride: int,
    on_window: Callable[[int, int], None] = lambda done, total: None,
) -> Scores:
    """Summed next-token negative log-likelihood and top-1 predictions over the sliding windows."""
    device = next(model.parameters()).device
    nll_sum, count, top1 = 0.0, 0, []
    windows = sliding_windows(len(ids), context, stride)
    with torch.inference_mode():
        for window in windows:
            inputs = ids[window.begin : window.end].to(device)[None]
            n_scored = window.end - window.first_target
            # Logits at positions first_target-1 .. end-2 predict the scored tokens; keep one
            # extra (the last position predicts past the window) to skip the rest of the head.
            logits = model(input_ids=inputs, logits_to_keep=n_scored + 1).logits[0, :-1].float()
            targets = inputs[0, -n_scored:]
            nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += n_scored
            top1.append(logits.argmax(dim=-1).cpu())
            on_window(count, len(ids) - 1)
    return Scores(nll_sum, count, torch.cat(top1))


class Progress:
    """One updating line on a terminal; a line per tenth of the work otherwise (logs, CI)."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream = label, stream
        self.started = time.perf_counter()
        self.next_tenth = 1
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else 0.0
        line = f"[{self.label}] {done}/{total} tokens scored, {rate:.0f} tok/s, eta {eta:.0f} s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        elif done * 10 >= self.next_tenth * total or done >= total:
            self.stream.write(line + "\n")
            self.next_tenth = done * 10 // total + 1
        self.stream.flush()


def evaluate(
    modes: list[str],
    *,
    model: str = DEFAULT_MODEL,
    text: Path | None = None,
    max_tokens: int = 16384,
    context: int = 1024,
    stride: int = 768,
    options: QuantOptions | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: TextIO | None = sys.stderr,
) -> Iterator[QualityResult]:
    """Evaluate the reference mode (fp32) first, then every other mode in `modes`, one model at a time."""
    options = options or QuantOptions()
    configs = [make_config(mode, options) for mode in dict.fromkeys([REFERENCE_MODE, *modes])]
    for config in configs:
        config.check_available()  # fail before any long run
    reference: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    for config in configs:
        float_model, tokenizer, _ = load_float_model(model, cache_dir, options.device)
        if ids is None:
            ids = tokenize(tokenizer, load_text(text), max_tokens)
        started = time.perf_counter()
        report = quantize_(float_model, config)
        quantized = time.perf_counter()
        on_window = Progress(config.name, progress) if progress else (lambda done, total: None)
        scores = score(float_model, ids, context, stride, on_window)
        finished = time.perf_counter()
        if reference is None:
            reference = scores.top1
        forwarded = sum(w.end - w.begin for w in sliding_windows(len(ids), context, stride))
        errors = report.error_summary()
        yield QualityResult(
            mode=config.name,
            weight_bytes=report.total_weight_bytes,
            quantized_ratio=report.quantized_ratio,
            layers_quantized=report.layers_quantized,
            layers_skipped=report.layers_skipped,
            layers_fallback=report.layers_fallback,
            kernels=dict(report.kernels),
            mean_sqnr_db=errors["mean_sqnr_db"],
            exact_layers=int(errors.get("exact_layers") or 0),
            perplexity=math.exp(scores.nll_sum / scores.count),
            agreement=(scores.top1 == reference).float().mean().item(),
            tokens_scored=scores.count,
            tokens_forwarded=forwarded,
            quantize_seconds=quantized - started,
            eval_seconds=finished - quantized,
        )
        del float_model
        gc.collect()


def format_table(results: list[QualityResult]) -> str:
    """A Markdown table; perplexity change is relative to the first (reference) row."""
    base = results[0].perplexity if results else float("nan")
    header = (
        f"| mode | weight MiB | quantized/{REFERENCE_MODE} | layers q/skip/fallback | mean SQNR dB | perplexity "
        f"| Δ vs {REFERENCE_MODE} "
        "| top-1 agreement | kernels | eval s |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        ratio = "-" if r.quantized_ratio is None else f"{r.quantized_ratio:.3f}"
        kernels = ", ".join(sorted(r.kernels)) or "-"
        sqnr = "-" if r.mean_sqnr_db is None else f"{r.mean_sqnr_db:.1f}"
        if r.exact_layers:
            sqnr = "exact" if r.mean_sqnr_db is None else f"{sqnr} (+{r.exact_layers} exact)"
        lines.append(
            f"| {r.mode} | {r.weight_bytes / 2**20:.1f} | {ratio} "
            f"| {r.layers_quantized}/{r.layers_skipped}/{r.layers_fallback} | {sqnr} "
            f"| {r.perplexity:.3f} | {100 * (r.perplexity / base - 1):+.2f}% | {100 * r.agreement:.2f}% | {kernels} | {r.eval_seconds:.0f} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modes", default="fp32,int8,int4", help=f"comma-separated, or 'all' ({', '.join(list_modes())})"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, hub id or .gguf (default: embedded)")
    parser.add_argument("--text", type=Path, help="UTF-8 text file (default: Python's pydoc_data topics)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token budget taken from the text")
    parser.add_argument("--context", type=int, default=1024, help="tokens per window")
    parser.add_argument("--stride", type=int, default=768, help="tokens between window starts (new tokens scored)")
    QuantOptions.add_arguments(parser)  # --group-size, --fp8-format, ...: the knobs, declared in quant.config
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: QS_CACHE_DIR")
    parser.add_argument("--json", type=Path, help="also write the results here")
    replay = parser.add_argument_group("replay a traffic sample (tools/replay.py) instead of scoring a text")
    replay.add_argument("--replay", type=Path, help="JSONL of requests: prompt / inputs / messages per line")
    replay.add_argument("--max-new-tokens", type=int, default=64, help="longest answer per request")
    replay.add_argument("--reference", default=REFERENCE_MODE, help="the mode answers are scored against")
    return parser.parse_args(argv)


def replay_main(args: argparse.Namespace, modes: list[str], options: QuantOptions) -> int:
    from tools.replay import format_table as replay_table
    from tools.replay import read_traffic, replay, to_json

    try:
        traffic = read_traffic(args.replay)
    except (OSError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    knobs = {name: getattr(options, name) for name in QuantOptions.knob_names()}
    results = replay(
        traffic,
        modes,
        reference=args.reference,
        max_new_tokens=args.max_new_tokens,
        model=args.model,
        cache_dir=args.cache_dir,
        device=args.device,
        max_total_tokens=1_000_000,
        max_input_tokens=999_999,
        **knobs,
    )
    print(f"{len(traffic)} requests from {args.replay}, greedy, at most {args.max_new_tokens} new tokens each")
    print(replay_table(results))
    if args.json:
        args.json.write_text(to_json(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    modes = list_modes() if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in list_modes()]
    if unknown:
        print(f"unknown mode(s) {', '.join(unknown)}; accepted: {', '.join(list_modes())}", file=sys.stderr)
        return 2
    try:
        options = QuantOptions.from_arguments(args, device=args.device)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if args.replay is not None:
        return replay_main(args, modes, options)
    results = []
    try:
        for result in evaluate(
            modes,
            model=args.model,
            text=args.text,
            max_tokens=args.max_tokens,
            context=args.context,
            stride=args.stride,
            options=options,
            cache_dir=args.cache_dir,
            progress=sys.stderr,
        ):
            results.append(result)
            print(
                f"{result.mode}: perplexity {result.perplexity:.3f}, agreement {100 * result.agreement:.2f}%",
                file=sys.stderr,
            )
    except ModeUnavailableError as error:
        print(error, file=sys.stderr)
        return 2
    print(
        f"{results[0].tokens_scored} tokens scored, context {args.context}, stride {args.stride}, "
        f"text {args.text or 'pydoc_data.topics'}"
    )
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
