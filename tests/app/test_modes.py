"""Several precision modes in one process: selection through both APIs, /info, memory budget, fair share."""

from __future__ import annotations

import threading
import time

import pytest

from app.engine.fair_share import FairShare
from app.modes import MemoryBudgetExceeded, ModeMemory, precision_of_model_field
from app.service import ModelService
from app.settings import SettingsError, load_settings
from tests.support.live_server import StepRecorder


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total


def test_precision_lists_are_validated():
    settings = load_settings(precision=" int8, fp32 ")
    assert settings.precisions == ("int8", "fp32") and settings.default_precision == "int8"
    with pytest.raises(SettingsError, match=r"QS_PRECISION.*twice"):
        load_settings(precision="int8,int8")
    with pytest.raises(SettingsError, match=r"QS_PRECISION.*int3"):
        load_settings(precision="int8,int3")
    with pytest.raises(SettingsError, match="QS_SHADOW_REFERENCE"):
        load_settings(shadow_reference="int3")
    assert load_settings(max_memory="2GiB").max_memory == 2 * 1024**3


def test_model_field_names_a_mode():
    served = ("int8", "fp32")
    assert precision_of_model_field(None, "m", served) == "int8"
    assert precision_of_model_field("m", "m", served) == "int8"
    assert precision_of_model_field("anything", "m", served) == "int8"  # a bare name: the default, as before
    assert precision_of_model_field("m:fp32", "m", served) == "fp32"
    with pytest.raises(Exception, match="accepted: m, m:int8, m:fp32"):
        precision_of_model_field("m:int4", "m", served)


def test_two_modes_served_through_both_apis(make_client):
    with make_client(precision="int8,fp32") as client:
        service: ModelService = client.app.state.service
        assert service.state.value == "ready"
        model_id = service.model_name

        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed == [f"{model_id}:int8", f"{model_id}:fp32"]

        info = client.get("/info").json()
        assert info["precision"] == "int8"
        modes = {m["precision"]: m for m in info["modes"]}
        assert list(modes) == ["int8", "fp32"] and modes["int8"]["default"] and not modes["fp32"]["default"]
        assert modes["int8"]["weight_bytes"] < modes["fp32"]["weight_bytes"]
        assert modes["int8"]["quantization"]["layers_quantized"] > 0
        assert modes["fp32"]["quantization"]["layers_quantized"] == 0
        assert info["memory"]["weights_and_kv_caches"] <= info["memory"]["max_memory"]

        # TGI: `precision`; OpenAI: `model` as `<model-id>:<mode>`, a bare name for the default
        tgi = client.post(
            "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "precision": "fp32"}}
        )
        assert tgi.status_code == 200
        tgi_default = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
        assert tgi_default.status_code == 200
        chat = client.post(
            "/v1/chat/completions",
            json={"model": f"{model_id}:fp32", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
        )
        assert chat.status_code == 200 and chat.json()["model"] == f"{model_id}:fp32"
        completion = client.post("/v1/completions", json={"model": model_id, "prompt": "Hello", "max_tokens": 6})
        assert completion.status_code == 200 and completion.json()["model"] == model_id

        metrics = client.get("/metrics").text
        assert metric_value(metrics, "qs_generated_tokens_total", precision="fp32") == 3 + 5
        assert metric_value(metrics, "qs_generated_tokens_total", precision="int8") == 4 + 6
        assert metric_value(metrics, "qs_requests_total", precision="fp32", route="/generate") == 1
        assert metric_value(metrics, "qs_requests_total", precision="int8", route="/v1/completions") == 1
        assert metric_value(metrics, "qs_model_weight_bytes", precision="int8") == modes["int8"]["weight_bytes"]

        # an unknown mode: 422 with the accepted list, through both APIs
        for response in (
            client.post("/generate", json={"inputs": "Hi", "parameters": {"precision": "int4"}}),
            client.post("/v1/completions", json={"model": f"{model_id}:int4", "prompt": "Hi", "max_tokens": 2}),
        ):
            body = response.json()
            assert response.status_code == 422 and body["error_type"] == "validation"
            assert "int8" in body["error"] and "fp32" in body["error"]


def test_one_mode_keeps_its_contract(client):
    info = client.get("/info").json()
    assert info["precision"] == "fp32" and [m["precision"] for m in info["modes"]] == ["fp32"]
    assert "shadow" not in info
    assert client.post("/generate", json={"inputs": "Hi", "parameters": {"precision": "fp32"}}).status_code == 200


def test_memory_budget_refuses_a_set_in_one_line(make_client):
    with make_client(precision="int8,fp32", max_memory=200_000) as client:
        health = client.get("/health").json()
        assert health["status"] == "failed"
        assert "QS_MAX_MEMORY" in health["detail"] and "\n" not in health["detail"]
        assert "int8,fp32" in health["detail"]


def test_memory_budget_counts_weights_and_caches():
    memory = ModeMemory(budget=1000)
    memory.add("int8", 300, 200, ("int8", "fp32"))
    with pytest.raises(MemoryBudgetExceeded, match=r"before fp32|need"):
        memory.add("fp32", 400, 200, ("int8", "fp32"))


# --- the fair share -----------------------------------------------------------------


def _busy(share: FairShare, name: str, step_seconds: float, until: threading.Event, log: list[str]) -> None:
    while not until.is_set():
        with share.turn(name):
            log.append(name)
            time.sleep(step_seconds)


def test_fair_share_splits_time_by_weight_and_never_lets_a_busy_party_starve_another():
    share = FairShare()
    share.join("int4")
    share.join("fp32")
    share.join("shadow", 0.25)
    stop, log = threading.Event(), []
    # fp32's steps take 3x int4's: the share is of time, not of steps
    threads = [
        threading.Thread(target=_busy, args=(share, "int4", 0.004, stop, log)),
        threading.Thread(target=_busy, args=(share, "fp32", 0.012, stop, log)),
        threading.Thread(target=_busy, args=(share, "shadow", 0.004, stop, log)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join()
    used = share.used_seconds()
    total = sum(used.values())
    assert used["int4"] / used["fp32"] == pytest.approx(1.0, rel=0.25)
    assert used["shadow"] / total == pytest.approx(0.25 / 2.25, rel=0.35)
    assert log.count("int4") > 2 * log.count("fp32")  # more, shorter steps for the same time
    # while all are busy, none runs many turns in a row: int4 up to ~3 of its short ones per fp32 turn
    assert longest_run(log, "fp32") <= 2 and longest_run(log, "int4") <= 4 and longest_run(log, "shadow") <= 2


def longest_run(log: list[str], name: str) -> int:
    longest = current = 0
    for entry in log:
        current = current + 1 if entry == name else 0
        longest = max(longest, current)
    return longest


def test_a_background_party_takes_its_share_not_every_gap_between_steps():
    """The engine leaves a short gap between its steps (output processing, outside the share); the scorer,
    whose one turn is a whole replay, must not take each gap: it gets about its weight's share, and all of
    the time once the engine is idle."""
    share = FairShare()
    share.join("int4")
    share.join("shadow", 0.05, background=True)
    stop, engine_done, log = threading.Event(), threading.Event(), []

    def engine() -> None:
        while not engine_done.is_set():
            with share.turn("int4"):
                log.append("int4")
                time.sleep(0.005)
            time.sleep(0.003)  # between two steps

    def scorer() -> None:
        while not stop.is_set():
            with share.turn("shadow"):
                log.append("shadow")
                time.sleep(0.04)

    threads = [threading.Thread(target=engine), threading.Thread(target=scorer)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    busy = share.used_seconds()
    engine_done.set()
    threads[0].join()
    time.sleep(0.4)  # the engine is idle now: the scorer gets the time
    stop.set()
    threads[1].join()
    assert busy["shadow"] / (busy["shadow"] + busy["int4"]) < 0.15  # 0.05 / 1.05 asked; every gap would be ~0.8
    assert share.used_seconds()["shadow"] - busy["shadow"] > 0.2


def test_an_idle_party_saves_no_credit():
    share = FairShare()
    share.join("a")
    share.join("b")
    stop, log = threading.Event(), []
    first = threading.Thread(target=_busy, args=(share, "a", 0.005, stop, log))
    first.start()
    time.sleep(0.3)  # a runs alone: b is idle, and must not get 0.3 s of turns in a row when it arrives
    second = threading.Thread(target=_busy, args=(share, "b", 0.005, stop, log))
    second.start()
    time.sleep(0.3)
    stop.set()
    first.join()
    second.join()
    after = log[log.index("b") :]
    assert after.count("a") >= len(after) // 3  # a keeps its turns once b arrives


def test_time_used_while_the_others_were_idle_is_not_charged_later():
    """The scorer drains its backlog alone while the engine is idle, then waits for new replays;
    when traffic and replays come back it gets its weight's share at once, not only after the
    engine has caught up with all the scorer did alone."""
    share = FairShare()
    share.join("int4")
    share.join("shadow", 0.05, background=True)
    stop, scoring = threading.Event(), threading.Event()

    def scorer() -> None:
        while not stop.is_set():
            if scoring.wait(0.01):
                share.run("shadow", lambda: time.sleep(0.01))

    def engine() -> None:
        while not stop.is_set():
            share.run("int4", lambda: time.sleep(0.004))

    threads = [threading.Thread(target=scorer), threading.Thread(target=engine)]
    scoring.set()
    threads[0].start()
    time.sleep(0.5)  # alone: ~0.5 s of turns, ten seconds on its weighted clock
    scoring.clear()  # drained
    time.sleep(0.2)  # idle, all of it
    threads[1].start()  # traffic comes back
    time.sleep(0.1)
    before = share.used_seconds()
    scoring.set()  # and new replays with it
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    used = share.used_seconds()
    assert before["shadow"] > 0.3
    scorer_after, engine_after = used["shadow"] - before["shadow"], used["int4"] - before["int4"]
    # 0.05 / 1.05 of the time is asked; charged for its time alone, it would get none for ten seconds
    assert 0.02 < scorer_after / (scorer_after + engine_after) < 0.15


def test_run_does_every_participants_work_on_one_thread():
    """One OpenMP team: the work of all participants runs on the share's compute thread."""
    share = FairShare()
    share.join("int4")
    share.join("shadow", 0.05, background=True)
    seen: dict[str, int] = {}

    def work(name: str) -> str:
        seen[name] = threading.get_ident()
        return name

    results = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(share.run(n, lambda: work(n)))) for n in ("int4", "shadow")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["int4", "shadow"]
    assert seen["int4"] == seen["shadow"] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):  # what the work raises reaches the caller
        share.run("int4", lambda: 1 / 0)
    share.close()


def test_busy_mode_does_not_starve_another_under_mixed_load(make_client, monkeypatch):
    """A flood on the default mode, then one request on the other: it runs interleaved, step by step."""
    steps: list[str] = []
    original = ModelService._make_runner

    class Named(StepRecorder):
        def decode(self, slots, token_ids):
            steps.append(self.name)
            return super().decode(slots, token_ids)

    def recording_runner(self, loaded):
        recorder = Named(original(self, loaded), step_seconds=0.01)
        recorder.name = "int8" if type(loaded.model.model.layers[0].mlp.up_proj).__name__ != "Linear" else "fp32"
        return recorder

    monkeypatch.setattr(ModelService, "_make_runner", recording_runner)
    with make_client(precision="int8,fp32", max_concurrent_requests=16, max_batch_size=8) as client:
        service: ModelService = client.app.state.service
        flood_done: list[int] = []

        def flood() -> None:
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 60, "do_sample": True, "seed": 1}}
            flood_done.append(client.post("/generate", json=body).status_code)

        flooders = [threading.Thread(target=flood) for _ in range(8)]
        for thread in flooders:
            thread.start()
        deadline = time.monotonic() + 30
        while service.modes["int8"].engine.stats()[0] < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        other = client.post(
            "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 10, "precision": "fp32"}}
        )
        other_seconds = time.perf_counter() - started
        for thread in flooders:
            thread.join()
        assert other.status_code == 200 and flood_done == [200] * 8
        assert service.modes["int8"].engine.stats() == (0, 0)
        first, last = steps.index("fp32"), len(steps) - 1 - steps[::-1].index("fp32")
        window = steps[first : last + 1]
        # while both are busy they take turns: one or two int8 steps between fp32's, three when the
        # fp32 worker's thread is slow to come back for its turn (CI runs this on 2 shared cores)
        assert longest_run(window, "int8") <= 3, window
        assert window.count("fp32") >= 9
        assert "int8" in steps[last + 1 :], "the flood should still run when the other mode's request is done"
        assert other_seconds < 30
