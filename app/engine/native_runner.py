"""`NativeRunner`: LlamaRunner's prefill, and each decode step as ONE call into C++.

A decode step of a small model in eager torch is hundreds of small ops (norms, RoPE,
attention, residuals) and ~200 linear calls, each with Python and dispatch cost and, for the
linears, an OpenMP fork/join; on the default model that is more time than reading the
weights. `torch.classes.quantserve.NativeDecoder` (quant/kernels/csrc/decoder.cpp) holds the
model's weights, repacked once into 16-row tiles, and this runner's KV cache tensors, and runs
the whole step (embedding to logits) on one persistent thread team with spin barriers.

Prefill stays on LlamaRunner's torch path and writes the same cache tensors, so the two
paths share every sequence's state. The decoder follows the kernels' ISA choice
(QS_KERNEL_ISA / `quantserve.set_isa`) at every step.

What it takes (`native_unsupported_reason` says what it does not): a Llama-family model that
LlamaRunner runs, in float32, bfloat16 or float16, on CPU, with head_dim a multiple of 16 and
hidden/intermediate sizes multiples of 32; every linear (projections and head) either an
`nn.Linear` in one of those dtypes or one of our `Int8WeightOnlyLinear`, `Int8DynamicLinear`,
`Int8StaticLinear` (linears that share an input share its activation scale), `Int4WeightOnlyLinear` (group size a multiple of 32),
`Int8G32Linear`, `Fp8WeightOnlyLinear` (e4m3 or e5m2) or `NF4Linear` (block size a multiple
of 32); the embedding an `nn.Embedding` in one of those dtypes or an int8 g32 table.

A 16-bit model's weights are widened exactly to float32 inside the kernels, and the step
computes in float32 (its K/V cache too): the float32 matmul of the same weight values, where
torch's 16-bit path rounds every activation to 16 bits.

Memory: quantized and 16-bit weights are repacked, so the decoder holds a second copy of them
(the layers' own buffers stay for prefill); float32 weights are read in place.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from app.engine.llama_runner import _MLP, _PROJECTIONS, LlamaRunner, unsupported_reason
from quant.kernels import native_ops
from quant.kernels.choose import nf4_code_table
from quant.layers.fp8 import Fp8WeightOnlyLinear
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layers.int8 import Int8DynamicLinear, Int8WeightOnlyLinear
from quant.layers.int8_grouped import Int8G32Linear
from quant.layers.int8_static import Int8StaticLinear
from quant.layers.nf4 import NF4Linear

log = logging.getLogger(__name__)

# LlamaRunner's submodule names -> the decoder's roles
_ROLES = dict(zip((*_PROJECTIONS, *_MLP), ("q", "k", "v", "o", "gate", "up", "down"), strict=True))
_BLOCK = 32

LinearSpec = tuple[str, list[torch.Tensor], int, torch.Tensor | None]


# the float dtypes the decoder reads in place (float32) or repacks (16-bit), by its kind names
_FLOAT_KINDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _float_kind(t: torch.Tensor) -> str | None:
    """The decoder's kind for a float tensor on CPU, or None."""
    return _FLOAT_KINDS.get(t.dtype) if t.device.type == "cpu" else None


def linear_spec(module: nn.Module) -> LinearSpec | str:
    """(kind, tensors, group size, bias) as the decoder takes a linear, or why it cannot."""
    bias = getattr(module, "bias", None)
    if bias is not None and _float_kind(bias) is None:
        return f"{type(module).__name__} has a {bias.dtype} bias"
    # exact types: a subclass may compute differently (Int8DynamicLinear has its own kind)
    if type(module) is nn.Linear:
        kind = _float_kind(module.weight)
        if kind is None:
            return f"nn.Linear weight is {module.weight.dtype} on {module.weight.device} (needs a float dtype on CPU)"
        spec: LinearSpec = (kind, [module.weight.detach()], 0, bias)
    elif type(module) is Int8WeightOnlyLinear:
        spec = ("int8", [module.weight_int8, module.scale], 0, bias)
    elif type(module) is Int8DynamicLinear:  # W8A8: the same tiles, one activation scale per row
        spec = ("int8_row", [module.weight_int8, module.scale], 0, bias)
    elif type(module) is Int8StaticLinear:  # W8A8 static: the same tiles, the calibrated activation scale
        spec = ("int8_static", [module.weight_int8, module.scale, module.act_scale], 0, bias)
    elif type(module) is Int4WeightOnlyLinear:
        if module.scales.dtype != torch.float16 or module.mins.dtype != torch.float16:
            return "int4 scales/mins are not float16"
        if module.group_size % _BLOCK:
            return f"int4 group size {module.group_size} is not a multiple of {_BLOCK}"
        spec = ("int4", [module.packed, module.scales, module.mins], module.group_size, bias)
    elif type(module) is Int8G32Linear:
        spec = ("int8_g32", [module.weight_int8, module.scales], 0, bias)
    elif type(module) is Fp8WeightOnlyLinear:
        spec = (f"fp8_{module.fmt}", [module.weight_fp8, module.scale], 0, bias)
    elif type(module) is NF4Linear:
        if module.absmax.dtype != torch.float16:
            return "nf4 absmax is not float16"
        if module.block_size % _BLOCK:
            return f"nf4 block size {module.block_size} is not a multiple of {_BLOCK}"
        spec = ("nf4", [module.packed, module.absmax, nf4_code_table()], module.block_size, bias)
    else:
        return f"layer type {type(module).__name__} has no native decode kernel"
    in_features = spec[1][0].shape[1] * (2 if spec[0] in ("int4", "nf4") else 1)
    if in_features % _BLOCK:
        return f"in_features {in_features} is not a multiple of {_BLOCK}"
    return spec


def embedding_spec(module: nn.Module) -> tuple[str, list[torch.Tensor]] | str:
    """(kind, tensors) of the token embedding, or why the decoder cannot read it."""
    codes, scales = getattr(module, "weight_int8", None), getattr(module, "scales", None)
    g32 = isinstance(codes, torch.Tensor) and isinstance(scales, torch.Tensor) and scales.dtype == torch.float16
    if g32 and codes.dim() == 2 and scales.shape == (codes.shape[0], codes.shape[1] // _BLOCK):
        return "int8_g32", [codes, scales]
    if isinstance(module, nn.Embedding):
        kind = _float_kind(module.weight)
        if kind is None:
            return f"embedding is {module.weight.dtype} on {module.weight.device} (needs a float dtype on CPU)"
        return kind, [module.weight.detach()]
    return f"embedding type {type(module).__name__} is not supported"


def native_unsupported_reason(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why `NativeRunner` cannot run `model`; None when it can."""
    reason = unsupported_reason(model, max_len or 0)
    if reason is not None:
        return reason
    if native_ops() is None or not hasattr(torch.classes.quantserve, "NativeDecoder"):
        import quant.kernels as kernels

        return f"the quantserve kernels are not available ({kernels._NATIVE.reason or 'not built'})"
    config, base = model.config, model.model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    for name, size in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size)):
        if size % _BLOCK:
            return f"{name} {size} is not a multiple of {_BLOCK}"
    norms = [base.norm.weight] + [w for layer in base.layers for w in _norm_weights(layer)]
    if not all(_float_kind(w) for w in norms):
        return "the model is not float32, bfloat16 or float16 on CPU (norm weights)"
    embedding = embedding_spec(base.embed_tokens)
    if isinstance(embedding, str):
        return embedding
    for layer in base.layers:
        for name in _ROLES:
            spec = linear_spec(layer.get_submodule(name))
            if isinstance(spec, str):
                return f"{name}: {spec}"
    head = linear_spec(model.lm_head)
    return f"lm_head: {head}" if isinstance(head, str) else None


def _norm_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.input_layernorm.weight, layer.post_attention_layernorm.weight


class NativeRunner(LlamaRunner):
    """`ModelRunner` whose decode step is one call of the native decoder; prefill as LlamaRunner."""

    def __init__(
        self, model: nn.Module, device: torch.device, max_slots: int, max_len: int, threads: int | None = None
    ) -> None:
        reason = native_unsupported_reason(model, max_len)
        if reason is not None:
            raise ValueError(f"NativeRunner cannot run this model: {reason}")
        super().__init__(model, device, max_slots, max_len, cache_dtype=torch.float32)
        config, base = model.config, model.model
        # the step's own RoPE tables: float32 whatever the model's dtype (prefill keeps the model's)
        prefill_cos, prefill_sin, _ = self._prefill_rope  # float32 already for fp32 (or a float32 prefill)
        self.rope_float32 = (
            (prefill_cos, prefill_sin)
            if prefill_cos.dtype == torch.float32
            else self._rope_tables(base.rotary_emb, torch.float32)
        )
        cos, sin = self.rope_float32
        self.threads = threads or torch.get_num_threads()
        dims = [
            self.hidden_size,
            self.heads,
            self.kv_heads,
            self.head_dim,
            config.intermediate_size,
            config.vocab_size,
            len(base.layers),
        ]
        decoder = torch.classes.quantserve.NativeDecoder(
            dims,
            float(self.eps),
            self.k_cache,
            self.v_cache,
            cos.contiguous(),
            sin.contiguous(),
            self.threads,
        )
        embedding = embedding_spec(base.embed_tokens)
        assert not isinstance(embedding, str)  # checked by native_unsupported_reason
        decoder.set_embedding(*embedding)
        with torch.inference_mode():
            for i, layer in enumerate(base.layers):
                decoder.set_norms(i, *(w.detach() for w in _norm_weights(layer)))
                for name, role in _ROLES.items():
                    decoder.set_linear(i, role, *self._spec(layer.get_submodule(name)))
            decoder.set_linear(-1, "head", *self._spec(model.lm_head))
            decoder.set_final_norm(base.norm.weight.detach())
            decoder.finalize()
        self._decoder = decoder
        log.info("native decode step: %s", decoder.describe())

    @staticmethod
    def _spec(module: nn.Module) -> LinearSpec:
        spec = linear_spec(module)
        assert not isinstance(spec, str)  # checked by native_unsupported_reason
        return spec

    @property
    def packed_bytes(self) -> int:
        """Memory of the decoder's repacked weights (a second copy of the quantized layers)."""
        return int(self._decoder.packed_bytes())

    def record_inputs(self, on: bool = True) -> None:
        """Record the inputs of every matmul of the following steps (for checks against the torch path)."""
        self._decoder.set_capture(on)

    def recorded_inputs(self) -> list[torch.Tensor]:
        """Per layer: h, norm(h), attention, h after attention, its norm, SiLU(gate)·up; then h,
        norm(h) before the head. [batch, features] each, one group per recorded step."""
        return list(self._decoder.captured())

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads (whatever the batch size)."""
        return int(self._decoder.weight_bytes_per_step())

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        rows, positions = self._batch_rows(slots, token_ids)
        if max(positions) + 1 > self.max_len:
            raise ValueError(f"a sequence would exceed max_len {self.max_len}")
        # (no cache zeroing: the native step reads only each sequence's own positions)
        logits = self._decoder.decode(rows, positions, [int(t) for t in token_ids])
        for slot in slots:
            self._lengths[slot] += 1
        return logits
