"""Compare precision modes on this machine: `python -m tools.bench` (console script `quantserve-bench`).

Each mode runs in its own worker process (`tools.bench.worker`: load, memory, prefill,
decode, quality) and then as a real `quantserve` process under concurrent streams
(`tools.bench.serving`); `tools.bench.report` writes report.md, results.json and charts.
Every row is a `BenchRow`: a precision mode in quantserve, or the optional peer engine
(llama.cpp on the same GGUF, `results.PEER_ENGINE`), which runs none of our modes.
"""
