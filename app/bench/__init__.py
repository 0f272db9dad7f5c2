"""Compare precision modes on this machine: `python -m app.bench` (console script `quantserve-bench`).

Each mode runs in its own worker process (`app.bench.worker`: load, memory, prefill,
decode, quality) and then as a real `quantserve` process under concurrent streams
(`app.bench.serving`); `app.bench.report` writes report.md, results.json and charts.
The benchmark lives in `app` because it measures the service; `quant` never imports it.
"""
