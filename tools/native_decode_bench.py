"""Benchmark of the native decode step (not a test): ours against llama.cpp in one run.

    python -m tools.native_decode_bench [--llama-cpp DIR] [--precisions int4,int8,fp32]
        [--steps 64] [--repeats 5] [--no-kernels] [--no-decode]

Prints, for this CPU (named in the header):
- the read bandwidth: GB/s of summing a 512 MiB float32 tensor on all threads;
- kernels at M=1: every weight shape of the default model through `quantserve.NativeLinear`
  (the decode step's packed kernels on its thread team), for each storage kind and ISA, as
  GB/s of weight bytes read and % of the read bandwidth. `NativeLinear.bench` times calls
  back to back in C++ inside one team job, as the decode step runs its matmuls (activation
  quantization, work items, a barrier after each), so no Python call is counted. Weights are
  cold: each shape cycles through copies totalling `--rotation-mib` (default 1 GiB, above
  this machine's 480 MiB L3);
- decode tok/s at batch 1 (64-token prompt, `--steps` greedy steps) of `NativeRunner` on the
  default model per precision, next to llama-bench (`-p 0 -n STEPS -r 1`) on the matching GGUF:
  Q4_0 and Q4_1 (shipped) for int4, Q8_0 for int8, F32 for fp32 (made from the shipped GGUF
  with `llama-quantize --allow-requantize` into a temporary folder). Quantized modes get the
  int8 g32 (Q8_0-layout) head, as llama.cpp stores this model's head. Ours and theirs run in
  turn within each repeat so that load from other processes hits both alike; medians over
  repeats, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = ((1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576))  # N x K of SmolLM2-135M
# as the decode step runs them: q|k|v in one phase, gate|up in one phase
FUSED_SHAPES = {(960, 576): "q|k|v", (3072, 576): "gate|up"}
LLAMA_FILES = {"int4": ("Q4_0", "Q4_1"), "int8": ("Q8_0",), "fp32": ("F32",)}
TARGETS = {("int4", "Q4_0"): 1.0, ("int4", "Q4_1"): 1.3, ("int8", "Q8_0"): 1.0, ("fp32", "F32"): 0.9}
PROMPT_TOKENS = 64


def cpu_name() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    except OSError:
        isa = "?"
    return f"{name} ({os.cpu_count()} CPUs, {isa})"


def median_seconds(fn: Callable[[], object], repeats: int, min_sample_s: float = 0.05) -> float:
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-7)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def read_bandwidth(repeats: int) -> float:
    """GB/s of summing a 512 MiB float32 tensor on all threads."""
    big = torch.ones(128 * 2**20)
    return big.numel() * 4 / median_seconds(lambda: torch.sum(big), repeats, 0.3) / 1e9


# ---- kernels at M=1 ---------------------------------------------------------------------


def weight_tensors(kind: str, n: int, k: int, gen: torch.Generator) -> tuple[list[torch.Tensor], int]:
    """Random weights of one storage kind as NativeLinear takes them, and the group size."""
    if kind == "f32":
        return [torch.randn(n, k, generator=gen)], 0
    if kind == "int8":
        return [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), torch.rand(n, generator=gen)], 0
    if kind == "int8_g32":
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        return [codes, torch.rand(n, k // 32, generator=gen).half()], 0
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // 64, generator=gen).half()
    return [packed, scales, -scales * 8], 64


def kernel_rows(isas: list[str], rotation_bytes: int, repeats: int, threads: int) -> list[dict]:
    """Seconds per M=1 GEMV per shape, kind and ISA, timed in C++ as the decode step runs them."""
    ops = torch.ops.quantserve
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in (*SHAPES, *FUSED_SHAPES):
        for kind in ("int4", "int8_g32", "int8", "f32"):
            linear = torch.classes.quantserve.NativeLinear(kind, *weight_tensors(kind, n, k, gen), None, threads)
            copies = max(1, math.ceil(rotation_bytes / linear.weight_bytes()))
            iters = max(copies, 200)
            x = torch.randn(1, k, generator=gen)
            row = {"shape": (n, k), "kind": kind, "bytes": linear.weight_bytes()}
            for isa in isas:
                ops.set_isa(isa)
                linear.bench(x, copies, copies)  # warm up: fault the copies in
                row[isa] = statistics.median(linear.bench(x, iters, copies) for _ in range(repeats))
            rows.append(row)
            del linear
    ops.set_isa("auto")
    return rows


def print_kernels(rows: list[dict], isas: list[str], bandwidth: float) -> None:
    print("\n## Kernels at M=1 (cold weights; GB/s of weight bytes read, % of read bandwidth)\n")
    header = " | ".join(f"{isa} µs | GB/s | % bw" for isa in isas)
    print(f"| N x K | kind | weight KiB | {header} |")
    print("|---|---|--:|" + "--:|--:|--:|" * len(isas))
    for r in rows:
        cells = []
        for isa in isas:
            gbs = r["bytes"] / r[isa] / 1e9
            cells.append(f"{r[isa] * 1e6:.1f} | {gbs:.1f} | {100 * gbs / bandwidth:.0f}%")
        fused = f" ({FUSED_SHAPES[r['shape']]})" if r["shape"] in FUSED_SHAPES else ""
        print(
            f"| {r['shape'][0]}x{r['shape'][1]}{fused} | {r['kind']} | {r['bytes'] / 1024:.0f} | {' | '.join(cells)} |"
        )


# ---- decode ---------------------------------------------------------------------------


def load_native_runner(precision: str, max_len: int, threads: int):
    from app.engine.native_runner import NativeRunner
    from app.model_loader import load_model
    from app.settings import load_settings
    from tools.decode_profile import prompt_ids

    # quantized modes get the int8 g32 head by default (QS_QUANTIZE_LM_HEAD=auto), as llama.cpp's Q8_0 one
    loaded = load_model(load_settings(precision=precision, device="cpu"))
    model = loaded.model
    runner = NativeRunner(model, loaded.device, max_slots=1, max_len=max_len, threads=threads)
    return runner, prompt_ids(loaded.tokenizer, PROMPT_TOKENS)


def ours_tok_s(runner, prompt: list[int], steps: int) -> float:
    """Decode tok/s at batch 1: the median step of `steps` greedy steps after the prompt."""
    token = int(runner.prefill(0, prompt).argmax())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = runner.decode([0], [token])
        times.append(time.perf_counter() - start)
        token = int(logits[0].argmax())
    runner.release(0)
    return 1.0 / statistics.median(times)


def llama_tok_s(peer: Path, gguf: Path, steps: int, threads: int) -> float:
    out = subprocess.run(
        [
            str(peer / "run"),
            "llama-bench",
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-p",
            "0",
            "-n",
            str(steps),
            "-r",
            "1",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out[out.index("[") :])[0]["avg_ts"])


def make_ggufs(peer: Path, folder: Path) -> dict[str, Path]:
    from quant.checkpoints import embedded_gguf

    shipped = embedded_gguf()
    files = {"Q4_1": shipped}
    for kind in ("Q4_0", "Q8_0", "F32"):
        target = folder / f"smol-{kind}.gguf"
        if not target.exists():
            subprocess.run(
                [str(peer / "run"), "llama-quantize", "--allow-requantize", str(shipped), str(target), kind],
                capture_output=True,
                check=True,
            )
        files[kind] = target
    return files


def decode_rows(precisions: list[str], peer: Path | None, steps: int, repeats: int, threads: int) -> list[dict]:
    runners = {p: load_native_runner(p, PROMPT_TOKENS + steps + 1, threads) for p in precisions}
    ggufs: dict[str, Path] = {}
    if peer is not None:
        folder = Path(os.environ.get("QS_BENCH_GGUF_DIR") or tempfile.mkdtemp(prefix="qs-gguf-"))
        folder.mkdir(parents=True, exist_ok=True)
        ggufs = make_ggufs(peer, folder)
    for runner, prompt in runners.values():  # warm up: first steps fault pages in
        ours_tok_s(runner, prompt, 8)
    ours: dict[str, list[float]] = {p: [] for p in precisions}
    theirs: dict[str, list[float]] = {f: [] for p in precisions for f in LLAMA_FILES[p]} if peer else {}
    for _ in range(repeats):
        for p in precisions:
            ours[p].append(ours_tok_s(*runners[p], steps))
            if peer is not None:
                for f in LLAMA_FILES[p]:
                    theirs[f].append(llama_tok_s(peer, ggufs[f], steps, threads))
    rows = []
    for p in precisions:
        for f in LLAMA_FILES[p] if peer else (None,):
            row = {"precision": p, "ours": ours[p], "file": f, "theirs": theirs.get(f, [])}
            row["bytes"] = runners[p][0].weight_bytes_per_step
            rows.append(row)
    return rows


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def print_decode(rows: list[dict], steps: int, repeats: int) -> None:
    print(f"\n## Decode at batch 1 ({PROMPT_TOKENS}-token prompt, {steps} steps, {repeats} repeats in turn)\n")
    print("| ours | MB/token | tok/s median (min-max) | GB/s | llama.cpp | tok/s median (min-max) | ratio | target |")
    print("|---|--:|--:|--:|---|--:|--:|--:|")
    for r in rows:
        ours = f"{r['bytes'] / 1e6:.1f} | {spread(r['ours'])} | {r['bytes'] * statistics.median(r['ours']) / 1e9:.1f}"
        if not r["theirs"]:
            print(f"| {r['precision']} | {ours} | - | - | - | - |")
            continue
        ratio = statistics.median(r["ours"]) / statistics.median(r["theirs"])
        target = TARGETS.get((r["precision"], r["file"]))
        verdict = "" if target is None else f"≥ {target:.1f}x {'met' if ratio >= target else 'MISSED'}"
        print(f"| {r['precision']} | {ours} | {r['file']} | {spread(r['theirs'])} | {ratio:.2f}x | {verdict} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp peer folder (with `run`)")
    parser.add_argument("--precisions", default="int4,int8,fp32")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    parser.add_argument("--rotation-mib", type=int, default=1024, help="cold-weight rotation per kernel shape")
    parser.add_argument("--no-kernels", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from quant.kernels import native_ops

    ops = native_ops()
    if ops is None:
        raise SystemExit("the quantserve kernels are not available")
    isas = list(ops.available_isas())
    print(f"# Native decode bench: {cpu_name()}")
    print(f"torch {torch.__version__}, {threads} threads, kernel ISAs {', '.join(isas)} (decode runs {ops.isa()}),")
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    bandwidth = read_bandwidth(7)
    print(f"read bandwidth (sum of a 512 MiB float32 tensor, {threads} threads): {bandwidth:.1f} GB/s")
    if not args.no_kernels:
        print_kernels(kernel_rows(isas, args.rotation_mib << 20, 7, threads), isas, bandwidth)
    if not args.no_decode:
        rows = decode_rows(
            [p.strip() for p in args.precisions.split(",")], args.llama_cpp, args.steps, args.repeats, threads
        )
        print_decode(rows, args.steps, args.repeats)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
