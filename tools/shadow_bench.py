"""What shadow scoring costs the served mode: its throughput with and without shadowing, in one run.

    python -m tools.shadow_bench --mode int4 --reference fp32 --sample 0.05 --clients 8 --rounds 3

Two live servers with the same modes (`<mode>,<reference>`, so the same memory and engines), one
with QS_SHADOW_REFERENCE=<reference> and QS_SHADOW_SAMPLE=<sample>, one without. Both stay up;
the load generator (`tools.loadgen.run_load`, streamed greedy completions of the default mode)
drives them in alternation, round after round, so drift of a shared machine hits both alike.
Reports each server's tokens per second per round, the medians and their ratio (the target is
>= 0.95 at 5%), and, from the shadowed server's /info, how many replays were scored and the CPU
seconds each party of the fair share held its turn. On a machine other work shares, wall-clock
rounds swing with that work; the turn seconds do not: while the served mode is busy, every
second the scorer holds the turn is a second the mode waits, so served / (served + shadow) turn
seconds is the throughput ratio that shadowing alone allows (`turn_ratio`, over the rounds only).
After each shadowed round the tool waits until that server has no replay left, so none runs
during the next round of either server; the drain times are reported, not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

import httpx

from quant.checkpoints import DEFAULT_MODEL, default_cache_dir
from tools.bench.serving import ServerSpec, running_server
from tools.loadgen import run_load


def _server(stack: ExitStack, spec: ServerSpec, env: dict[str, str], log: Path) -> str:
    with mock.patch.dict(os.environ, env):
        return stack.enter_context(running_server(spec, log))


def _info(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/info", timeout=10).json()


def _drain(url: str, limit: float = 600.0) -> float:
    """Wait until the shadowed server has no replay left; returns the seconds it took. Replays left
    over from a round would otherwise run during the other server's round, in another process,
    outside any fair share, and slow that round down instead."""
    started = time.perf_counter()
    while _info(url)["shadow"]["pending"] > 0:
        if time.perf_counter() - started > limit:
            raise RuntimeError(f"the shadow queue did not drain in {limit:.0f} s")
        time.sleep(0.2)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, logs: Path) -> dict[str, object]:
    modes = f"{args.mode},{args.reference}"
    spec = ServerSpec(modes, args.model, str(args.cache_dir), "cpu", max_concurrent_requests=max(16, args.clients))
    common = {"QS_MAX_BATCH_SIZE": str(args.clients)}
    shadowed = {**common, "QS_SHADOW_REFERENCE": args.reference, "QS_SHADOW_SAMPLE": str(args.sample)}
    rounds: dict[str, list[float]] = {"plain": [], "shadowed": []}
    # per round, the 95th percentile of the requests' mean time per output token: a replay chunk
    # is a pause every stream in flight waits through, so latency is reported beside throughput
    tpot_p95: dict[str, list[float]] = {"plain": [], "shadowed": []}
    # per shadowed round: the seconds each party held its turn during the round, the replays it
    # scored during the round, and the seconds its leftover replays took after it
    round_turns: list[dict[str, float]] = []
    scored_in_round: list[int] = []
    drain_seconds: list[float] = []
    with ExitStack() as stack:
        # which server starts first (a second run with the other order tells the order's effect apart)
        environments = {"plain": common, "shadowed": shadowed}
        started = ("shadowed", "plain") if args.shadowed_first else ("plain", "shadowed")
        urls = {name: _server(stack, spec, environments[name], logs / f"{name}.log") for name in started}
        for url in urls.values():  # warm-up: first requests pay one-off costs
            asyncio.run(run_load(url, args.clients, max_new_tokens=8, requests_per_client=1))
        for number in range(args.rounds):
            order = ("plain", "shadowed") if number % 2 == 0 else ("shadowed", "plain")
            for name in order:
                before = _info(urls[name]) if name == "shadowed" else {}
                result = asyncio.run(
                    run_load(
                        urls[name],
                        args.clients,
                        max_new_tokens=args.max_new_tokens,
                        requests_per_client=args.requests_per_client,
                    )
                )
                if result.failed:
                    raise RuntimeError(f"{name}: {result.failed} requests failed")
                rounds[name].append(result.tokens_per_second)
                tpot_p95[name].append(result.tpot_p95)
                if name == "shadowed":
                    after = _info(urls[name])
                    used_before, used_after = before["cpu_seconds_by_party"], after["cpu_seconds_by_party"]
                    round_turns.append({party: used_after[party] - used_before.get(party, 0.0) for party in used_after})
                    scored_in_round.append(after["shadow"]["scored"] - before["shadow"]["scored"])
                    drain_seconds.append(_drain(urls[name]))
                print(f"round {number + 1} {name}: {result.tokens_per_second:.1f} tok/s", file=sys.stderr)
        info = _info(urls["shadowed"])
    plain, shadowed_median = statistics.median(rounds["plain"]), statistics.median(rounds["shadowed"])
    # each round's two windows ran back to back: their ratio sees less of the machine's drift
    paired = [s / p for s, p in zip(rounds["shadowed"], rounds["plain"], strict=True)]
    # the turns held while the rounds ran (a drain between rounds is idle time the scorer may use)
    served_turns = sum(t.get(args.mode, 0.0) for t in round_turns)
    shadow_turns = sum(t.get("shadow", 0.0) for t in round_turns)
    return {
        "mode": args.mode,
        "reference": args.reference,
        "sample": args.sample,
        "started_first": started[0],
        "clients": args.clients,
        "max_new_tokens": args.max_new_tokens,
        "requests_per_round": args.clients * args.requests_per_client,
        "tokens_per_second": rounds,
        "tpot_p95_seconds": tpot_p95,
        "median_plain": plain,
        "median_shadowed": shadowed_median,
        "ratio": shadowed_median / plain,
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
        "shadow": info.get("shadow"),
        "cpu_seconds_by_party": info.get("cpu_seconds_by_party"),
        "turn_seconds_in_rounds": {args.mode: served_turns, "shadow": shadow_turns},
        "replays_scored_in_rounds": scored_in_round,
        "drain_seconds": drain_seconds,
        "turn_ratio": served_turns / (served_turns + shadow_turns) if served_turns else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.shadow_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="int4", help="the served mode measured")
    parser.add_argument("--reference", default="fp32")
    parser.add_argument("--sample", type=float, default=0.05, help="QS_SHADOW_SAMPLE of the shadowed server")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each server, alternated")
    parser.add_argument("--shadowed-first", action="store_true", help="start the shadowed server first")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--logs", type=Path, help="server logs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with TemporaryDirectory() as temporary:
        logs = args.logs or Path(temporary)
        logs.mkdir(parents=True, exist_ok=True)
        figures = measure(args, logs)
    rounds = figures["tokens_per_second"]
    print(
        f"{args.mode} served, {args.clients} clients x {args.requests_per_client} requests x "
        f"{args.max_new_tokens} tokens per round, {args.rounds} rounds each"
    )
    print(f"without shadowing: {', '.join(f'{v:.1f}' for v in rounds['plain'])} tok/s")
    print(
        f"with {args.sample:.0%} shadowed on {args.reference}: {', '.join(f'{v:.1f}' for v in rounds['shadowed'])} tok/s"
    )
    print(
        f"medians {figures['median_shadowed']:.1f} / {figures['median_plain']:.1f} = {figures['ratio']:.3f}; "
        f"median of the rounds' ratios {figures['median_paired_ratio']:.3f}; "
        f"shadow {figures['shadow']}"
    )
    tpot = figures["tpot_p95_seconds"]
    print(
        "time per output token, p95 of the requests (median of the rounds): "
        f"plain {statistics.median(tpot['plain']) * 1000:.1f} ms, "
        f"shadowed {statistics.median(tpot['shadowed']) * 1000:.1f} ms"
    )
    print(
        f"during the shadowed rounds: turn seconds {figures['turn_seconds_in_rounds']}, "
        f"turn ratio {args.mode} / ({args.mode} + shadow) = {figures['turn_ratio']:.3f}; replays scored per round "
        f"{figures['replays_scored_in_rounds']}; leftover replays drained in "
        f"{', '.join(f'{v:.1f}' for v in figures['drain_seconds'])} s after the rounds"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
