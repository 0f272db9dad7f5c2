"""Compare precision modes on this machine: `python -m tools.bench` (console script `quantserve-bench`).

Each mode runs in its own worker process (`tools.bench.worker`: load, memory, prefill,
decode, quality) and then as a real `quantserve` process under concurrent streams
(`tools.bench.serving`); `tools.bench.report` writes report.md, results.json and charts.
Every row is a `BenchRow`: a precision mode in quantserve, or, with `--llama-cpp DIR`, a row of
the peer engine (`results.PEER_ENGINE`: llama.cpp's tools on one GGUF file type, in none of our
modes; `tools.bench.llamacpp`), which `tools.bench.compare` pairs with our modes as ratios.
"""
