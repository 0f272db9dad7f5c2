"""Soak: 1,000 mixed requests against a real server process (the `quantserve` entry point) on loopback.

Valid, invalid, streamed, cancelled mid-stream, abandoned before the answer,
and over the limits (prompt or token budget too large; more concurrent clients
than the server admits, so some get 429). Checks: no 5xx, every error in the
one shape, nothing left running or queued at the end, and resident memory
after the run within 5% of what it was after the first 100 requests.

    pytest -m slow tests/app/test_soak.py -s     # prints the figures
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.live_server import serve_process
from tools.stress import WORDS  # the same common English words as the stress run

pytestmark = pytest.mark.slow

TOTAL = 1000
WARM = 100  # memory is compared to what it is after this many requests
CONCURRENCY = 9  # one more than QS_MAX_CONCURRENT_REQUESTS below: some requests must get 429
LIMITS = {
    "QS_MAX_INPUT_TOKENS": "64",
    "QS_MAX_TOTAL_TOKENS": "128",
    "QS_MAX_CONCURRENT_REQUESTS": "8",
    "QS_MAX_BATCH_SIZE": "4",
}


@dataclass
class SoakReport:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    bad_errors: list[str] = field(default_factory=list)
    stream_errors: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int) -> None:
        self.kinds[kind] += 1
        self.statuses[status] += 1


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def check_error(report: SoakReport, response: httpx.Response) -> None:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or set(body) != {"error", "error_type"}:
        report.bad_errors.append(f"{response.status_code}: {response.text[:200]}")


async def one_request(client: httpx.AsyncClient, rng: random.Random, report: SoakReport) -> None:
    kind = rng.choice(
        ["generate", "sampled", "completion", "chat", "stream", "chat_stream", "cancel_stream", "abandon"]
        + ["invalid"] * 2
        + ["too_long"]
    )
    text = prompt(rng, rng.randint(1, 12))
    tokens = rng.randint(1, 40)
    if kind in {"generate", "sampled", "abandon"}:
        parameters = {"max_new_tokens": tokens, "stop": [rng.choice(WORDS)] if rng.random() < 0.3 else []}
        if kind == "sampled":
            parameters.update(do_sample=True, temperature=0.9, top_p=0.9, seed=rng.randint(0, 2**32))
        timeout = httpx.Timeout(60, read=0.02) if kind == "abandon" else 60
        try:
            response = await client.post("/generate", json={"inputs": text, "parameters": parameters}, timeout=timeout)
        except httpx.ReadTimeout:  # the client gave up; the server must drop the work
            report.record(kind, 0)
            return
    elif kind == "completion":
        body = {"prompt": [text, prompt(rng, 3)], "max_tokens": tokens, "temperature": 0}
        response = await client.post("/v1/completions", json=body)
    elif kind == "chat":
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "seed": 3}
        response = await client.post("/v1/chat/completions", json=body)
    elif kind in {"stream", "chat_stream", "cancel_stream"}:
        if kind == "chat_stream":
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "stream": True}
            body["max_tokens"] = tokens
        else:
            path, body = "/generate_stream", {"inputs": text, "parameters": {"max_new_tokens": 40 + tokens}}
        keep = rng.randint(1, 5) if kind == "cancel_stream" else None
        async with client.stream("POST", path, json=body) as response:
            if response.status_code == 200:
                events = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    events += 1
                    data = line.removeprefix("data:").strip()
                    if data != "[DONE]" and "error" in json.loads(data):
                        report.stream_errors.append(data)
                    if keep is not None and events == keep:
                        break  # closing the stream early is the cancellation
            else:
                await response.aread()
                check_error(report, response)
        report.record(kind, response.status_code)
        await back_off(response)
        return
    elif kind == "invalid":
        bad = rng.choice(
            [
                {"content": b"{not json"},
                {"json": {"inputs": text, "parameters": {"max_new_tokens": 0}}},
                {"json": {"inputs": "", "parameters": {}}},
                {"json": {"inputs": text, "unknown": 1}},
                {"json": {"inputs": text, "parameters": {"temperature": "hot"}}},
            ]
        )
        response = await client.post("/generate", headers={"content-type": "application/json"}, **bad)
    else:  # too_long: over QS_MAX_INPUT_TOKENS, or a token budget over QS_MAX_TOTAL_TOKENS
        if rng.random() < 0.5:
            body = {"inputs": prompt(rng, 200), "parameters": {"max_new_tokens": 4}}
        else:
            body = {"inputs": text, "parameters": {"max_new_tokens": 500}}
        response = await client.post("/generate", json=body)
    if response.status_code >= 400:
        check_error(report, response)
    report.record(kind, response.status_code)
    await back_off(response)


async def back_off(response: httpx.Response) -> None:
    """Wait as long as a 429 says, as a polite client does (else a refused client retries in a tight loop)."""
    if response.status_code == 429:
        await asyncio.sleep(float(response.headers["retry-after"]))


async def run_requests(base_url: str, count: int, rng: random.Random, report: SoakReport) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def guarded() -> None:
            async with gate:
                await one_request(client, rng, report)

        await asyncio.gather(*(guarded() for _ in range(count)))


async def scheduler_state(base_url: str) -> dict:
    """The engine's state once idle (a cancelled sequence leaves within a step; allow a few)."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        for _ in range(100):
            state = (await client.get("/info")).json()["scheduler"]
            if state["running"] == state["waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        return state


def test_soak_thousand_mixed_requests(tiny_model_dir: Path, tmp_path: Path):
    env = {"QS_MODEL": str(tiny_model_dir), "QS_DEVICE": "cpu", "QS_CACHE_DIR": str(tmp_path), **LIMITS}
    rng = random.Random(20240611)
    report = SoakReport()
    with serve_process(env, tmp_path / "server.log") as (base_url, process):
        server = psutil.Process(process.pid)
        asyncio.run(run_requests(base_url, WARM, rng, report))
        asyncio.run(scheduler_state(base_url))
        rss_warm = server.memory_info().rss
        asyncio.run(run_requests(base_url, TOTAL - WARM, rng, report))
        state = asyncio.run(scheduler_state(base_url))
        rss_end = server.memory_info().rss
        metrics = httpx.get(f"{base_url}/metrics").text
    growth = rss_end / rss_warm - 1
    print(
        f"\nsoak: {sum(report.kinds.values())} requests; kinds {dict(report.kinds)}; statuses {dict(report.statuses)}"
        f"\nRSS after {WARM}: {rss_warm / 2**20:.1f} MiB; after {TOTAL}: {rss_end / 2**20:.1f} MiB ({growth:+.2%})"
        f"\nscheduler at the end: {state}"
    )
    assert sum(report.kinds.values()) == TOTAL
    assert not [s for s in report.statuses if s >= 500], report.statuses
    assert report.statuses[429] > 0 and report.statuses[422] > 0 and report.statuses[200] > 0
    assert report.kinds["cancel_stream"] > 0 and report.kinds["abandon"] > 0
    assert not report.bad_errors, report.bad_errors[:5]
    assert not report.stream_errors, report.stream_errors[:5]
    assert state["running"] == 0 and state["waiting"] == 0
    gauges = [
        line for line in metrics.splitlines() if line.startswith(("qs_requests_running{", "qs_requests_waiting{"))
    ]
    assert gauges and all(line.endswith(" 0.0") for line in gauges), gauges
    assert abs(growth) <= 0.05, f"resident memory changed {growth:+.2%} between request {WARM} and {TOTAL}"
