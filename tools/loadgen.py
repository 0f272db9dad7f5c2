"""Load generator: N concurrent streaming clients against a running server.

Each client sends streamed `/v1/completions` requests one after another, each
generating exactly `max_new_tokens` tokens (greedy, `ignore_eos`), and times
them from its side of the connection. Reports the aggregate generated tokens
per second, time to first token (TTFT) and time per output token (TPOT, the
mean gap between a request's later tokens).

    python -m tools.loadgen --url http://127.0.0.1:8000 --clients 1,4,8,16
    python -m tools.loadgen --clients 1 --logprobs 5   # what asking for log-probs costs

`run_load` / `run_sweep` are the same measurement as functions (the benchmark,
`tools.bench`, uses them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import httpx

# Distinct openings, so clients do not all generate the same text.
PROMPTS = (
    "The history of the printing press begins",
    "In the middle of the ocean there is",
    "A good recipe for bread needs",
    "The main reasons for the fall of the Roman Empire were",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
    "To learn a new language quickly, you should",
    "The city of Paris is famous for",
)


@dataclass(frozen=True)
class RequestSample:
    ttft: float  # seconds from sending the request to its first token
    tpot: float | None  # mean seconds between its later tokens (None with a single token)
    tokens: int


@dataclass(frozen=True)
class LoadResult:
    clients: int
    requests: int
    failed: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50: float
    ttft_p95: float
    tpot_p50: float
    tpot_p95: float


class LoadError(RuntimeError):
    """A request of the load failed; the message says how."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated; NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def stream_completion(
    client: httpx.AsyncClient, prompt: str, max_new_tokens: int, headers: dict[str, str], logprobs: int | None = None
) -> RequestSample:
    """One streamed completion of exactly `max_new_tokens` tokens, timed on arrival of its chunks
    (with `logprobs`, each token's log-prob and its `logprobs` most likely alternatives asked too)."""
    body: dict[str, object] = {
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if logprobs is not None:
        body["logprobs"] = logprobs
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise LoadError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise LoadError(f"{chunk.get('error_type')}: {chunk['error']}")
            if chunk["choices"]:
                last = time.perf_counter()
                first = first or last
                if logprobs is not None and not chunk["choices"][0]["logprobs"]:
                    raise LoadError("a chunk came without the log-probs asked for")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or last is None or tokens == 0:
        raise LoadError("the stream ended without tokens")
    return RequestSample(ttft=first - sent, tpot=(last - first) / (tokens - 1) if tokens > 1 else None, tokens=tokens)


async def run_load(
    base_url: str,
    clients: int,
    *,
    max_new_tokens: int = 64,
    requests_per_client: int = 2,
    api_key: str | None = None,
    timeout: float = 600.0,
    logprobs: int | None = None,
) -> LoadResult:
    """`clients` concurrent clients, each sending `requests_per_client` streamed requests in turn."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples: list[RequestSample] = []
    failures: list[str] = []

    async def client_loop(client: httpx.AsyncClient, number: int) -> None:
        for turn in range(requests_per_client):
            prompt = PROMPTS[(number + turn * clients) % len(PROMPTS)]
            try:
                samples.append(await stream_completion(client, prompt, max_new_tokens, headers, logprobs=logprobs))
            except (LoadError, httpx.HTTPError) as error:
                failures.append(str(error))

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, n) for n in range(clients)))
        seconds = time.perf_counter() - started
    generated = sum(s.tokens for s in samples)
    ttfts = [s.ttft for s in samples]
    tpots = [s.tpot for s in samples if s.tpot is not None]
    return LoadResult(
        clients=clients,
        requests=len(samples),
        failed=len(failures),
        generated_tokens=generated,
        seconds=seconds,
        tokens_per_second=generated / seconds,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        tpot_p50=percentile(tpots, 50),
        tpot_p95=percentile(tpots, 95),
    )


def run_sweep(
    base_url: str,
    client_counts: Sequence[int] = (1, 4, 8, 16),
    *,
    max_new_tokens: int = 64,
    requests_per_client: int = 2,
    api_key: str | None = None,
    logprobs: int | None = None,
) -> list[LoadResult]:
    """A warm-up request, then `run_load` for each number of clients in turn."""

    async def sweep() -> list[LoadResult]:
        await run_load(base_url, 1, max_new_tokens=4, requests_per_client=1, api_key=api_key)
        return [
            await run_load(
                base_url,
                n,
                max_new_tokens=max_new_tokens,
                requests_per_client=requests_per_client,
                api_key=api_key,
                logprobs=logprobs,
            )
            for n in client_counts
        ]

    return asyncio.run(sweep())


def format_table(results: Sequence[LoadResult]) -> str:
    """A Markdown table, one row per number of clients; times in milliseconds."""
    lines = [
        "| clients | requests | failed | tokens | seconds | tok/s | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | TPOT p95 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.clients} | {r.requests} | {r.failed} | {r.generated_tokens} | {r.seconds:.1f} "
            f"| {r.tokens_per_second:.1f} | {r.ttft_p50 * 1e3:.0f} | {r.ttft_p95 * 1e3:.0f} "
            f"| {r.tpot_p50 * 1e3:.1f} | {r.tpot_p95 * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the running server")
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer` (QS_API_KEY)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--logprobs", type=int, default=None, help="ask each token's log-prob and N alternatives")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",") if n.strip()]
    try:
        results = run_sweep(
            args.url,
            counts,
            max_new_tokens=args.max_new_tokens,
            requests_per_client=args.requests_per_client,
            api_key=args.api_key,
            logprobs=args.logprobs,
        )
    except (LoadError, httpx.HTTPError) as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in results], out, indent=2)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
