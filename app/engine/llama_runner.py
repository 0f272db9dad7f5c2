"""A lean forward for the Llama family (Llama, Mistral, Qwen2) with a static, batched KV cache.

In transformers' forward, a decode step of a small model spends a large share
of its time outside the linear layers: hundreds of small ops, masks and cache
bookkeeping, each with Python and dispatch cost. This runner
keeps the model's own modules and weights (embedding, the seven projections of
each layer, lm_head) and calls them as black boxes, so every precision mode runs
unchanged; it owns the rest with as few ops per layer as it can:

- one KV cache tensor per K and V, [layers, slots, kv_heads, max_len, head_dim],
  preallocated in the compute dtype;
- RoPE as one batched matmul per tensor: each token's rotation is a
  [head_dim, head_dim] matrix built once per step from precomputed cos/sin
  tables and shared by all layers;
- RMSNorm with `F.rms_norm`, attention with `F.scaled_dot_product_attention`
  (GQA without repeating K/V: a decode query's heads are grouped under their KV
  head), a mask built once per step from the slot lengths.

Live sequences always occupy cache rows 0..n-1 (releasing a row moves the last
one into it), so a decode step over all live sequences reads the cache through
views instead of gathering it.

A small decode step runs its own ops on one intra-op thread and only the
projections on all of them: an OpenMP parallel region costs more than a few KB
of work, and when another process holds the other core it waits for a whole
scheduler slice (measured: a [9, 64] x [64, 64] bmm went from ~3 us to ~20 ms
under load).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from quant.kernels.cpu import has_fast_gemm

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# RoPE types whose frequencies do not change with the sequence length
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Decode steps whose attention reads at most this many cached positions (batch x
# length) keep their small ops on one thread.
_SERIAL_POSITIONS = 4096
# Unwritten cache memory may hold NaNs, which would leak through the masked
# softmax; rows are zeroed ahead of their length in chunks of this many positions.
_ZERO_CHUNK = 256


def unsupported_reason(model: nn.Module, max_len: int) -> str | None:
    """Why `LlamaRunner` cannot run `model` exactly like transformers does; None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} changes with the sequence length"
    windows = [getattr(config, "sliding_window", None)]
    if getattr(config, "layer_types", None) is not None:
        windows = [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    if any(w is not None and w < max_len for w in windows):
        return f"sliding-window attention (window {config.sliding_window}) is shorter than max_len {max_len}"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or getattr(model, "lm_head", None) is None:
        return "no model.layers / lm_head"
    for layer in layers:
        for name in (*_PROJECTIONS, *_MLP):
            try:
                layer.get_submodule(name)
            except AttributeError:
                return f"layer has no {name}"
    return None


class DecoderLayer(NamedTuple):
    """What the runner calls in one decoder layer: the model's own projections and norm weights."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    attn_norm: torch.Tensor  # input_layernorm.weight
    mlp_norm: torch.Tensor  # post_attention_layernorm.weight

    @classmethod
    def of(cls, layer: nn.Module) -> DecoderLayer:
        return cls(
            **{name.rsplit(".", 1)[1]: layer.get_submodule(name) for name in (*_PROJECTIONS, *_MLP)},
            attn_norm=layer.input_layernorm.weight,
            mlp_norm=layer.post_attention_layernorm.weight,
        )


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _widened(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 16-bit nn.Linear in float32 (weights widened exactly), in x's dtype; other modules as they are."""
    if type(module) is not nn.Linear or module.weight.dtype == torch.float32:
        return module(x)
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x.float(), module.weight.float(), bias).to(x.dtype)


class _AllThreads:
    """Inside: the projections run on all intra-op threads; outside, the step's small ops run on one."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(1)


class LlamaRunner:
    """`ModelRunner` for the Llama family: one batched forward per decode step."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        max_slots: int,
        max_len: int,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        reason = unsupported_reason(model, max_len)
        if reason is not None:
            raise ValueError(f"LlamaRunner cannot run this model: {reason}")
        config = model.config
        base = model.model
        self.device = torch.device(device)
        self.max_slots = max_slots
        self.max_len = max_len
        self.embed_tokens = base.embed_tokens
        self.lm_head = model.lm_head
        self.final_norm = base.norm.weight
        self.eps = config.rms_norm_eps
        self.hidden_size = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = self.final_norm.dtype
        self.layers = [DecoderLayer.of(layer) for layer in base.layers]
        cache_shape = (len(self.layers), max_slots, self.kv_heads, max_len, self.head_dim)
        # the compute dtype unless asked otherwise (the native step keeps float32 K/V for a 16-bit model)
        self.k_cache = torch.empty(cache_shape, dtype=cache_dtype or self.dtype, device=self.device)
        self.v_cache = torch.empty(cache_shape, dtype=cache_dtype or self.dtype, device=self.device)
        self._zeroed = [0] * max_slots  # positions of each row known to hold finite values
        self._rows: dict[int, int] = {}  # slot -> cache row
        self._lengths: dict[int, int] = {}  # slot -> tokens in its cache
        self._cos, self._sin = self._rope_tables(base.rotary_emb)
        half = self.head_dim // 2
        # rotate_half(x) = x @ rotate: out[j] = -x[j + half] for j < half, x[j - half] otherwise
        rotate = torch.zeros(self.head_dim, self.head_dim, dtype=self.dtype, device=self.device)
        rotate[torch.arange(half) + half, torch.arange(half)] = -1
        rotate[torch.arange(half), torch.arange(half) + half] = 1
        self._rotate = rotate
        # A 16-bit model on a CPU without GEMM instructions for its dtype prefills in float32, its
        # projections on widened weights: torch's 16-bit GEMMs, bmm and attention are 5-10x slower
        # than float32 there (quant/kernels/cpu.py). Decode stays in the model's dtype.
        self.prefill_float32 = (
            self.dtype in (torch.bfloat16, torch.float16)
            and self.device.type == "cpu"
            and not has_fast_gemm(self.dtype)
        )
        self._prefill_rope = (self._cos, self._sin, self._rotate)
        if self.prefill_float32:
            self._prefill_rope = (*self._rope_tables(base.rotary_emb, torch.float32), rotate.float())
            log.info("prefill computes in float32: this CPU has no %s GEMM instructions", self.dtype)

    @torch.inference_mode()
    def _rope_tables(
        self, rotary_emb: nn.Module, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [max_len, head_dim] from the model's own rotary module (its rope type and scaling)."""
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.empty(0, dtype=dtype or self.dtype, device=self.device)
        cos, sin = rotary_emb(probe, position_ids=positions)
        return cos[0], sin[0]

    def _rotations(
        self, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Per-token RoPE matrices [tokens, head_dim, head_dim]: x @ R = x * cos + rotate_half(x) * sin.
        `rope`: (cos, sin, rotate) tables in another dtype (default: the model's)."""
        cos_table, sin_table, rotate = rope or (self._cos, self._sin, self._rotate)
        cos, sin = cos_table[positions], sin_table[positions]
        return torch.diag_embed(cos) + rotate * sin[:, None, :]

    def _ensure_zeroed(self, row: int, length: int) -> None:
        if self._zeroed[row] < length:
            end = min(self.max_len, length + _ZERO_CHUNK)
            self.k_cache[:, row, :, self._zeroed[row] : end].zero_()
            self.v_cache[:, row, :, self._zeroed[row] : end].zero_()
            self._zeroed[row] = end

    # --- ModelRunner --------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        n = len(token_ids)
        if not 0 < n <= self.max_len:
            raise ValueError(f"prompt of {n} tokens; the runner holds 1 to {self.max_len}")
        self.release(slot)
        if len(self._rows) >= self.max_slots:
            raise RuntimeError(f"all {self.max_slots} slots are in use")
        row = len(self._rows)
        h = self.embed_tokens(torch.tensor(token_ids, device=self.device))
        if self.prefill_float32:
            h = h.float()
        rotations = self._rotations(torch.arange(n, device=self.device), self._prefill_rope)
        project = _widened if self.prefill_float32 else _call
        for i, layer in enumerate(self.layers):
            h = self._layer(
                i, layer, h, rotations, lambda i, q, k, v: self._attend_prompt(i, row, q, k, v), nullcontext(), project
            )
        self._rows[slot] = row
        self._lengths[slot] = n
        self._zeroed[row] = max(self._zeroed[row], n)
        h = h.to(self.dtype)  # the head in the model's dtype (a float32 prefill comes back to it)
        return self._logits(h) if all_positions else self._logits(h[-1:])[0]

    def _batch_rows(self, slots: list[int], token_ids: list[int]) -> tuple[list[int], list[int]]:
        """The cache rows and next positions of a decode step's sequences (checked: distinct, one token each)."""
        if len(set(slots)) != len(slots) or len(token_ids) != len(slots):
            raise ValueError("decode takes distinct slots and one token per slot")
        return [self._rows[s] for s in slots], [self._lengths[s] for s in slots]

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        batch = len(slots)
        rows, positions = self._batch_rows(slots, token_ids)
        length = max(positions) + 1
        if length > self.max_len:
            raise ValueError(f"a sequence would exceed max_len {self.max_len}")
        # A step over every live sequence runs in row order and reads rows 0..batch-1 through views.
        all_live = batch == len(self._rows)
        order = sorted(range(batch), key=rows.__getitem__) if all_live else list(range(batch))
        for row in rows:
            self._ensure_zeroed(row, length)
        threads = torch.get_num_threads()
        serial = self.device.type == "cpu" and threads > 1 and batch * length <= _SERIAL_POSITIONS
        try:
            if serial:
                torch.set_num_threads(1)
            logits = self._decode_forward(
                [token_ids[j] for j in order],
                [rows[j] for j in order],
                [positions[j] for j in order],
                all_live,
                _AllThreads(threads) if serial else nullcontext(),
            )
        finally:
            torch.set_num_threads(threads)
        for slot in slots:
            self._lengths[slot] += 1
        if order != sorted(order):
            logits = logits[torch.tensor(order, device=self.device).argsort()]
        return logits

    def release(self, slot: int) -> None:
        row = self._rows.pop(slot, None)
        self._lengths.pop(slot, None)
        last = len(self._rows)
        if row is None or row == last:
            return
        # keep live rows contiguous: move the last row's sequence into the freed one
        moved = next(s for s, r in self._rows.items() if r == last)
        n = self._lengths[moved]
        self.k_cache[:, row, :, :n] = self.k_cache[:, last, :, :n]
        self.v_cache[:, row, :, :n] = self.v_cache[:, last, :, :n]
        self._zeroed[row] = max(self._zeroed[row], n)
        self._rows[moved] = row

    # --- the forward ----------------------------------------------------------
    def _layer(
        self,
        i: int,
        layer: DecoderLayer,
        h: torch.Tensor,
        rotations: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        projections: AbstractContextManager,
        project: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _call,
    ) -> torch.Tensor:
        """One decoder layer on tokens h [tokens, hidden]; `projections` wraps the calls of the projections,
        `project(module, x)` makes them (default: the module's own forward)."""
        tokens = h.shape[0]
        x = F.rms_norm(h, (self.hidden_size,), layer.attn_norm.to(h.dtype), self.eps)
        with projections:
            q, k, v = project(layer.q_proj, x), project(layer.k_proj, x), project(layer.v_proj, x)
        q = torch.bmm(q.view(tokens, self.heads, self.head_dim), rotations)
        k = torch.bmm(k.view(tokens, self.kv_heads, self.head_dim), rotations)
        attention = attend(i, q, k, v.view(tokens, self.kv_heads, self.head_dim)).reshape(tokens, -1)
        with projections:
            h = h + project(layer.o_proj, attention)
        x = F.rms_norm(h, (self.hidden_size,), layer.mlp_norm.to(h.dtype), self.eps)
        with projections:
            gate, up = project(layer.gate_proj, x), project(layer.up_proj, x)
        x = F.silu(gate) * up
        with projections:
            return h + project(layer.down_proj, x)

    def _decode_forward(
        self,
        token_ids: list[int],
        rows: list[int],
        positions: list[int],
        rows_are_prefix: bool,
        projections: AbstractContextManager,
    ) -> torch.Tensor:
        """Logits [batch, vocab] of one token per row at `positions`; `rows_are_prefix`: rows are 0..batch-1."""
        batch, length = len(rows), max(positions) + 1
        rows_t = torch.tensor(rows, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        mask = None
        if min(positions) + 1 < length:
            mask = (torch.arange(length, device=self.device) <= positions_t[:, None])[:, None, None, :]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache[rows_t, :, positions_t] = k
            v_cache[rows_t, :, positions_t] = v
            if rows_are_prefix:
                keys, values = k_cache[:batch, :, :length], v_cache[:batch, :, :length]
            else:
                keys, values = k_cache[rows_t, :, :length], v_cache[rows_t, :, :length]
            # a query's heads grouped under their KV head: [batch, kv_heads, heads per kv head, head_dim]
            q = q.view(batch, self.kv_heads, -1, self.head_dim)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

        h = self.embed_tokens(torch.tensor(token_ids, device=self.device))
        rotations = self._rotations(positions_t)
        for i, layer in enumerate(self.layers):
            h = self._layer(i, layer, h, rotations, attend, projections)
        with projections:
            return self._logits(h)

    def _attend_prompt(self, i: int, row: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of a new prompt over itself; its K/V go to the cache. Returns [tokens, heads, head_dim]."""
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, tokens, head_dim]
        self.k_cache[i, row, :, : k.shape[1]] = k
        self.v_cache[i, row, :, : v.shape[1]] = v
        # 4-D inputs: torch's CPU flash kernel (causal blocks skipped); 3-D ones fall back to the math path
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(F.rms_norm(h, (self.hidden_size,), self.final_norm, self.eps)).float()
