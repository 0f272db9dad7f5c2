"""Tools around the service: they measure it, never serve.

`tools.bench` (`quantserve-bench`) compares precision modes; `tools.quality`
(`quantserve-eval`) scores perplexity, agreement and KL divergence against the reference mode;
`tools.qat` (`quantserve-qat`) fine-tunes a model for a mode (quantization-aware training);
`tools.loadgen` drives a running server with concurrent streams;
`tools.decode_profile` breaks a decode step down; `tools.kernel_bench` times the
quantized linear kernels. Tools import `app` and `quant`; neither imports `tools`.
"""
