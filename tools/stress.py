"""Stress: many concurrent clients of every kind against a running server, bounded in time, loopback only.

Each client loops until the deadline, picking at random: a normal `/generate`, a streamed
`/generate_stream` or chat stream, a huge body (30 MB, with and without Content-Length), an
invalid request (bad JSON, bad parameters, a stop string or a prompt over the limits), a
cancelled one (a stream closed after a few events, or a `/generate` abandoned before its
answer) and a slow reader (a small receive buffer read a little at a time). Meanwhile a
separate process probes `/health` every 50 ms. A client that gets 429 waits as its
`Retry-After` says.

Checks (`StressReport.problems`): no 5xx and no error event in a stream; only 413, 422 and
429 for what is refused; `/health` p99 under 100 ms; resident memory at the end within 5% of
what it was after the warm-up; nothing running or queued at the end (the /metrics gauges).

    python -m tools.stress --url http://127.0.0.1:8000 --clients 64 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

import httpx

from tools.loadgen import percentile

HUGE_BYTES = 30 * 2**20
LONG_PROMPT_CHARS = 1_500_000  # under the default 2 MB body limit, far over any prompt's token limit
HEALTH_PERIOD = 0.05
HEALTH_P99_LIMIT = 0.1
RSS_GROWTH_LIMIT = 0.05
REFUSALS = {413, 422, 429}
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
]
# kind -> weight; the huge and slow kinds are rarer, as they hold a client for longer
KINDS = {
    "generate": 6,
    "stream": 5,
    "chat_stream": 3,
    "huge": 1,
    "long_prompt": 1,
    "invalid": 3,
    "cancel_stream": 3,
    "abandon": 2,
    "slow_reader": 2,
}


@dataclass
class StressReport:
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # status -> count (0: the client gave up itself)
    kinds: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # a status its kind should never get, or an error shape
    stream_errors: list[str] = field(default_factory=list)
    transport_errors: Counter = field(default_factory=Counter)
    health_latencies: list[float] = field(default_factory=list)
    health_failures: int = 0
    rss_warm: float | None = None
    rss_end: float | None = None
    final_gauges: dict[str, float] = field(default_factory=dict)

    @property
    def health_p99(self) -> float:
        return percentile(self.health_latencies, 99)

    @property
    def rss_growth(self) -> float | None:
        return None if not (self.rss_warm and self.rss_end) else self.rss_end / self.rss_warm - 1

    def problems(self, timing: bool = True) -> list[str]:
        """What breaks the checks; `timing=False` leaves out the /health p99 and the memory growth
        (a short run on a shared machine proves nothing about those)."""
        found = []
        if server_errors := {s: n for s, n in self.statuses.items() if s >= 500}:
            found.append(f"5xx answers: {server_errors}")
        if refused := {s: n for s, n in self.statuses.items() if s >= 400 and s not in REFUSALS and s < 500}:
            found.append(f"refusals other than 413/422/429: {refused}")
        found += [f"unexpected: {u}" for u in self.unexpected[:5]]
        found += [f"error event in a stream: {e}" for e in self.stream_errors[:5]]
        if self.transport_errors:
            found.append(f"transport errors: {dict(self.transport_errors)}")
        if not self.health_latencies or self.health_failures:
            found.append(f"/health failed {self.health_failures} times of {len(self.health_latencies)}")
        elif timing and self.health_p99 >= HEALTH_P99_LIMIT:
            found.append(f"/health p99 {self.health_p99 * 1000:.1f} ms (limit {HEALTH_P99_LIMIT * 1000:.0f} ms)")
        growth = self.rss_growth
        if timing and (growth is None or abs(growth) > RSS_GROWTH_LIMIT):
            found.append(f"resident memory changed {growth} between the warm-up and the end")
        if any(value != 0 for value in self.final_gauges.values()) or len(self.final_gauges) != 2:
            found.append(f"left running or queued at the end: {self.final_gauges}")
        return found

    def summary(self) -> str:
        growth = self.rss_growth
        return "\n".join(
            [
                f"{self.clients} clients for {self.seconds:.0f} s: {sum(self.kinds.values())} requests",
                f"kinds: {dict(sorted(self.kinds.items()))}",
                f"statuses: {dict(sorted(self.statuses.items()))} (0: abandoned by the client)",
                f"/health: {len(self.health_latencies)} probes, p50 {percentile(self.health_latencies, 50) * 1000:.1f} ms, "
                f"p99 {self.health_p99 * 1000:.1f} ms, max {max(self.health_latencies, default=0) * 1000:.1f} ms, "
                f"{self.health_failures} failed",
                f"RSS after warm-up {(self.rss_warm or 0) / 2**20:.1f} MiB, at the end {(self.rss_end or 0) / 2**20:.1f} MiB"
                + (f" ({growth:+.2%})" if growth is not None else ""),
                f"gauges at the end: {self.final_gauges}",
            ]
        )


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def record(report: StressReport, kind: str, response: httpx.Response, expected: set[int]) -> None:
    report.kinds[kind] += 1
    report.statuses[response.status_code] += 1
    if response.status_code not in expected | {429}:
        report.unexpected.append(f"{kind}: {response.status_code} {response.text[:200]}")
    elif response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or set(body) != {"error", "error_type"}:
            report.unexpected.append(f"{kind}: error body {response.text[:200]}")


async def read_stream(report: StressReport, response: httpx.Response, keep: int | None = None) -> None:
    events = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data != "[DONE]" and "error" in json.loads(data):
            report.stream_errors.append(data)
        events += 1
        if keep is not None and events >= keep:
            return  # leaving early closes the connection: the cancellation


async def chunks(body: bytes, size: int = 2**20) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


class Client:
    def __init__(self, url: str, rng: random.Random, report: StressReport, huge: bytes, long_prompt: bytes) -> None:
        self.url, self.rng, self.report = url, rng, report
        self.huge, self.long_prompt = huge, long_prompt

    async def one(self, http: httpx.AsyncClient, kind: str) -> httpx.Response | None:
        rng, report = self.rng, self.report
        text, tokens = prompt(rng, rng.randint(1, 16)), rng.randint(1, 48)
        json_headers = {"content-type": "application/json"}
        if kind == "generate":
            body = {"inputs": text, "parameters": {"max_new_tokens": tokens, "stop": [rng.choice(WORDS)]}}
            response = await http.post("/generate", json=body)
            record(report, kind, response, {200})
        elif kind in {"stream", "chat_stream", "cancel_stream"}:
            if kind == "chat_stream":
                path = "/v1/chat/completions"
                body = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "stream": True}
            else:
                path, body = "/generate_stream", {"inputs": text, "parameters": {"max_new_tokens": 16 + tokens}}
            async with http.stream("POST", path, json=body) as response:
                if response.status_code == 200:
                    await read_stream(report, response, rng.randint(1, 4) if kind == "cancel_stream" else None)
                else:
                    await response.aread()
            record(report, kind, response, {200})
        elif kind == "huge":  # 30 MB: declared, or chunked with no length
            content = self.huge if rng.random() < 0.5 else chunks(self.huge)
            response = await http.post("/generate", content=content, headers=json_headers)
            record(report, kind, response, {413})
        elif kind == "long_prompt":  # within the body limit, refused by its length in characters
            response = await http.post("/generate", content=self.long_prompt, headers=json_headers)
            record(report, kind, response, {422})
        elif kind == "invalid":
            bad = rng.choice(
                [
                    {"content": b"{not json", "headers": json_headers},
                    {"json": {"inputs": text, "parameters": {"max_new_tokens": 0}}},
                    {"json": {"inputs": text, "parameters": {"stop": ["s" * 300]}}},
                    {"json": {"inputs": text, "unknown": 1}},
                    {"json": {"inputs": text, "parameters": {"max_new_tokens": 100_000}}},
                ]
            )
            response = await http.post("/generate", **bad)
            record(report, kind, response, {422})
        elif kind == "abandon":
            body = {"inputs": text, "parameters": {"max_new_tokens": 48}}
            try:
                response = await http.post("/generate", json=body, timeout=httpx.Timeout(30, read=0.05))
            except httpx.ReadTimeout:  # the client gave up: the server drops the work
                report.kinds[kind] += 1
                report.statuses[0] += 1
                return None
            record(report, kind, response, {200})
        else:
            return await self.slow_reader(text)
        return response

    async def slow_reader(self, text: str) -> None:
        """A streamed request read 512 bytes at a time, 50 ms apart, through a 4 KiB receive buffer."""
        parts = urlsplit(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        payload = json.dumps({"inputs": text, "parameters": {"max_new_tokens": 64}}).encode()
        writer.write(
            b"POST /generate_stream HTTP/1.1\r\nHost: stress\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        received = b""
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline and (data := await reader.read(512)):
                received += data
                await asyncio.sleep(0.05)
        finally:
            writer.close()
        status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else 0
        self.report.kinds["slow_reader"] += 1
        self.report.statuses[status] += 1
        if status not in (200, 429):
            self.report.unexpected.append(f"slow_reader: {received[:200]!r}")
        for line in received.split(b"\n"):
            if line.startswith(b"data:") and b'"error"' in line:
                self.report.stream_errors.append(line.decode(errors="replace"))

    async def run(self, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as http:
            while time.monotonic() < deadline:
                kind = self.rng.choices(kinds, weights)[0]
                try:
                    response = await self.one(http, kind)
                except httpx.TransportError as error:
                    self.report.kinds[kind] += 1
                    self.report.transport_errors[f"{kind}: {type(error).__name__}"] += 1
                    continue
                if response is not None and response.status_code == 429:
                    await asyncio.sleep(float(response.headers.get("retry-after", 1)))


def probe_health(url: str, seconds: float, results: Connection) -> None:
    """In its own process, so the clients' event loop does not delay it: GET /health on a new
    connection every HEALTH_PERIOD (as a Kubernetes probe does); send back the latencies and failures.
    `http.client`, not httpx: a new httpx client builds an SSL context, tens of milliseconds."""
    parts = urlsplit(url)
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            connection.request("GET", "/health")
            ok = connection.getresponse().status == 200
        except OSError:
            ok = False
        finally:
            connection.close()
        latencies.append(time.perf_counter() - started)
        failures += not ok
        time.sleep(max(0.0, HEALTH_PERIOD - (time.perf_counter() - started)))
    results.send((latencies, failures))
    results.close()


def scrape(url: str) -> dict[str, float]:
    """The unlabelled-by-route gauges this tool reads from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0]
        if name in {"qs_requests_running", "qs_requests_waiting", "qs_process_resident_memory_bytes"}:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


async def settle(url: str, timeout: float = 30) -> dict[str, float]:
    """The running and waiting gauges once the server is idle (cancelled sequences leave within a step)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = {k: v for k, v in scrape(url).items() if k != "qs_process_resident_memory_bytes"}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.1)


async def run_stress(
    url: str, clients: int = 64, seconds: float = 60, warm: float = 10, seed: int = 16
) -> StressReport:
    """Drive `clients` clients for `seconds` (RSS read after `warm` seconds and at the end)."""
    if urlsplit(url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"{url}: the stress tool only drives a server on loopback")
    report = StressReport(clients, seconds)
    huge = b'{"inputs": "' + b"x" * HUGE_BYTES + b'"}'
    long_prompt = json.dumps({"inputs": "word " * (LONG_PROMPT_CHARS // 5)}).encode()
    receiving, sending = multiprocessing.get_context("spawn").Pipe(duplex=False)
    prober = multiprocessing.get_context("spawn").Process(target=probe_health, args=(url, seconds, sending))
    prober.start()
    started = time.monotonic()
    deadline = started + seconds
    rng = random.Random(seed)
    workers = [
        asyncio.create_task(Client(url, random.Random(rng.random()), report, huge, long_prompt).run(deadline))
        for _ in range(clients)
    ]
    await asyncio.sleep(warm)
    report.rss_warm = (await asyncio.to_thread(scrape, url)).get("qs_process_resident_memory_bytes")
    await asyncio.gather(*workers)
    report.final_gauges = await settle(url)
    report.rss_end = (await asyncio.to_thread(scrape, url)).get("qs_process_resident_memory_bytes")
    report.health_latencies, report.health_failures = await asyncio.to_thread(receiving.recv)
    await asyncio.to_thread(prober.join, 30)
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a server on loopback")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60, help="seconds (the run is bounded by it)")
    parser.add_argument("--warm", type=float, default=10, help="seconds before the resident memory is first read")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    report = asyncio.run(run_stress(args.url, args.clients, args.duration, args.warm, args.seed))
    print(report.summary())
    problems = report.problems()
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
