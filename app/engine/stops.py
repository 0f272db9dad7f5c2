"""Stop sequences on streamed text: cut at the first match, hold back what may still become one."""

from __future__ import annotations


class StopMatcher:
    """Accumulates a sequence's text, cuts it at the earliest stop sequence, and says what is safe to show.

    Text that could still grow into a stop sequence is held back, so a streaming
    client never sees characters that the final text drops.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.stopped = False
        self._shown = 0

    def push(self, delta: str) -> str:
        """Append one token's text; return the text that became safe to show."""
        previous = len(self.text)
        self.text += delta
        cut = self._earliest_stop(previous)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self.flush()
        boundary = max(self._shown, len(self.text) - self._held_back())
        visible = self.text[self._shown : boundary]
        self._shown = boundary
        return visible

    def flush(self) -> str:
        """Release whatever was held back (the sequence ended for another reason)."""
        visible = self.text[self._shown :]
        self._shown = len(self.text)
        return visible

    def _earliest_stop(self, previous: int) -> int | None:
        found = None
        for stop in self.stops:
            # only the tail can hold a stop sequence that was not there before
            index = self.text.find(stop, max(0, previous - len(stop) + 1))
            if index != -1 and (found is None or index < found):
                found = index
        return found

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
