"""Hand counts of the tiny Llama's weights (tests/conftest.py: `build_tiny_llama`), from its shapes alone.

They let a test check a byte count the code measures against a figure the code does not compute.
"""

from __future__ import annotations

VOCAB = 512  # the trained tokenizer's size (`vocab_size=512`, special tokens included)
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
KV_DIM = 2 * (HIDDEN // 4)  # 2 key/value heads of head_dim 64 / 4 heads = 16
FP32 = 4

# (out_features, in_features) of the 7 linears of one decoder layer
LINEARS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV_DIM, HIDDEN),
    "v_proj": (KV_DIM, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN),
    "up_proj": (INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}
EMBEDDING = VOCAB * HIDDEN  # tied with lm_head: one tensor
NORMS = LAYERS * 2 * HIDDEN + HIDDEN  # input/post-attention RMSNorm per layer, and the final one
ROTARY_BUFFERS = 2 * (HIDDEN // 4 // 2)  # inv_freq and original_inv_freq, head_dim / 2 each


def float_linear_bytes(name: str) -> int:
    out_features, in_features = LINEARS[name]
    return out_features * in_features * FP32  # no biases in Llama


def int8_linear_bytes(name: str) -> int:
    """int8 [out, in] weights plus one float32 scale per output channel."""
    out_features, in_features = LINEARS[name]
    return out_features * in_features + out_features * FP32


def always_float_bytes() -> int:
    """What no mode quantizes by default: embedding (= tied head), norms, rotary buffers."""
    return (EMBEDDING + NORMS + ROTARY_BUFFERS) * FP32


def fp32_model_bytes() -> int:
    return always_float_bytes() + LAYERS * sum(float_linear_bytes(n) for n in LINEARS)


def int8_g32_head_bytes() -> int:
    """The tied head as int8 with one float16 scale per 32 inputs; the embedding reads the same table."""
    return VOCAB * HIDDEN + VOCAB * (HIDDEN // 32) * 2


def int8_model_bytes() -> int:
    """Every linear of every layer in int8; the tied head int8 g32 (QS_QUANTIZE_LM_HEAD=auto), norms float."""
    float_bytes = always_float_bytes() - EMBEDDING * FP32
    return float_bytes + int8_g32_head_bytes() + LAYERS * sum(int8_linear_bytes(n) for n in LINEARS)
