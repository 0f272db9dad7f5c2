"""Our modes next to their llama.cpp counterparts, as ratios (ours / theirs) of figures measured in one run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tools.bench.results import BenchRow

# Our mode -> the llama.cpp file types that store its weights alike: float32, int8 with one scale per
# block, 4-bit with a scale (Q4_0) or a scale and a min (Q4_1) per block. Other modes get no counterpart.
COUNTERPARTS: dict[str, tuple[str, ...]] = {
    "fp32": ("F32",),
    "int8": ("Q8_0",),
    "int4": ("Q4_0", "Q4_1"),
}

# (field, column name) of each figure compared
RATIO_FIELDS: tuple[tuple[str, str], ...] = (
    ("decode_tok_s", "decode"),
    ("prefill_tok_s", "prefill"),
    ("single_stream_tok_s", "1 stream"),
    ("serve_tok_s", "N streams"),
)


def peer_types(modes: Iterable[str], shipped: str) -> list[str]:
    """The llama.cpp files to measure for `modes`: their counterparts, plus the GGUF as shipped, in a stable order."""
    wanted = {t for mode in modes for t in COUNTERPARTS.get(mode, ())} | {shipped}
    order = [t for types in COUNTERPARTS.values() for t in types]
    return sorted(wanted, key=lambda t: (order.index(t) if t in order else len(order), t))


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return ours / theirs


@dataclass(frozen=True)
class Pair:
    """One of our rows and one llama.cpp row storing weights the same way."""

    ours: BenchRow
    theirs: BenchRow

    def ratio(self, name: str) -> float | None:
        return ratio(getattr(self.ours, name), getattr(self.theirs, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.ours.mode,
            "llama_cpp": self.theirs.gguf_type,
            "ratios": {name: self.ratio(name) for name, _ in RATIO_FIELDS},
        }


def counterpart_pairs(rows: Sequence[BenchRow]) -> list[Pair]:
    """Each of our rows with each measured llama.cpp counterpart, in the order of our rows."""
    peers = {row.gguf_type: row for row in rows if row.is_peer and row.gguf_type}
    return [
        Pair(row, peers[gguf_type])
        for row in rows
        if not row.is_peer
        for gguf_type in COUNTERPARTS.get(row.mode, ())
        if gguf_type in peers
    ]


def unpaired_modes(rows: Sequence[BenchRow]) -> list[str]:
    """Our modes with no llama.cpp counterpart in this run."""
    paired = {pair.ours.mode for pair in counterpart_pairs(rows)}
    return [row.mode for row in rows if not row.is_peer and row.mode not in paired]
