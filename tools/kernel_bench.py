"""Benchmark of the quantized linear kernels (not a test): `python -m tools.kernel_bench`.

For each weight shape N×K (out_features × in_features, torch's [out, in] layout) and
each M (rows of activations), it times in one run:
- fp32 `F.linear` (MKL/oneDNN sgemm), the baseline of every ratio;
- torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` with bfloat16 inputs
  (their fast path; with float32 inputs they are far slower);
- our kernels (float32 inputs) for every ISA variant this CPU runs,
and the machine's read bandwidth (sum of a large tensor), so that "% bw" is measured here.

Weights are cold by default: each method cycles through enough copies of its weights to
exceed the last-level cache, as in decoding a model larger than the cache (use --hot to
reuse one copy). Times are medians of repeated samples; ratios come from this one run.

`python -m tools.kernel_bench --decode fp32 int8 int4` instead measures greedy decode tok/s
of the default model per mode, on the reference path (as QS_KERNELS=reference runs it) and
with the kernels, alternating in one process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.kernels import dequantize_int4, int4_linear, int8_linear, native_ops, use_reference
from quant.primitives import pack_int4

# Weight shapes N×K: every linear of SmolLM2-135M (q/o, k/v, gate/up, down, lm_head) and LLaMA-7B.
DEFAULT_SHAPES = ((1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576))
LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
ROTATION_BYTES = 256 * 2**20  # well above this machine's 32 MiB L3
LARGER_THAN_L2 = 2 * 2**20  # targets apply to weights above the L2 of both cores together


def measure(fn: Callable[..., object], args: list[tuple], repeats: int, min_sample_s: float = 0.03) -> float:
    """Median seconds per call, cycling through `args` (one tuple per weight copy).

    A sample runs at least `min_sample_s` and, unless calls are slow enough that the
    cache state no longer matters, every copy once.
    """
    for a in args[:2]:
        fn(*a)
    start = time.perf_counter()
    fn(*args[0])
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(min(len(args), math.ceil(0.5 / once)), math.ceil(min_sample_s / once))
    samples = []
    index = 0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args[index % len(args)])
            index += 1
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def read_bandwidth(repeats: int) -> float:
    """GB/s of summing a 512 MiB float32 tensor (all threads)."""
    big = torch.ones(128 * 2**20)
    seconds = measure(torch.sum, [(big,)], repeats, min_sample_s=0.2)
    return big.numel() * 4 / seconds / 1e9


def copies_for(nbytes: int, hot: bool) -> int:
    return 1 if hot else max(1, math.ceil(ROTATION_BYTES / nbytes))


@dataclass
class Row:
    shape: tuple[int, int]
    m: int
    times: dict[str, float]


@dataclass
class Weights:
    """Rotating copies of one shape's weights for every method: one argument tuple per copy."""

    fp32: list[tuple]
    int8: list[tuple]
    int4: list[tuple]
    aten_int8: list[tuple]
    aten_int4: list[tuple]


def make_weights(n: int, k: int, group_size: int, hot: bool, gen: torch.Generator) -> Weights:
    int8_bytes, int4_bytes = weight_bytes(n, k, group_size)

    def rotate(make: Callable[[], tuple], nbytes: int) -> list[tuple]:
        return [make() for _ in range(copies_for(nbytes, hot))]

    int8 = rotate(
        lambda: (torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), torch.rand(n, generator=gen) / 64),
        int8_bytes,
    )
    return Weights(
        fp32=rotate(lambda: (torch.randn(n, k, generator=gen),), n * k * 4),
        int8=int8,
        int4=rotate(lambda: random_int4(n, k, group_size, gen), int4_bytes),
        aten_int8=[(w, s.to(torch.bfloat16)) for w, s in int8],
        aten_int4=rotate(lambda: aten_int4_weight(n, k, group_size, gen), int4_bytes),
    )


def time_methods(x: torch.Tensor, w: Weights, isas: list[str], group_size: int, repeats: int) -> dict[str, float]:
    ops = native_ops()
    xb = x.to(torch.bfloat16)
    times = {
        "fp32": measure(lambda wf: F.linear(x, wf), w.fp32, repeats),
        "aten_int8": measure(lambda q, s: torch.ops.aten._weight_int8pack_mm(xb, q, s), w.aten_int8, repeats),
        "aten_int4": measure(
            lambda q, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q, group_size, sz), w.aten_int4, repeats
        ),
    }
    for isa in isas:
        ops.set_isa(isa)
        # through the public functions the layers call (Python dispatch included)
        times[f"int8_{isa}"] = measure(lambda q, s: int8_linear(x, q, s, None), w.int8, repeats)
        times[f"int4_{isa}"] = measure(lambda p, s, z: int4_linear(x, p, s, z, group_size, None), w.int4, repeats)
    ops.set_isa(isas[0])
    return times


def bench_shape(n: int, k: int, ms: list[int], isas: list[str], group_size: int, hot: bool, repeats: int) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    weights = make_weights(n, k, group_size, hot, gen)
    rows = []
    for m in ms:
        rows.append(Row((n, k), m, time_methods(torch.randn(m, k, generator=gen), weights, isas, group_size, repeats)))
        print(f"  measured {n}×{k} M={m}", file=sys.stderr, flush=True)
    return rows


def weight_bytes(n: int, k: int, group_size: int) -> tuple[int, int]:
    """Bytes read per call: int8 weights + float32 scales; packed int4 + fp16 scales and mins."""
    return n * k + 4 * n, n * k // 2 + 2 * 2 * n * (k // group_size)


def random_int4(n: int, k: int, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // group_size, generator=gen) / 64).half()
    mins = (-8 * scales.float()).half()
    return pack_int4(codes), scales, mins


def aten_int4_weight(n: int, k: int, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_and_zeros = (torch.rand(k // group_size, n, 2, generator=gen) / 64).to(torch.bfloat16)
    return packed, scales_and_zeros


def check_reference(isas: list[str], group_size: int) -> None:
    """Guard against timing a broken kernel: compare once with dequantize-then-matmul."""
    ops = native_ops()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=gen)
    packed, scales, mins = random_int4(64, 256, group_size, gen)
    w8 = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=gen)
    s8 = torch.rand(64, generator=gen) / 64
    for isa in isas:
        ops.set_isa(isa)
        for got, want in (
            (ops.int8_linear(x, w8, s8, None), x @ (w8.float() * s8[:, None]).t()),
            (
                ops.int4_linear(x, packed, scales, mins, group_size, None),
                x @ dequantize_int4(packed, scales, mins, group_size).t(),
            ),
        ):
            rel = ((got - want).norm() / want.norm()).item()
            if rel > 0.02:
                raise SystemExit(f"{isa}: kernel output differs from the reference (relative error {rel:.3g})")
    ops.set_isa(isas[0])


def print_table(title: str, kind: str, rows: list[Row], isas: list[str], bandwidth: float, group_size: int) -> None:
    aten = f"aten_{kind}"
    print(f"\n{title}")
    head = f"{'N×K':>12} {'M':>3} {'fp32 ms':>8} {aten + ' ms':>14}"
    for isa in isas:
        head += f" | {isa + ' ms':>15} {'GB/s':>5} {'%bw':>4} {'x fp32':>6} {'x aten':>6}"
    print(head)
    for row in rows:
        n, k = row.shape
        nbytes = weight_bytes(n, k, group_size)[0 if kind == "int8" else 1]
        line = f"{f'{n}×{k}':>12} {row.m:>3} {row.times['fp32'] * 1e3:8.3f} {row.times[aten] * 1e3:14.3f}"
        for isa in isas:
            t = row.times[f"{kind}_{isa}"]
            gbs = nbytes / t / 1e9
            line += (
                f" | {t * 1e3:15.3f} {gbs:5.1f} {100 * gbs / bandwidth:4.0f}"
                f" {row.times['fp32'] / t:6.2f} {row.times[aten] / t:6.2f}"
            )
        print(line)


def print_targets(rows: list[Row], isas: list[str], bandwidth: float, group_size: int) -> None:
    print("\nTargets (M=1 on weights larger than L2: int8 >= 2.5x fp32 and >= 65% bw, int4 >= 4x fp32;")
    print("M=64: neither slower than fp32):")
    for isa in isas:
        misses = []
        checked = 0
        for row in rows:
            n, k = row.shape
            int8_bytes = weight_bytes(n, k, group_size)[0]
            t8, t4, fp32 = row.times[f"int8_{isa}"], row.times[f"int4_{isa}"], row.times["fp32"]
            checks = []
            if row.m == 1 and int8_bytes > LARGER_THAN_L2:
                checks += [
                    ("int8 x fp32 >= 2.5", fp32 / t8, 2.5),
                    ("int8 %bw >= 65", 100 * int8_bytes / t8 / 1e9 / bandwidth, 65),
                    ("int4 x fp32 >= 4", fp32 / t4, 4.0),
                ]
            if row.m == 64:
                checks += [("int8 x fp32 >= 1", fp32 / t8, 1.0), ("int4 x fp32 >= 1", fp32 / t4, 1.0)]
            for name, value, target in checks:
                checked += 1
                if value < target:
                    misses.append(f"{n}×{k} M={row.m}: {name} (got {value:.2f})")
        status = "all met" if not misses else f"{len(misses)} missed"
        print(f"  {isa}: {checked} checks, {status}")
        for miss in misses:
            print(f"    MISSED {miss}")


DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_table(modes: list[str], new_tokens: int, repeats: int) -> None:
    """Greedy decode tok/s of the default model per mode, reference path (before) and kernels (after).

    Both run on the same quantized model in this process, alternating, so that load from
    other processes hits them alike.
    """
    from quant import make_config, quantize_
    from quant.checkpoints import default_cache_dir, load_float_model

    print(f"\ndecode, default model, greedy, {new_tokens} new tokens (short prompt included), median of {repeats}")
    print(f"{'mode':>12} {'reference tok/s':>16} {'kernels tok/s':>14} {'speed-up':>8}  layers per kernel")
    cache_dir = default_cache_dir()
    for mode in modes:
        model, tokenizer, _ = load_float_model(cache_dir=cache_dir)
        report = quantize_(model, make_config(mode), measure_error=False)
        ids = tokenizer(DECODE_PROMPT, return_tensors="pt")

        def generate(tokens: int, model=model, ids=ids) -> float:
            start = time.perf_counter()
            model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"reference": [], "kernels": []}
        with torch.inference_mode():
            generate(4)  # warm-up
            for _ in range(repeats):
                with use_reference():
                    times["reference"].append(generate(new_tokens))
                times["kernels"].append(generate(new_tokens))
        before, after = (new_tokens / statistics.median(times[key]) for key in ("reference", "kernels"))
        print(f"{mode:>12} {before:16.1f} {after:14.1f} {after / before:8.2f}  {report.kernels}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.kernel_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 64], help="rows of activations")
    parser.add_argument("--shapes", choices=["all", "default", "7b"], default="all")
    parser.add_argument("--isa", nargs="+", help="kernel variants to time (default: all this CPU runs)")
    parser.add_argument(
        "--group-size", type=int, default=64, help="int4 group size (ours and aten's; int4 mode default 64)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="samples per measurement (median)")
    parser.add_argument("--hot", action="store_true", help="reuse one weight copy (cache-resident when it fits)")
    parser.add_argument("--decode", nargs="+", metavar="MODE", help="instead: end-to-end decode tok/s of these modes")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode:
        decode_table(args.decode, args.new_tokens, args.repeats)
        return

    ops = native_ops()
    if ops is None:
        raise SystemExit("quantserve kernels are not available (see the log); nothing to benchmark")
    isas = args.isa or list(ops.available_isas())
    check_reference(isas, args.group_size)
    shapes = {"default": DEFAULT_SHAPES, "7b": LLAMA_7B_SHAPES, "all": DEFAULT_SHAPES + LLAMA_7B_SHAPES}[args.shapes]

    bandwidth = read_bandwidth(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel ISAs: {', '.join(isas)}")
    print(f"measured read bandwidth (sum of a 512 MiB tensor): {bandwidth:.1f} GB/s")
    print(
        f"weights {'hot (one copy)' if args.hot else 'cold (rotating copies > 256 MiB)'}; int4 group size {args.group_size}"
    )
    print("shapes are weights N×K = out_features × in_features; ours take float32 x, aten's bfloat16 x")
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, args.m, isas, args.group_size, args.hot, args.repeats)
    print_table(
        "int8 weights (GB/s: int8 weights + fp32 scales per call)", "int8", rows, isas, bandwidth, args.group_size
    )
    print_table(
        "int4 weights (GB/s: packed codes + fp16 scales and mins)", "int4", rows, isas, bandwidth, args.group_size
    )
    print_targets(rows, isas, bandwidth, args.group_size)
    print(f"(measured read bandwidth at the end: {read_bandwidth(args.repeats):.1f} GB/s)")


if __name__ == "__main__":
    main()
