"""Turn a growing list of token ids into text deltas without re-decoding everything."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Emit text as tokens arrive; holds back bytes that do not form a full character yet.

    Decodes only a short window before the new tokens, so a step costs the
    same however long the output grows (the scheme TGI and vLLM use).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""
