"""The scheduler alone: no model, no tokenizer, no torch.

Requests carry `SimpleNamespace` parameters (the scheduler never reads them);
`release` is a recorder standing in for the runner.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from app.engine.events import ErrorEvent, Event
from app.engine.scheduler import EngineOverloaded, EngineStopped, GenerationRequest, Scheduler, Ticket


def request(timeout: float | None = None) -> GenerationRequest:
    return GenerationRequest([1, 2, 3], SimpleNamespace(), timeout=timeout)


class Released(list[int]):
    """The slots the scheduler released, in order."""

    def __call__(self, slot: int) -> None:
        self.append(slot)


def make(max_batch_size: int = 2, max_queue: int = 2) -> tuple[Scheduler, Released]:
    released = Released()
    return Scheduler(max_batch_size, max_queue, release=released), released


def submit_all(scheduler: Scheduler, requests: list[GenerationRequest]) -> list[Ticket]:
    return [scheduler.submit(r, lambda event: None) for r in requests]


def test_importing_the_scheduler_does_not_import_torch():
    code = "import sys, app.engine.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_admits_oldest_first_into_the_free_slots_up_to_the_batch_size():
    scheduler, _ = make(max_batch_size=2, max_queue=3)
    requests = [request() for _ in range(5)]
    submit_all(scheduler, requests)
    assert scheduler.stats() == (0, 5)
    before = time.perf_counter()
    admitted = scheduler.admit()
    assert [t.request for t in admitted] == requests[:2]
    assert [t.slot for t in admitted] == [0, 1]
    assert all(t.admitted_at >= before for t in admitted)
    assert scheduler.running == admitted
    assert scheduler.stats() == (2, 3)
    assert scheduler.admit() == []  # no free slot: the others keep waiting, in order
    scheduler.retire(admitted[0])
    assert [t.request for t in scheduler.admit()] == requests[2:3]
    assert scheduler.stats() == (2, 2)


def test_a_retired_slot_is_released_and_given_to_the_next_admission():
    scheduler, released = make(max_batch_size=3, max_queue=1)
    first, second, third = submit_all(scheduler, [request(), request(), request()])
    scheduler.admit()
    assert [first.slot, second.slot, third.slot] == [0, 1, 2]
    (waiting,) = submit_all(scheduler, [request()])
    scheduler.retire(second)
    assert released == [1]
    assert scheduler.running == [first, third]
    assert scheduler.admit() == [waiting]
    assert waiting.slot == 1
    assert len({t.slot for t in scheduler.running}) == 3


def test_a_slot_is_freed_even_when_release_fails():
    def broken(slot: int) -> None:
        raise RuntimeError("cache gone")

    scheduler = Scheduler(1, 1, release=broken)
    (ticket,) = submit_all(scheduler, [request()])
    scheduler.admit()
    with pytest.raises(RuntimeError, match="cache gone"):
        scheduler.retire(ticket)
    assert scheduler.stats() == (0, 0)
    (again,) = submit_all(scheduler, [request()])
    assert scheduler.admit() == [again] and again.slot == 0


def test_queue_limit_counts_running_and_waiting_and_refuses_with_overloaded():
    scheduler, _ = make(max_batch_size=2, max_queue=1)
    submit_all(scheduler, [request(), request()])
    scheduler.admit()
    submit_all(scheduler, [request()])
    assert scheduler.stats() == (2, 1)
    with pytest.raises(EngineOverloaded, match="all 2 batch slots are busy and 1 requests wait"):
        scheduler.submit(request(), lambda event: None)
    assert scheduler.stats() == (2, 1)  # the refused one left no trace
    scheduler.retire(scheduler.running[0])
    submit_all(scheduler, [request()])  # a place is free again
    assert scheduler.stats() == (1, 2)


def test_cancel_while_waiting_leaves_the_queue_at_once_and_never_runs():
    scheduler, released = make(max_batch_size=1, max_queue=2)
    running, waiting = request(), request()
    submit_all(scheduler, [running, waiting])
    scheduler.admit()
    scheduler.cancel(waiting)
    assert waiting.cancelled.is_set()
    assert scheduler.stats() == (1, 0)  # at once, before any drop
    scheduler.retire(scheduler.running[0])
    assert scheduler.drop(time.perf_counter()) == []
    assert scheduler.admit() == []
    assert released == [0]  # only the running one's slot
    assert not scheduler.has_work()


def test_cancel_while_running_retires_at_the_next_drop_without_an_error():
    scheduler, released = make(max_batch_size=2, max_queue=1)
    victim, other, waiting = request(), request(), request()
    tickets = submit_all(scheduler, [victim, other, waiting])
    scheduler.admit()
    scheduler.cancel(victim)
    assert scheduler.stats() == (2, 1)  # still in its slot until the worker drops it
    assert released == []
    assert scheduler.drop(time.perf_counter()) == []  # cancelled: nobody to tell
    assert released == [tickets[0].slot]
    assert scheduler.running == [tickets[1]]
    assert scheduler.admit() == [tickets[2]] and tickets[2].slot == tickets[0].slot


def test_expiry_while_waiting_and_while_running():
    scheduler, released = make(max_batch_size=1, max_queue=2)
    running = request(timeout=10.0)
    waiting_soon, waiting_late = request(timeout=1.0), request(timeout=100.0)
    run_ticket, soon_ticket, late_ticket = submit_all(scheduler, [running, waiting_soon, waiting_late])
    scheduler.admit()
    start = running.enqueued_at
    assert scheduler.drop(start + 0.5) == []
    assert scheduler.drop(start + 5.0) == [soon_ticket]  # expired while waiting: unqueued, no slot to release
    assert released == []
    assert scheduler.stats() == (1, 1)
    assert scheduler.drop(start + 20.0) == [run_ticket]  # expired while running: retired, slot released
    assert released == [run_ticket.slot]
    assert scheduler.stats() == (0, 1)
    assert scheduler.admit() == [late_ticket]


def test_expired_running_come_before_expired_waiting_and_cancel_wins_over_expiry():
    scheduler, released = make(max_batch_size=2, max_queue=1)
    cancelled, expired, waiting = request(timeout=1.0), request(timeout=1.0), request(timeout=1.0)
    tickets = submit_all(scheduler, [cancelled, expired, waiting])
    scheduler.admit()
    scheduler.cancel(cancelled)
    assert scheduler.drop(time.perf_counter() + 10) == [tickets[1], tickets[2]]
    assert sorted(released) == [0, 1]
    assert scheduler.stats() == (0, 0)


def test_stop_refuses_new_requests_and_abort_empties_everything():
    scheduler, released = make(max_batch_size=1, max_queue=2)
    tickets = submit_all(scheduler, [request(), request(), request()])
    scheduler.admit()
    scheduler.stop()
    assert scheduler.wait_for_work() is False
    with pytest.raises(EngineStopped):
        scheduler.submit(request(), lambda event: None)
    assert scheduler.abort() == tickets  # the running one first, then the waiting ones in order
    assert released == [0]
    assert scheduler.stats() == (0, 0)
    assert not scheduler.has_work()


def test_the_worker_waits_for_work_from_another_thread():
    scheduler, _ = make()
    woke: list[bool] = []
    worker = threading.Thread(target=lambda: woke.append(scheduler.wait_for_work()), daemon=True)
    worker.start()
    time.sleep(0.05)
    assert woke == []  # nothing to do: it sleeps
    events: list[Event] = []
    ticket = scheduler.submit(request(), events.append)
    worker.join(timeout=10)
    assert woke == [True]
    ticket.emit(ErrorEvent("x"))  # the ticket carries the caller's emit
    assert events == [ErrorEvent("x")]


def test_concurrent_submits_and_cancels_keep_the_counts_right():
    scheduler, _ = make(max_batch_size=4, max_queue=400)
    kept: list[GenerationRequest] = []

    def client() -> None:
        for _ in range(50):
            r = request()
            scheduler.submit(r, lambda event: None)
            scheduler.cancel(r)  # it may have been admitted just before: then the next drop retires it
            kept.append(request())
            scheduler.submit(kept[-1], lambda event: None)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    admitted: list[GenerationRequest] = []
    while any(t.is_alive() for t in threads) or scheduler.has_work():
        scheduler.drop(time.perf_counter())
        admitted += [t.request for t in scheduler.admit()]
        for ticket in scheduler.running:
            scheduler.retire(ticket)
    for thread in threads:
        thread.join()
    assert scheduler.stats() == (0, 0)
    kept_ids = {id(r) for r in kept}
    assert len(kept) == 8 * 50
    assert sum(id(r) in kept_ids for r in admitted) == len(kept)  # each kept request ran exactly once...
    assert len({id(r) for r in admitted}) == len(admitted)  # ...and none twice
