"""Fair sharing of the CPU between the engines of one process (one per precision mode) and the shadow scorer.

Every engine owns its model and its worker thread, but the cores are one budget: two decode
steps at once would fight over the same cores (the native step's thread team and torch's
intra-op pool each want all of them). So a worker runs a step only while it holds the turn,
and turns are handed out by used time, as a fair-queueing scheduler does: among the workers
waiting, the one with the least weighted time used goes next. A busy mode therefore gets its
share and no more; a mode that waits gets the next turn within one step of each busier mode.

A worker that was idle (away longer than `IDLE_AFTER`) cannot save up credit: on arrival its
clock is raised to the share's virtual time, the lowest clock among the busy participants
(waiting, running, or between two steps: released less than `BUSY_WINDOW` ago) as it stood at the
latest turn, never lowered. So no one pays later for time nobody else wanted: a scorer that ran
alone while the engines were idle does not wait, when they come back, until they have caught up
with all it did meanwhile (before, the served traffic kept it out for a whole benchmark round).
A worker that comes straight back for its next step keeps its clock: raising it then would
charge it for the turn another took in between. A low weight (the shadow
scorer's) makes each second of its work count for more, so under load it gets
weight / (sum of the busy weights) of the time, and all of the idle time. A background
participant (the scorer, whose turns are chunks of a replay) also yields to a busy participant
that is between two steps with a lower clock: otherwise it would take every gap an engine leaves
between its steps, whatever its weight. A waiting background participant is woken only when it
may go, never at every release.

`run` does a participant's work in its turn on one compute thread that the share owns, the same
for every participant. Torch's OpenMP gives each thread that calls it a team of its own; with two
such threads (two engines, or an engine and the scorer) there are more OpenMP threads than cores,
and GNU OpenMP then stops spin-waiting, so every parallel region of every step pays a futex
wake-up. One thread for all the work keeps one team (measured: int4 and int8 both busy in one
process served 1.05x to 1.14x as many tokens as with a thread per engine, by host and day, see the
README). The participants' own threads only wait for their turn.

No torch here: a turn is a lock with an order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# Seconds away from the share after which a participant counts as having been idle.
IDLE_AFTER = 0.01
# Seconds after a release during which a participant still counts as busy (between two of its steps).
BUSY_WINDOW = 0.05
# Seconds a waiting background participant sleeps while the engines run: releases wake it when it
# may go, so this only bounds how late it notices an engine that went idle without coming back.
BACKGROUND_POLL = 0.25


class FairShare:
    def __init__(self) -> None:
        self._cond = threading.Condition()  # foreground waiters: every release wakes them
        # Background waiters share the lock but are woken only when they may go (see `_wake_background`).
        self._background_cond = threading.Condition(self._cond._lock)  # type: ignore[attr-defined]
        self._weights: dict[str, float] = {}
        self._clocks: dict[str, float] = {}  # seconds used / weight
        self._used: dict[str, float] = {}  # seconds used, unweighted (for reports and tests)
        self._waiting: set[str] = set()
        self._holder: str | None = None
        self._released_at: dict[str, float] = {}
        self._background: set[str] = set()
        self._virtual_time = 0.0  # the lowest busy clock at the latest turn (only ever raised)
        # The one thread that runs every participant's work (`run`); started at the first call.
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="qs-compute")

    def run(self, name: str, work: Callable[[], T]) -> T:
        """Run `work` in `name`'s next turn on the share's compute thread, and return what it returns
        (or raise what it raised). The caller's thread waits meanwhile, without using a core."""
        with self.turn(name):
            return self._compute.submit(work).result()

    def close(self) -> None:
        """Let the compute thread end once its work is done (new `run` calls then fail)."""
        self._compute.shutdown(wait=False)

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
        """Hold the CPU for one unit of work (a decode step, a chunk of a replay) done on the caller's
        thread; `run` does it on the compute thread instead."""
        with self._cond:
            if name not in self._weights:
                raise KeyError(f"{name!r} has not joined")
            if time.perf_counter() - self._released_at.get(name, float("-inf")) > IDLE_AFTER:
                self._clocks[name] = max(self._clocks[name], self._virtual_time)  # no credit for idle time
            self._waiting.add(name)
            background = name in self._background
            while self._holder is not None or self._next() != name or (background and self._yields(name)):
                if background:
                    self._background_cond.wait(self._background_timeout())
                else:
                    self._cond.wait()
            self._waiting.discard(name)
            self._holder = name
            busy = [self._clocks[n] for n in self._busy(time.perf_counter())]
            self._virtual_time = max(self._virtual_time, min(busy))
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
                self._wake_background()

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

    def _wake_background(self) -> None:
        """After a release: wake the background waiters only if one of them may take the turn now.
        Waking them at every release would cost the engines: on 2 cores a woken thread takes a core
        from the decode step's thread team in the middle of its step, even to go back to sleep
        (measured: int4 served 15% slower while a replay merely waited)."""
        waiting = [n for n in self._waiting if n in self._background]
        if waiting and any(self._next() == n and not self._yields(n) for n in waiting):
            self._background_cond.notify_all()

    def _background_timeout(self) -> float:
        """How long a background waiter sleeps before it checks again by itself: while a foreground
        participant holds or waits for the turn, `BACKGROUND_POLL` (a release wakes it sooner when it
        may go); otherwise until the first busy window it yields to runs out (nothing notifies that)."""
        if self._holder is not None and self._holder not in self._background:
            return BACKGROUND_POLL
        if any(n in self._waiting for n in self._weights if n not in self._background):
            return BACKGROUND_POLL
        now = time.perf_counter()
        ends = [
            self._released_at[n] + BUSY_WINDOW - now
            for n in self._busy(now)
            if n not in self._background and n in self._released_at
        ]
        return max(min(ends), 0.001) if ends else BUSY_WINDOW

    def _next(self) -> str:
        """The waiting participant with the least weighted time (ties: by name, for a stable order)."""
        return min(self._waiting, key=lambda n: (self._clocks[n], n))
