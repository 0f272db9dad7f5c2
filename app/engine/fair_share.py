"""Fair sharing of the CPU between the engines of one process (one per precision mode) and the shadow scorer.

Every engine owns its model and its worker thread, but the cores are one budget: two decode
steps at once would fight over the same cores (the native step's thread team and torch's
intra-op pool each want all of them). So a worker runs a step only while it holds the turn,
and turns are handed out by used time, as a fair-queueing scheduler does: among the workers
waiting, the one with the least weighted time used goes next. A busy mode therefore gets its
share and no more; a mode that waits gets the next turn within one step of each busier mode.

A worker that was idle (away longer than `IDLE_AFTER`) cannot save up credit: on arrival its
clock is raised to the lowest clock among the busy ones (waiting, running, or between two steps:
released less than `BUSY_WINDOW` ago), so it competes from there.
A worker that comes straight back for its next step keeps its clock: raising it then would
charge it for the turn another took in between. A low weight (the shadow
scorer's) makes each second of its work count for more, so under load it gets
weight / (sum of the busy weights) of the time, and all of the idle time. A background
participant (the scorer, whose one turn is a whole replay and cannot be cut short) also yields to
a busy participant that is between two steps with a lower clock: otherwise it would take every
gap an engine leaves between its steps, whatever its weight.

No torch here: a turn is a lock with an order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Seconds away from the share after which a participant counts as having been idle.
IDLE_AFTER = 0.01
# Seconds after a release during which a participant still counts as busy (between two of its steps).
BUSY_WINDOW = 0.05


class FairShare:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._weights: dict[str, float] = {}
        self._clocks: dict[str, float] = {}  # seconds used / weight
        self._used: dict[str, float] = {}  # seconds used, unweighted (for reports and tests)
        self._waiting: set[str] = set()
        self._holder: str | None = None
        self._released_at: dict[str, float] = {}
        self._background: set[str] = set()

    def join(self, name: str, weight: float = 1.0, *, background: bool = False) -> None:
        """Register a participant (before its first turn); a background one never takes a busy one's gaps."""
        if weight <= 0:
            raise ValueError(f"weight of {name!r} must be positive, not {weight}")
        with self._cond:
            self._weights[name] = weight
            if background:
                self._background.add(name)
            self._clocks.setdefault(name, 0.0)
            self._used.setdefault(name, 0.0)

    @property
    def participants(self) -> list[str]:
        with self._cond:
            return list(self._weights)

    def used_seconds(self) -> dict[str, float]:
        """Seconds each participant held the turn."""
        with self._cond:
            return dict(self._used)

    @contextmanager
    def turn(self, name: str) -> Iterator[None]:
        """Hold the CPU for one unit of work (a decode step, a shadow replay)."""
        with self._cond:
            if name not in self._weights:
                raise KeyError(f"{name!r} has not joined")
            now = time.perf_counter()
            contenders = [self._clocks[n] for n in self._busy(now) if n != name]
            idle = now - self._released_at.get(name, float("-inf")) > IDLE_AFTER
            if contenders and idle:  # no credit for idle time
                self._clocks[name] = max(self._clocks[name], min(contenders))
            self._waiting.add(name)
            background = name in self._background
            while self._holder is not None or self._next() != name or (background and self._yields(name)):
                # A background participant re-checks when a busy one's window runs out (nothing notifies that).
                self._cond.wait(BUSY_WINDOW if background else None)
            self._waiting.discard(name)
            self._holder = name
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            with self._cond:
                self._clocks[name] += spent / self._weights[name]
                self._used[name] += spent
                self._holder = None
                self._released_at[name] = time.perf_counter()
                self._cond.notify_all()

    def _busy(self, now: float) -> list[str]:
        """Participants waiting, running, or between two steps (released within BUSY_WINDOW)."""
        return [
            n
            for n in self._weights
            if n in self._waiting or n == self._holder or now - self._released_at.get(n, float("-inf")) <= BUSY_WINDOW
        ]

    def _yields(self, name: str) -> bool:
        """Whether background `name` must leave the turn to a busy foreground participant with a lower clock."""
        clock = self._clocks[name]
        now = time.perf_counter()
        return any(n not in self._background and self._clocks[n] < clock for n in self._busy(now) if n != name)

    def _next(self) -> str:
        """The waiting participant with the least weighted time (ties: by name, for a stable order)."""
        return min(self._waiting, key=lambda n: (self._clocks[n], n))
