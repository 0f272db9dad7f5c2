"""Per-token breakdown of a decode step at batch 1: linear layers vs everything else.

    python -m tools.decode_profile [--precisions fp32,int8] [--steps 32] [--repeats 5] [--threads N] [--clock cpu]

For each precision mode it times decode steps of transformers' forward
(`HFRunner`) and of the lean Llama runner (`LlamaRunner`) on the same loaded model, and the
model's linear layers alone (each called once per step on a [1, in_features]
input, as in a decode step). "rest" is total minus linears: norms, RoPE,
attention, cache updates, and the Python and dispatch cost around them.
Runners and linears are timed per step, in turn within each repeat, so that
load from other processes hits them alike; the table gives medians and
the 10th-90th percentile of the total per step.

On a shared machine, `--threads 1 --clock cpu` measures the work itself: a
single thread's CPU time barely moves with other processes' load, while
elapsed time with several threads also counts the waits of each parallel
region for a thread that another process holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from app.engine.llama_runner import LlamaRunner
from app.engine.native_runner import NativeRunner, native_unsupported_reason
from app.engine.runner import HFRunner, ModelRunner
from app.model_loader import load_model
from app.settings import load_settings
from quant.layers.base import QuantizedLinear


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of real English text (Python's own documentation)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics)[:5])
    ids = tokenizer(text)["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"the sample text has only {len(ids)} tokens")
    return ids


Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def decode_step_ms(runner: ModelRunner, prompt: list[int], steps: int, clock: Clock = time.perf_counter) -> list[float]:
    """Milliseconds of each of `steps` greedy decode steps after `prompt`."""
    token = int(runner.prefill(0, prompt).argmax())
    times = []
    for _ in range(steps):
        started = clock()
        logits = runner.decode([0], [token])
        times.append((clock() - started) * 1e3)
        token = int(logits[0].argmax())
    runner.release(0)
    return times


def linear_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | QuantizedLinear)]


@torch.inference_mode()
def linears_step_ms(
    linears: list[nn.Module], steps: int, dtype: torch.dtype, device: torch.device, clock: Clock = time.perf_counter
) -> list[float]:
    """Milliseconds of calling every linear layer once on a [1, in_features] input, `steps` times."""
    inputs = [torch.randn(1, m.in_features, dtype=dtype, device=device) for m in linears]
    times = []
    for _ in range(steps):
        started = clock()
        for module, x in zip(linears, inputs, strict=True):
            module(x)
        times.append((clock() - started) * 1e3)
    return times


def profile_precision(
    precision: str, steps: int, repeats: int, prompt_tokens: int, clock: Clock = time.perf_counter, **settings: object
) -> dict[str, dict[str, float | None]]:
    """Per runner: median ms per step of the total, the linears and the rest, with the total's p10 and p90."""
    loaded = load_model(load_settings(precision=precision, device="cpu", **settings))
    model, device = loaded.model, loaded.device
    prompt = prompt_ids(loaded.tokenizer, prompt_tokens)
    runners: dict[str, ModelRunner] = {
        "HFRunner": HFRunner(model, device),
        "LlamaRunner": LlamaRunner(model, device, max_slots=1, max_len=prompt_tokens + steps + 1),
    }
    if native_unsupported_reason(model, prompt_tokens + steps + 1) is None:
        runners["NativeRunner"] = NativeRunner(model, device, max_slots=1, max_len=prompt_tokens + steps + 1)
    linears = linear_layers(model)
    dtype = next(model.parameters()).dtype  # the compute dtype (the embedding may be an int8 table)
    timers: dict[str, Callable[[], list[float]]] = {
        name: (lambda r=runner: decode_step_ms(r, prompt, steps, clock)) for name, runner in runners.items()
    }
    timers["linears"] = lambda: linears_step_ms(linears, steps, dtype, device, clock)
    for timer in timers.values():  # warm up (first calls allocate and pick kernels)
        timer()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name] += timer()
    linears_ms = statistics.median(samples["linears"])
    rows = {}
    for name in runners:
        deciles = statistics.quantiles(samples[name], n=10)
        total = statistics.median(samples[name])
        if name == "NativeRunner":  # one C++ call on its own repacked weights: no torch linears to subtract
            rows[name] = {"total": total, "p10": deciles[0], "p90": deciles[-1], "linears": None, "rest": None}
            continue
        rows[name] = {"total": total, "p10": deciles[0], "p90": deciles[-1], "linears": linears_ms}
        rows[name]["rest"] = total - linears_ms
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.decode_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,int8", help="comma-separated precision modes")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per runner (medians are reported)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length before decoding")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--model", default=None, help="model to load (default: QS_MODEL or the embedded default)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of the process, which other processes' load barely moves "
        "(equals elapsed time on an idle machine only with --threads 1)",
    )
    args = parser.parse_args()
    settings = {} if args.model is None else {"model": args.model}
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"decode at batch 1, prompt {args.prompt_tokens} tokens, {args.steps} steps x {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, load average {os.getloadavg()[0]:.1f}; "
        "ms per step, medians (total: p10-p90)"
    )
    print("| precision | runner | total ms | linears ms | rest ms | tok/s |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        rows = profile_precision(
            precision.strip(), args.steps, args.repeats, args.prompt_tokens, CLOCKS[args.clock], **settings
        )
        for name, row in rows.items():
            print(
                f"| {precision} | {name} | {row['total']:.1f} ({row['p10']:.1f}-{row['p90']:.1f}) "
                f"| {_ms(row['linears'])} | {_ms(row['rest'])} | {1e3 / row['total']:.1f} |",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
