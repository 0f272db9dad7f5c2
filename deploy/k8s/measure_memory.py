"""Measure each mode's resident memory under a worst-case burst, for the Kubernetes resource sizes.

Starts the real service per mode (one at a time), sends QS_MAX_CONCURRENT_REQUESTS
requests at once with prompts near QS_MAX_INPUT_TOKENS, then reads the service's
own `qs_process_resident_memory_peak_bytes`. `generate.py` sizes requests and
limits from the JSON written here.

    python deploy/k8s/measure_memory.py --modes fp32 int8 int4 nf4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pydoc_data.topics import topics

import httpx
from generate import MODES  # the modes this directory's generator deploys (a script: its directory is on sys.path)
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from quant.checkpoints import DEFAULT_CACHE_DIR, DEFAULT_MODEL, resolve_checkpoint
from tools.bench.serving import ServerSpec, running_server

OUTPUT = Path(__file__).parent / "memory.json"
DEFAULTS = Settings()


def long_prompt(cache_dir: str, tokens: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(DEFAULT_MODEL, Path(cache_dir))[0])
    ids = tokenizer(" ".join(topics.values()))["input_ids"][:tokens]
    return tokenizer.decode(ids)


def resident_bytes(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("qs_process_resident_memory_bytes", "qs_process_resident_memory_peak_bytes")
    }


def measure(mode: str, prompt: str, args: argparse.Namespace, logs: Path) -> dict[str, int]:
    spec = ServerSpec(mode, DEFAULT_MODEL, args.cache_dir, "cpu", args.concurrency)
    with running_server(spec, logs / f"{mode}.log") as url:
        ready = resident_bytes(url)["qs_process_resident_memory_bytes"]
        body = {"inputs": prompt, "parameters": {"max_new_tokens": args.new_tokens, "details": True}}
        with ThreadPoolExecutor(args.concurrency) as pool:
            responses = list(
                pool.map(lambda _: httpx.post(f"{url}/generate", json=body, timeout=1800), range(args.concurrency))
            )
        for response in responses:
            response.raise_for_status()
        prompt_tokens = responses[0].json()["details"]["prompt_tokens"]
        peak = resident_bytes(url)["qs_process_resident_memory_peak_bytes"]
    print(f"{mode}: ready {ready / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB ({prompt_tokens} prompt tokens)")
    return {"ready_rss_bytes": int(ready), "peak_rss_bytes": int(peak), "prompt_tokens": prompt_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="default: the modes generate.py deploys")
    parser.add_argument("--concurrency", type=int, default=DEFAULTS.max_concurrent_requests)
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULTS.max_input_tokens - 24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--cache-dir", default=os.environ.get("QS_CACHE_DIR", str(DEFAULT_CACHE_DIR)))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    prompt = long_prompt(args.cache_dir, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as logs:
        modes = {mode: measure(mode, prompt, args, Path(logs)) for mode in args.modes}
    load = {"concurrency": args.concurrency, "new_tokens": args.new_tokens}
    command = "python deploy/k8s/measure_memory.py " + " ".join(sys.argv[1:])
    args.output.write_text(json.dumps({"command": command.strip(), "load": load, "modes": modes}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
