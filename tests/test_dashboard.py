"""The web dashboard: its routes and event stream over plain HTTP, then the page in a real browser.

The browser tests drive Debian's Chromium, headless, through Playwright against a live server while a
client's training loop runs in a thread. They skip (with the reason) when no Chromium is installed;
`.ci/run` installs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import eztinker
from eztinker import EZTinkerClient, LossFunctionConfig
from eztinker.api.dashboard import _Stream
from eztinker.engine import register_loss_function
from eztinker.engine.losses import unregister_loss_function
from eztinker.service import Service
from eztinker.settings import Settings
from eztinker.store import RunRecord, StepMetricsRecord

KEY_A, KEY_B = "dashboard-key-a", "dashboard-key-b"
SLOW_LOSS = "dashboard_test_slow"  # a cross entropy that takes 0.25 s: keeps jobs waiting in the queue


def _slow_cross_entropy(logits, labels, weights=None, **kwargs) -> torch.Tensor:
    time.sleep(0.25)
    shift_logits = logits[:, :-1, :].contiguous()
    return torch.nn.functional.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def ids(n: int, start: int = 7) -> list[int]:
    return [(start + 13 * i) % 900 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    register_loss_function(SLOW_LOSS, _slow_cross_entropy)
    data_dir = tmp_path_factory.mktemp("dashboard-data")
    try:
        with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[KEY_A, KEY_B]) as url:
            yield url
    finally:
        unregister_loss_function(SLOW_LOSS)  # the loss registry is process-wide: leave it as found


@pytest.fixture(scope="module")
def base_model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def trained_run(server: str, base_model: str) -> str:
    """Key A's run: three optimizer steps and a checkpoint named `first`."""
    with EZTinkerClient(base_url=server, api_key=KEY_A) as client:
        run_id = client.create_run(base_model, {"r": 4, "lora_alpha": 8}, run_id="dash-trained")
        for _ in range(3):
            client.forward_backward(run_id, input_ids=ids(24))
            client.optim_step(run_id, learning_rate=1e-2).result()
        client.save_checkpoint(run_id, name="first")
    return run_id


class TrainingLoop:
    """A client's training loop in a thread (forward_backward, optim_step, repeat) until the block ends."""

    def __init__(self, url: str, key: str, base_model: str, run_id: str, pause: float = 0.15) -> None:
        self.client = EZTinkerClient(base_url=url, api_key=key)
        self.run_id = self.client.create_run(base_model, {"r": 8}, run_id=run_id)
        self.pause = pause
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"train-{run_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.client.forward_backward(self.run_id, input_ids=ids(32, start=self.steps))
            self.client.optim_step(self.run_id, learning_rate=5e-3).result()
            self.steps += 1
            self._stop.wait(self.pause)

    def __enter__(self) -> TrainingLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()


def read_events(
    url: str,
    until: Callable[[dict[str, list[Any]]], bool],
    *,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> dict[str, list[Any]]:
    """Read the dashboard's event stream until `until(events so far)` holds; events by name, in order."""
    events: dict[str, list[Any]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    with httpx.stream(
        "GET", f"{url}/dashboard/api/events", params=params, headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name = "message"
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events[name].append(json.loads(line[5:]))
            elif line == "":
                name = "message"
                if until(events):
                    return events
            assert time.monotonic() < deadline, f"stream ended without the expected events: {dict(events)}"
    raise AssertionError(f"stream ended without the expected events: {dict(events)}")


# --- plain HTTP --------------------------------------------------------------------------------------


def test_the_page_and_its_assets_need_no_key(server: str) -> None:
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/dashboard/static/app.js" in page.text and 'id="page-playground"' in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{server}/dashboard/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_the_dashboard_views_need_a_valid_key_like_the_api(server: str) -> None:
    for path in ("/dashboard/api/runs", "/dashboard/api/stats", "/dashboard/api/samplers"):
        assert httpx.get(f"{server}{path}").status_code == 401
        assert httpx.get(f"{server}{path}", headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(f"{server}{path}", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    events = f"{server}/dashboard/api/events"
    assert httpx.get(events).status_code == 401
    assert httpx.get(events, params={"key": "wrong"}).status_code == 401
    assert httpx.get(events, params={"key": "wrong"}).json()["error"].startswith("a valid API key")


def test_the_stream_sends_the_owners_runs_and_the_selected_runs_metrics(
    server: str, trained_run: str
) -> None:
    events = read_events(
        server,
        lambda e: all(e[name] for name in ("runs", "queue", "checkpoints", "stats", "metrics")),
        params={"run": trained_run},
        headers={"X-API-Key": KEY_A},
    )
    run = next(r for r in events["runs"][-1] if r["run_id"] == trained_run)
    assert run["mine"] is True and len(run["owner"]) == 8 and run["step"] == 3
    assert [m["step"] for m in events["metrics"][0]["history"]] == [1, 2, 3]
    assert all(m["loss"] is not None for m in events["metrics"][0]["history"])
    assert {"queue_depth", "jobs", "utilisation", "tokens_per_second"} <= set(events["queue"][-1])
    assert ("dash-trained", "first") in {(c["run_id"], c["name"]) for c in events["checkpoints"][-1]}
    stats = events["stats"][-1]
    assert stats["auth_enabled"] is True and stats["health"]["device"] in ("cpu", "cuda")


def test_the_stream_sends_only_new_metric_points_as_training_goes_on(server: str, base_model: str) -> None:
    with TrainingLoop(server, KEY_A, base_model, "dash-stream", pause=0.05) as loop:
        while loop.steps < 2:
            time.sleep(0.05)
        # `?key=` is how an EventSource authenticates; `after` says which steps the page has.
        events = read_events(
            server,
            lambda e: sum(len(m["history"]) for m in e["metrics"]) >= 3 and len(e["metrics"]) >= 2,
            params={"run": "dash-stream", "after": 1, "key": KEY_A},
        )
    steps = [m["step"] for batch in events["metrics"] for m in batch["history"]]
    assert steps[0] == 2 and steps == sorted(set(steps)), steps  # no step twice, none the page had


def test_a_key_sees_only_its_own_runs_in_the_stream_and_views(server: str, trained_run: str) -> None:
    events = read_events(
        server,
        lambda e: bool(e["runs"] and e["checkpoints"] and e["metrics"]),
        params={"run": trained_run, "key": KEY_B},
    )
    assert events["runs"][-1] == [] and events["checkpoints"][-1] == []
    assert events["metrics"][0]["error"] == f"no run {trained_run!r}"
    assert httpx.get(f"{server}/dashboard/api/runs", headers={"X-API-Key": KEY_B}).json() == []
    merged = f"{server}/dashboard/api/runs/{trained_run}/checkpoints/first/merged"
    assert httpx.get(merged, headers={"X-API-Key": KEY_B}).status_code == 404


def test_the_queue_event_lists_waiting_jobs_with_positions_and_estimates(
    server: str, base_model: str
) -> None:
    with EZTinkerClient(base_url=server, api_key=KEY_A) as client:
        run_id = client.create_run(base_model, {"r": 2}, LossFunctionConfig(loss_type=SLOW_LOSS))
        futures = [client.forward_backward(run_id, input_ids=ids(16)) for _ in range(8)]
        events = read_events(
            server,
            lambda e: any(len(q["jobs"]) >= 3 for q in e["queue"]),
            headers={"X-API-Key": KEY_A},
        )
        for future in futures:
            future.result()
    queue = next(q for q in events["queue"] if len(q["jobs"]) >= 3)
    waiting = [j for j in queue["jobs"] if j["status"] == "queued"]
    assert [j["position"] for j in waiting] == list(range(len(waiting)))
    assert all(j["run_id"] == run_id and j["op"] == "forward_backward" for j in queue["jobs"])
    assert all(j["estimated_start"] is not None for j in waiting)


def test_token_texts_samplers_and_stats(server: str, base_model: str) -> None:
    headers = {"X-API-Key": KEY_A}
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(base_model)("Hello dashboard")["input_ids"]
    texts = httpx.post(
        f"{server}/dashboard/api/tokens", json={"base_model": base_model, "tokens": tokens}, headers=headers
    ).json()["texts"]
    assert len(texts) == len(tokens) and "".join(texts) == "Hello dashboard"
    unknown = httpx.post(
        f"{server}/dashboard/api/tokens", json={"base_model": "nope", "tokens": [1]}, headers=headers
    )
    assert unknown.status_code == 404
    assert httpx.get(f"{server}/dashboard/api/samplers", headers=headers).json() == []
    stats = httpx.get(f"{server}/dashboard/api/stats", headers=headers).json()
    assert base_model in stats["health"]["loaded_models"] and stats["uptime_seconds"] > 0
    host = next(m for m in stats["memory"] if m["name"] == "host")
    assert host["allocated_bytes"] > 0 and 0 < host["used_bytes"] <= host["total_bytes"]


def test_a_checkpoint_exports_merged_into_its_base_model(server: str, trained_run: str) -> None:
    response = httpx.get(
        f"{server}/dashboard/api/runs/{trained_run}/checkpoints/first/merged",
        headers={"X-API-Key": KEY_A},
        timeout=120,
    )
    assert response.status_code == 200
    assert response.headers["content-disposition"].endswith(f'"{trained_run}-first-merged.tar.gz"')
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = set(tar.getnames())
    assert {"first-merged/config.json", "first-merged/model.safetensors"} <= names
    assert not any("adapter" in name for name in names)


# --- the stream's metric cursor, with the reads interleaved on purpose -------------------------------


def test_a_step_recorded_between_the_run_list_and_the_history_read_is_sent_once(
    tmp_path, monkeypatch
) -> None:
    service = Service(Settings(data_dir=tmp_path))
    service.store.add_run(RunRecord(run_id="race", base_model="m", lora_config={"r": 4}))

    def record(step: int) -> None:
        service.store.add_step_metrics(StepMetricsRecord(run_id="race", step=step, loss=1.0 / step))

    record(1)
    stream = _Stream(service, None, "race", after=0)
    read_history = service.views.metrics

    def history_one_step_later(run_id: str, owner: str | None) -> Any:
        record(2)  # an optimizer step lands after the tick read the run list (step 1), before this read
        return read_history(run_id, owner)

    def metrics_events() -> list[dict[str, Any]]:
        return [json.loads(data) for event, data in stream.tick() if event == "metrics"]

    monkeypatch.setattr(service.views, "metrics", history_one_step_later)
    first = metrics_events()
    monkeypatch.undo()
    assert [[m["step"] for m in e["history"]] for e in first] == [[1, 2]]
    assert metrics_events() == []  # the run list now says step 2: the page has it already
    record(3)
    assert [[m["step"] for m in e["history"]] for e in metrics_events()] == [[3]]
    # A resume from step 1 records step 2 again: the page gets the whole history anew, as the API has it.
    service.store.update_run("race", step=1)
    assert metrics_events() == []
    record(2)
    (resumed,) = metrics_events()
    assert resumed["reset"] is True and [m["step"] for m in resumed["history"]] == [1, 2, 2, 3]
    service.store.close()


# --- in a real browser -------------------------------------------------------------------------------


def _chromium() -> str | None:
    candidates = [
        os.environ.get("EZTINKER_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    candidates.append("/usr/lib/chromium/chromium")
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.fixture(scope="module")
def browser(server: str):  # depends on the server so that it closes (and drops its streams) first
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set EZTINKER_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: _console_error(errors, message))
    page.errors = errors
    yield page
    context.close()


def _console_error(errors: list[str], message) -> None:
    # A page opened before its key is entered is refused (401); the browser logs that, and it is expected.
    if message.type == "error" and "status of 401" not in message.text:
        errors.append(message.text)


def open_dashboard(page, server: str, key: str | None, hash_: str = "#/runs") -> None:
    page.goto(f"{server}/{hash_}")
    if key is not None:
        page.fill("#api-key", key)
        page.click("#key-form button")
        page.wait_for_selector('#live[data-state="live"]')


def chart_points(page, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-count") or 0)


def test_the_dashboard_shows_a_training_loop_live(page, server: str, base_model: str) -> None:
    with TrainingLoop(server, KEY_A, base_model, "dash-live") as loop:
        open_dashboard(page, server, KEY_A)
        row = page.wait_for_selector('#runs-table tr[data-run="dash-live"]')
        assert "r=8" in row.inner_text() and "you (" in row.inner_text() and "active" in row.inner_text()

        page.click('#runs-table tr[data-run="dash-live"] a')
        page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.count) >= 2")
        seen = chart_points(page, "chart-loss")
        # The chart gains points while the client trains, with no reload.
        page.wait_for_function(
            f"Number(document.querySelector('#chart-loss').dataset.count) >= {seen + 2}", timeout=30_000
        )
        points = chart_points(page, "chart-lr")
        with EZTinkerClient(base_url=server, api_key=KEY_A) as client:  # read after the page: never behind it
            recorded = len(client.get_metrics(loop.run_id).history)
        assert seen + 2 <= points <= recorded  # a point per recorded step, none twice
        assert "dash-live" in page.inner_text("#run-title")
        assert page.locator("#chart-loss path.line").count() == 1
        assert page.errors == []


def test_the_queue_page_shows_positions_and_estimated_starts(page, server: str, base_model: str) -> None:
    open_dashboard(page, server, KEY_A, "#/queue")
    with EZTinkerClient(base_url=server, api_key=KEY_A) as client:
        run_id = client.create_run(base_model, {"r": 2}, LossFunctionConfig(loss_type=SLOW_LOSS))
        futures = [client.forward_backward(run_id, input_ids=ids(16)) for _ in range(12)]
        page.wait_for_selector("#queue-table tbody tr:nth-child(3)")
        text = page.inner_text("#queue-table tbody")
        for future in futures:
            future.result()
    assert "forward_backward" in text and "queued" in text and "in " in text
    assert "utilisation" in page.inner_text("#queue-tiles").lower()
    assert page.errors == []


def test_the_playground_returns_text_with_per_token_logprobs(
    page, server: str, base_model: str, trained_run: str
) -> None:
    open_dashboard(page, server, KEY_A, "#/playground")
    for source in (f"base:{base_model}", f"run:{trained_run}"):
        page.wait_for_selector(f'#sample-source option[value="{source}"]', state="attached")
        page.select_option("#sample-source", source)
        page.fill("#sample-prompt", "Hello")
        page.fill("#sample-max-tokens", "12")
        page.fill("#sample-seed", "3")
        page.click("#sample-button")
        page.wait_for_function("!document.querySelector('#sample-button').disabled")
        assert page.is_visible("#sample-output"), page.inner_text("#sample-status")
        tokens = page.locator("#sample-tokens .tok")
        assert 1 <= tokens.count() <= 12
        logprobs = [
            float(tokens.nth(i).get_attribute("data-logprob") or "nan") for i in range(tokens.count())
        ]
        assert all(lp <= 0 for lp in logprobs)
        assert (
            page.inner_text("#sample-tokens").startswith("Hello")
            and len(page.inner_text("#sample-tokens")) > 5
        )
        assert "tokens" in page.inner_text("#sample-meta")
        page.evaluate("document.querySelector('#sample-output').hidden = true")
    assert page.inner_text("#sample-status") == ""
    # As a chat: the prompt goes through the chat template; the reply is the template's continuation.
    page.check("#sample-chat")
    page.fill("#sample-temperature", "0")
    page.click("#sample-button")
    page.wait_for_function("!document.querySelector('#sample-button').disabled")
    assert page.is_visible("#sample-output"), page.inner_text("#sample-status")
    with EZTinkerClient(base_url=server, api_key=KEY_A) as client:
        expected = client.generate([{"role": "user", "content": "Hello"}], 12, 0.0, run_id=trained_run)
    assert page.inner_text("#sample-tokens") == "Hello" + expected.samples[0].text
    assert page.errors == []


def test_a_checkpoint_downloads_and_deletes_from_the_dashboard(page, server: str, base_model: str) -> None:
    with EZTinkerClient(base_url=server, api_key=KEY_A) as client:
        run_id = client.create_run(base_model, {"r": 2}, run_id="dash-ckpt")
        client.forward_backward(run_id, input_ids=ids(16))
        client.optim_step(run_id).result()
        client.save_checkpoint(run_id, name="to-download")
    open_dashboard(page, server, KEY_A, "#/checkpoints")
    row = '#checkpoints-table tr[data-checkpoint="dash-ckpt/to-download"]'
    page.wait_for_selector(row)
    with page.expect_download() as download_info:
        page.click(f"{row} button.download")
    download = download_info.value
    assert download.suggested_filename == "dash-ckpt-to-download.tar.gz"
    with tarfile.open(download.path()) as tar:
        names = set(tar.getnames())
    assert {"to-download/adapter_config.json", "to-download/adapter_model.safetensors"} <= names

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"{row} button.delete")
    page.wait_for_selector(row, state="detached")
    with EZTinkerClient(base_url=server, api_key=KEY_A) as client:
        assert client.get_checkpoints(run_id) == []
    assert page.errors == []


def test_the_server_page_shows_device_memory_and_throughput(page, server: str) -> None:
    open_dashboard(page, server, KEY_A, "#/server")
    page.wait_for_selector("#memory .tile")
    facts = page.inner_text("#server-facts")
    assert "device" in facts.lower() and "required" in facts
    assert "host ram" in page.inner_text("#memory").lower()
    assert "tokens trained" in page.inner_text("#throughput-tiles").lower()
    assert page.errors == []


def test_another_key_sees_none_of_the_runs(page, server: str, trained_run: str) -> None:
    open_dashboard(page, server, KEY_B)
    page.wait_for_selector("#runs-empty:not([hidden])")
    assert page.locator("#runs-table tbody tr").count() == 0
    page.goto(f"{server}/#/checkpoints")
    page.wait_for_selector("#checkpoints-empty:not([hidden])")
    assert page.errors == []


def test_without_a_key_the_page_asks_for_one(page, server: str) -> None:
    page.goto(f"{server}/")
    page.wait_for_selector('#live[data-state="unauthorized"]')
    assert "API key" in page.inner_text("#notice")
    assert page.errors == []
