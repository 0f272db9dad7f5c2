"""Quality of precision modes: perplexity, top-1 agreement and KL divergence against fp32 over a text.

    python -m tools.quality --modes fp32,int8,int4 --text ../shared/data/wikitext-2/test.txt
    quantserve-eval --modes all            # the same, as the console script
    quantserve-eval --modes int4,int4@qat-int4-g64 --group-size 64   # MODE@DIR: that mode on another
                                           # checkpoint (a quantserve-qat output), against the same fp32
    quantserve-eval --modes int8,int4 --replay traffic.jsonl   # your own traffic: see tools/replay.py

Perplexity uses a fixed context window slid by a stride (Hugging Face's
"perplexity of fixed-length models" recipe): each window scores only the tokens
the previous window did not, with the rest of the window as their context.
Every mode sees exactly the same windows, so `agreement` is the share of scored
positions whose most likely next token equals fp32's (`quant.REFERENCE_MODE`).
Cost: about max_tokens x context / stride token forwards per mode (fp32 is always
evaluated, as the reference).

KL divergence (as llama.cpp's `--kl-divergence`): at each scored position,
KL(fp32 ‖ mode) of the next-token distributions, reported as its mean and 99th percentile,
with the share of positions whose top-1 differs from fp32's. It is exact: the fp32 pass
writes its float32 log-probabilities of every scored position to a temporary file (vocabulary
x 4 bytes per position: 1.6 GB for 8192 positions of a 49k vocabulary), each mode's pass reads
them back window by window, and the file is deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from quant.api import quantize_
from quant.calibration import DEFAULT_SOURCE, CalibrationContext, CalibrationError, read_calibration_text
from quant.checkpoints import DEFAULT_CACHE_DIR, DEFAULT_MODEL, default_cache_dir, load_float_model
from quant.config import ModeUnavailableError, QuantConfig, QuantOptions
from quant.kernels import configure as configure_kernels
from quant.prequantized import NATIVE, find_source, load_source
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
    quantize_seconds: float  # the report's: calibration (or its cache) plus replacing the layers
    eval_seconds: float
    kl_mean: float | None = None  # KL(reference ‖ mode) per scored position, nats: mean
    kl_p99: float | None = None  # and 99th percentile
    top1_differs: float | None = None  # share of scored positions whose argmax differs (1 - agreement)
    calibration_seconds: float | None = None  # calibrated modes: the calibration run (also on a cache hit)
    calibration_cached: bool | None = None
    model: str = ""  # the checkpoint this row evaluated (MODE@DIR rows differ from the reference's)
    warnings: list[str] = field(default_factory=list)  # e.g. the text is the calibration text


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


class ReferenceLogProbs:
    """The reference's float32 log-probabilities at every scored position, in a file (exact, and
    out of memory): the reference pass writes them, each mode's pass reads them back."""

    def __init__(self, path: Path, positions: int, vocabulary: int) -> None:
        self.path = path
        self.table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(positions, vocabulary))
        self.written = 0

    @classmethod
    def open(cls, path: Path) -> ReferenceLogProbs:
        """A table another process wrote (read-only)."""
        table = cls.__new__(cls)
        table.path, table.table = path, np.load(path, mmap_mode="r")
        table.written = table.table.shape[0]
        return table

    def write(self, logprobs: torch.Tensor) -> None:
        rows = logprobs.shape[0]
        self.table[self.written : self.written + rows] = logprobs.float().cpu().numpy()
        self.written += rows

    def read(self, start: int, rows: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.table[start : start + rows]))


def kl_per_position(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ mode) at each position, in nats: Σ p_ref (log p_ref − log p_mode)."""
    return torch.nn.functional.kl_div(logprobs, reference_logprobs, log_target=True, reduction="none").sum(-1)


@dataclass
class Scores:
    nll_sum: float
    count: int
    top1: torch.Tensor  # argmax prediction for every scored position, in order
    kl: torch.Tensor | None = None  # KL(reference ‖ this model) per scored position, when a reference was read


def score(
    model: nn.Module,
    ids: torch.Tensor,
    context: int,
    stride: int,
    on_window: Callable[[int, int], None] = lambda done, total: None,
    reference: ReferenceLogProbs | None = None,
    write_reference: bool = False,
) -> Scores:
    """Summed next-token negative log-likelihood and top-1 predictions over the sliding windows;
    with `reference`, also the KL divergence from it at each position (or, with `write_reference`,
    this model's log-probabilities written to it)."""
    device = next(model.parameters()).device
    nll_sum, count, top1, kl = 0.0, 0, [], []
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
            top1.append(logits.argmax(dim=-1).cpu())
            if reference is not None:
                logprobs = torch.log_softmax(logits, dim=-1).cpu()
                if write_reference:
                    reference.write(logprobs)
                kl.append(kl_per_position(reference.read(count, n_scored), logprobs))
            count += n_scored
            on_window(count, len(ids) - 1)
    return Scores(nll_sum, count, torch.cat(top1), torch.cat(kl) if kl else None)


def parse_mode_spec(spec: str, model: str) -> tuple[str, str]:
    """ "MODE" (on `model`) or "MODE@CHECKPOINT" (that mode on another checkpoint) → (mode, checkpoint)."""
    mode, _, checkpoint = spec.partition("@")
    return mode.strip(), checkpoint.strip() or model


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    if not a or not b:
        return False
    a, b = Path(a).expanduser(), Path(b).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def text_label(text: Path | None) -> str:
    """The evaluation text as `quant.calibration` labels its source (a resolved path, or the default's name)."""
    return str(text.expanduser().resolve()) if text is not None else DEFAULT_SOURCE


def calibration_warnings(text: Path | None, configs: list[QuantConfig], checkpoints: list[str]) -> list[str]:
    """Loud lines when a row was fitted to the evaluation text: a calibrated mode whose calibration file
    (`--calibration-file`, QS_CALIBRATION_FILE) is that text, or a quantserve-qat checkpoint trained on it."""
    label = text_label(text)
    warnings = []
    for config in configs:
        if config.calibrated and read_calibration_text(config.calibration_file)[1] == label:  # type: ignore[attr-defined]
            warnings.append(f"{config.name} is calibrated on the evaluation text")
    for checkpoint in dict.fromkeys(checkpoints):
        record = Path(checkpoint).expanduser() / "qat.json"
        if record.is_file() and json.loads(record.read_text()).get("calibration_source") == label:
            warnings.append(f"{checkpoint} was trained (quantserve-qat) on the evaluation text")
    return [
        f"WARNING: the evaluation text ({label}) is the calibration text: {w}; its scores are not held-out"
        for w in warnings
    ]


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
    kl: bool = True,
    on_warning: Callable[[str], None] = lambda line: None,
) -> Iterator[QualityResult]:
    """Evaluate the reference mode (fp32 on `model`) first, then every other mode in `modes`, one model at
    a time. A mode written "MODE@CHECKPOINT" runs on that checkpoint instead of `model`. `on_warning`
    gets each calibration warning before anything loads; every row carries them too."""
    options = options or QuantOptions()
    specs = list(dict.fromkeys([(REFERENCE_MODE, model)] + [parse_mode_spec(m, model) for m in modes]))
    # NATIVE serves the checkpoint's own quantization (a GGUF's types): loaded as is, never quantized here
    configs: list[QuantConfig | str] = [NATIVE if mode == NATIVE else make_config(mode, options) for mode, _ in specs]
    for config in configs:
        if config != NATIVE:
            config.check_available()  # fail before any long run
    quantized_configs = [config for config in configs if isinstance(config, QuantConfig)]
    found = calibration_warnings(text, quantized_configs, [c for _, c in specs if c != model])
    for line in found:
        on_warning(line)
    reference: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    with tempfile.TemporaryDirectory(prefix="quantserve-eval-") as scratch:
        reference_logprobs: ReferenceLogProbs | None = None
        for (mode, checkpoint), config in zip(specs, configs, strict=True):
            started = time.perf_counter()
            if config == NATIVE:
                source = find_source(checkpoint, NATIVE)
                if source is None:
                    raise ModeUnavailableError(
                        f"{NATIVE} needs a pre-quantized model (a .gguf file); {checkpoint!r} is not"
                    )
                float_model, tokenizer, model_id, report = load_source(source, cache_dir, options.device)
            else:
                float_model, tokenizer, model_id = load_float_model(checkpoint, cache_dir, options.device)
            if ids is None:
                ids = tokenize(tokenizer, load_text(text), max_tokens)
            is_reference = reference is None
            if kl and is_reference:
                vocabulary = float_model.get_output_embeddings().out_features
                reference_logprobs = ReferenceLogProbs(Path(scratch) / "reference.npy", len(ids) - 1, vocabulary)
            if config != NATIVE:
                started = time.perf_counter()
                calibration = CalibrationContext(tokenizer, model_id, cache_dir)
                report = quantize_(float_model, config, calibration=calibration)
            quantized = time.perf_counter()
            label = mode if checkpoint == model else f"{mode}@{checkpoint}"
            on_window = Progress(label, progress) if progress else (lambda done, total: None)
            scores = score(float_model, ids, context, stride, on_window, reference_logprobs, is_reference)
            finished = time.perf_counter()
            if reference is None:
                reference = scores.top1
            forwarded = sum(w.end - w.begin for w in sliding_windows(len(ids), context, stride))
            errors = report.error_summary()
            agreement = (scores.top1 == reference).float().mean().item()
            yield QualityResult(
                mode=label,
                weight_bytes=report.total_weight_bytes,
                quantized_ratio=report.quantized_ratio,
                layers_quantized=report.layers_quantized,
                layers_skipped=report.layers_skipped,
                layers_fallback=report.layers_fallback,
                kernels=dict(report.kernels),
                mean_sqnr_db=errors["mean_sqnr_db"],
                exact_layers=int(errors.get("exact_layers") or 0),
                perplexity=math.exp(scores.nll_sum / scores.count),
                agreement=agreement,
                tokens_scored=scores.count,
                tokens_forwarded=forwarded,
                quantize_seconds=report.quantize_seconds or quantized - started,
                eval_seconds=finished - quantized,
                kl_mean=None if scores.kl is None else scores.kl.mean().item(),
                kl_p99=None if scores.kl is None else torch.quantile(scores.kl.double(), 0.99).item(),
                top1_differs=1.0 - agreement,
                calibration_seconds=None if report.calibration is None else report.calibration.seconds,
                calibration_cached=None if report.calibration is None else report.calibration.cached,
                model=model_id,
                warnings=list(found),
            )
            del float_model
            gc.collect()


def format_table(results: list[QualityResult]) -> str:
    """A Markdown table; perplexity change is relative to the first (reference) row."""
    base = results[0].perplexity if results else float("nan")
    header = (
        f"| mode | weight MiB | quantized/{REFERENCE_MODE} | layers q/skip/fallback | mean SQNR dB | perplexity "
        f"| Δ vs {REFERENCE_MODE} "
        f"| top-1 agreement | KL mean | KL p99 | kernels | quantize s | eval s |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        ratio = "-" if r.quantized_ratio is None else f"{r.quantized_ratio:.3f}"
        kernels = ", ".join(sorted(r.kernels)) or "-"
        sqnr = "-" if r.mean_sqnr_db is None else f"{r.mean_sqnr_db:.1f}"
        if r.exact_layers:
            sqnr = "exact" if r.mean_sqnr_db is None else f"{sqnr} (+{r.exact_layers} exact)"
        kl_mean = "-" if r.kl_mean is None else f"{r.kl_mean:.4f}"
        kl_p99 = "-" if r.kl_p99 is None else f"{r.kl_p99:.4f}"
        quantize = f"{r.quantize_seconds:.1f}"
        if r.calibration_seconds is not None:  # what a first start costs, and whether this one read the cache
            cache = ", cached" if r.calibration_cached else ""
            quantize += f" (calibration {r.calibration_seconds:.1f}{cache})"
        lines.append(
            f"| {r.mode} | {r.weight_bytes / 2**20:.1f} | {ratio} "
            f"| {r.layers_quantized}/{r.layers_skipped}/{r.layers_fallback} | {sqnr} "
            f"| {r.perplexity:.3f} | {100 * (r.perplexity / base - 1):+.2f}% | {100 * r.agreement:.2f}% "
            f"| {kl_mean} | {kl_p99} | {kernels} | {quantize} | {r.eval_seconds:.0f} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modes",
        default="fp32,int8,int4",
        help=f"comma-separated, or 'all' ({', '.join(list_modes())}); MODE@DIR runs MODE on checkpoint DIR "
        "(e.g. a quantserve-qat output) against the same fp32 reference",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF directory, hub id or .gguf: the reference's and every mode's without @DIR (default: embedded)",
    )
    parser.add_argument("--text", type=Path, help="UTF-8 text file (default: Python's pydoc_data topics)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token budget taken from the text")
    parser.add_argument("--context", type=int, default=1024, help="tokens per window")
    parser.add_argument("--stride", type=int, default=768, help="tokens between window starts (new tokens scored)")
    QuantOptions.add_arguments(parser)  # --group-size, --fp8-format, ...: the knobs, declared in quant.config
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--kernels",
        choices=("auto", "reference"),
        default="auto",
        help="as QS_KERNELS (reference: de-quantize, float GEMM)",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: QS_CACHE_DIR")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-kl", action="store_true", help="skip the KL divergence (and its temporary file)")
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
    unknown = [m for m in modes if parse_mode_spec(m, args.model)[0] not in [*list_modes(), NATIVE]]
    if unknown:
        print(f"unknown mode(s) {', '.join(unknown)}; accepted: {', '.join([*list_modes(), NATIVE])}", file=sys.stderr)
        return 2
    try:
        options = QuantOptions.from_arguments(args, device=args.device)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    configure_kernels(kernels=args.kernels)
    if args.replay is not None:
        return replay_main(args, modes, options)
    results: list[QualityResult] = []
    warnings: list[str] = []
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
            kl=not args.no_kl,
            on_warning=lambda line: (warnings.append(line), print(line, file=sys.stderr, flush=True)),
        ):
            results.append(result)
            print(
                f"{result.mode}: perplexity {result.perplexity:.3f}, agreement {100 * result.agreement:.2f}%",
                file=sys.stderr,
            )
    except (ModeUnavailableError, CalibrationError) as error:
        print(error, file=sys.stderr)
        return 2
    for line in warnings:
        print(line)
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
