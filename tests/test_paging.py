"""Adapter paging: a bound on the run state resident on the device, invisible to results.

Every comparison is bit-for-bit (`torch.equal`) against an engine without a budget doing the same ops.
No sleeps and no timing: `Pager.settle()` waits for the pager's thread to finish what it has to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from eztinker.engine import AdamParams, Datum, Engine, EngineConfig, NotFoundError, SamplingParams, TrainOp
from eztinker.engine.run import TrainingRun
from eztinker.engine.run_state import state_bytes
from eztinker.scheduler import Job, Scheduler
from eztinker.settings import Settings, parse_size

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "seed": 7}


def _tokens(n: int, start: int) -> list[int]:
    return [(start + 31 * j) % 900 + 3 for j in range(n)]


def _op(run_id: str, step: int) -> TrainOp:
    s = 11 * step + sum(map(ord, run_id))
    return TrainOp(run_id, [Datum.from_labels(_tokens(10, s)), Datum.from_labels(_tokens(6, s + 1))])


def _engine(model: Path, tmp_path: Path, budget: int | None, host: int | None = None) -> Engine:
    return Engine(
        EngineConfig(
            device="cpu", adapter_memory=budget, adapter_host_memory=host, page_dir=tmp_path / "pages"
        )
    )


def _state(engine: Engine, run_id: str) -> dict[str, torch.Tensor]:
    """The run's whole state (weights, gradients, optimizer moments), paged in by a save."""
    run = engine._runs[run_id]
    with engine.paging.using([run]):
        out = {}
        for i, p in enumerate(run.params):
            out[f"{i}.w"] = p.detach().clone()
            if p.grad is not None:
                out[f"{i}.g"] = p.grad.clone()
            for k, v in run.optimizer.state.get(p, {}).items():
                out[f"{i}.{k}"] = v.clone()
        return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _one_run_bytes(model: Path, tmp_path: Path) -> int:
    engine = _engine(model, tmp_path, None)
    engine.create_run(str(model), LORA, run_id="probe")
    engine.forward_backward_many([_op("probe", 0)])
    engine.optim_step("probe")
    engine.forward_backward_many([_op("probe", 1)])
    return state_bytes(engine._runs["probe"])  # weights + gradients + two AdamW moments


# --- the setting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("24MB", 24 * 10**6), ("20GiB", 20 * 2**30), ("512KiB", 512 * 2**10), ("1000", 1000), ("1.5 GB", 1.5e9)],
)
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == int(value)
    assert Settings(adapter_memory=text).adapter_memory_bytes == int(value)


@pytest.mark.parametrize("text", ["lots", "12XB", "-3MB", "MB", ""])
def test_a_bad_size_is_an_error_naming_the_setting(text: str) -> None:
    with pytest.raises(ValidationError, match="adapter_memory"):
        Settings(adapter_memory=text)
    with pytest.raises(ValidationError, match="adapter_host_memory"):
        Settings(adapter_host_memory=text)


def test_no_budget_by_default_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().adapter_memory_bytes is None
    monkeypatch.setenv("EZTINKER_ADAPTER_MEMORY", "3MiB")
    assert Settings().adapter_memory_bytes == 3 * 2**20


def test_the_cli_has_the_flags() -> None:
    from typer.testing import CliRunner

    from eztinker.cli import app

    out = CliRunner().invoke(app, ["server", "--help"], env={"COLUMNS": "200"}).output
    assert "--adapter-memory" in out and "--adapter-host-memory" in out


# --- policy --------------------------------------------------------------------------------------------


def test_least_recently_used_idle_runs_page_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    size = _one_run_bytes(tiny_model_dir, tmp_path)
    engine = _engine(tiny_model_dir, tmp_path, int(2.5 * size))  # room for two runs
    for name in "abcd":
        engine.create_run(str(tiny_model_dir), LORA, run_id=name)
        engine.forward_backward_many([_op(name, 0)])
        engine.optim_step(name)
        engine.forward_backward_many([_op(name, 1)])
    engine.paging.settle()
    assert [engine.paging.tier(n) for n in "abcd"] == ["disk", "disk", "device", "device"]
    engine.forward_backward_many([_op("a", 2)])  # a comes back; c is now the least recently used
    engine.paging.settle()
    assert [engine.paging.tier(n) for n in "abcd"] == ["device", "disk", "disk", "device"]
    stats = engine.paging.stats()
    assert (stats.resident_runs, stats.host_runs, stats.disk_runs) == (2, 0, 2)
    assert stats.resident_bytes <= engine.config.adapter_memory
    assert stats.page_ins == 1 and stats.page_outs == 3


def test_a_queued_run_stays_and_an_idle_one_goes_first(tiny_model_dir: Path, tmp_path: Path) -> None:
    size = _one_run_bytes(tiny_model_dir, tmp_path)
    engine = _engine(tiny_model_dir, tmp_path, int(2.5 * size))
    for name in "abc":
        if name == "c":
            engine.paging.expect("a")  # the scheduler queued an op for a (the least recently used)
        engine.create_run(str(tiny_model_dir), LORA, run_id=name)
        engine.forward_backward_many([_op(name, 0)])
        engine.optim_step(name)
        engine.forward_backward_many([_op(name, 1)])
    engine.paging.settle()
    assert [engine.paging.tier(n) for n in "abc"] == ["device", "disk", "device"]


def test_a_queued_run_is_prefetched(tiny_model_dir: Path, tmp_path: Path) -> None:
    size = _one_run_bytes(tiny_model_dir, tmp_path)
    engine = _engine(tiny_model_dir, tmp_path, int(0.75 * size))  # room for one run with gradients
    for name in "ab":
        engine.create_run(str(tiny_model_dir), LORA, run_id=name)
        engine.forward_backward_many([_op(name, 0)])
    engine.paging.settle()
    assert engine.paging.tier("a") == "disk"
    engine.paging.expect("a")  # b is idle: it makes room, and a comes in before its op runs
    engine.paging.settle()
    assert [engine.paging.tier(n) for n in "ab"] == ["device", "disk"]
    stats = engine.paging.stats()
    assert stats.prefetches == 1 and stats.page_ins == 0
    engine.forward_backward_many([_op("a", 1)])
    assert engine.paging.stats().page_ins == 0  # the op did not wait


def test_the_scheduler_tells_the_pager_what_is_queued() -> None:
    told: list[tuple[str, str]] = []
    scheduler = Scheduler(
        on_run_busy=lambda r: told.append(("busy", r)), on_run_idle=lambda r: told.append(("idle", r))
    )
    scheduler.start()
    try:
        jobs = [scheduler.submit(Job(op="x", run_id="r", fn=lambda: 1)) for _ in range(3)]
        for job in jobs:
            job.wait_sync()
        scheduler.submit(Job(op="x", run_id=None, fn=lambda: 1)).wait_sync()  # run-less: nothing told
    finally:
        scheduler.stop()  # joins the worker: every release has happened
    assert told[0] == ("busy", "r") and told[-1] == ("idle", "r")
    assert told.count(("busy", "r")) == told.count(("idle", "r"))


# --- results are those of an engine that never pages ----------------------------------------------------


def test_a_pass_forms_only_of_runs_that_fit_the_budget_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    from eztinker.backend.local import LocalBackend

    size = _one_run_bytes(tiny_model_dir, tmp_path)
    engine = _engine(tiny_model_dir, tmp_path, int(2.5 * size))  # room for two runs
    for name in "abc":  # each holds `size`: weights, gradients and both moments
        engine.create_run(str(tiny_model_dir), LORA, run_id=name)
        engine.forward_backward_many([_op(name, 0)])
        engine.optim_step(name)
        engine.forward_backward_many([_op(name, 1)])
    fit = engine.paging.fit_together
    assert fit(["a"]) and fit(["a", "b"]) and fit(["a", "b", "a"]) and not fit(["a", "b", "c"])
    backend = LocalBackend(engine)
    try:
        assert backend.scheduler.runs_fit == fit  # the scheduler asks it of every companion (test_scheduler)
    finally:
        backend.stop()
    unbounded = LocalBackend(_engine(tiny_model_dir, tmp_path / "free", None))
    try:
        assert unbounded.scheduler.runs_fit is None
    finally:
        unbounded.stop()


def test_bit_identical_to_no_budget_with_more_runs_than_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    size = _one_run_bytes(tiny_model_dir, tmp_path)
    plain = _engine(tiny_model_dir, tmp_path / "plain", None)
    paged = _engine(tiny_model_dir, tmp_path / "paged", int(2.5 * size))  # 2 of 6 fit
    names = [f"run{i}" for i in range(6)]
    for engine in (plain, paged):
        for i, name in enumerate(names):
            lora = {**LORA, "seed": i, "r": 4 + 2 * (i % 3)}
            engine.create_run(str(tiny_model_dir), lora, run_id=name)
    for step in range(3):
        # Interleaved: pairs co-batched, single ops, an optim_step every other pass.
        for group in (names[0:2], names[4:6], names[2:3], names[3:4], names[1:4:2]):
            outs = [e.forward_backward_many([_op(n, step) for n in group]) for e in (plain, paged)]
            for a, b in zip(*outs, strict=True):
                assert a.loss == b.loss
                assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        for name in names[step % 2 :: 2]:
            a, b = (e.optim_step(name, AdamParams(learning_rate=1e-2)) for e in (plain, paged))
            assert a == b
    paged.paging.settle()
    assert paged.paging.stats().disk_runs >= 2 and paged.paging.stats().page_ins >= 6
    for name in names:
        _assert_same(_state(plain, name), _state(paged, name))
    samples = [
        e.sample(_tokens(5, 1), SamplingParams(seed=3), run_id="run0", num_samples=2).sequences[1].tokens
        for e in (plain, paged)
    ]
    assert samples[0] == samples[1]


def test_gradient_accumulation_survives_a_page_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    size = _one_run_bytes(tiny_model_dir, tmp_path)
    plain = _engine(tiny_model_dir, tmp_path / "plain", None)
    paged = _engine(tiny_model_dir, tmp_path / "paged", int(0.75 * size))  # one run with gradients
    for engine in (plain, paged):
        for name in "ab":
            engine.create_run(str(tiny_model_dir), LORA, run_id=name)
        engine.forward_backward_many([_op("a", 0)])  # a accumulates ...
        engine.forward_backward_many([_op("b", 0)])  # ... b's op pushes a out, gradients and all
    paged.paging.settle()
    assert paged.paging.tier("a") == "disk" and paged._runs["a"].params[0].grad is None
    for engine in (plain, paged):
        engine.forward_backward_many([_op("a", 1)])  # adds to the accumulated gradients
        engine.optim_step("a")
    _assert_same(_state(plain, "a"), _state(paged, "a"))


def test_the_page_directory_is_made_once_whichever_thread_is_first(tmp_path: Path) -> None:
    """An op's thread and the pager's thread may page out at once, each the first to need the directory:
    both get the same one, and it exists (a half-made one once failed a page-out on a clean machine)."""
    import threading

    from eztinker.engine.paging import Pager, PagingConfig

    pager = Pager(PagingConfig(device_bytes=1, page_dir=tmp_path / "pages"))
    start, seen = threading.Barrier(16), []

    def first() -> None:
        start.wait()
        directory = pager._page_dir()
        seen.append((directory, directory.is_dir()))

    threads = [threading.Thread(target=first) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pager.close()
    assert len({d for d, _ in seen}) == 1 and all(exists for _, exists in seen)


def test_paging_to_disk_and_back_restores_every_byte(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_model_dir, tmp_path, 1)  # nothing stays once idle
    engine.create_run(str(tiny_model_dir), LORA, run_id="a")
    engine.forward_backward_many([_op("a", 0)])
    engine.optim_step("a")
    engine.forward_backward_many([_op("a", 1)])
    before = _state(engine, "a")
    engine.paging.settle()
    assert engine.paging.tier("a") == "disk"
    page_ins = engine.paging.stats().page_ins
    pages = list((tmp_path / "pages").glob("*/a.safetensors"))
    assert len(pages) == 1 and not list((tmp_path / "pages").glob("*/.*"))  # whole, no temporary left
    run: TrainingRun = engine._runs["a"]
    assert all(p.numel() == 0 for p in run.params) and not run.optimizer.state[run.params[0]]
    assert engine.run_info("a").num_parameters > 0
    _assert_same(before, _state(engine, "a"))  # paged in by `using`
    engine.paging.settle()
    assert engine.paging.stats().page_ins == page_ins + 1
    assert engine.paging.tier("a") == "disk"


def test_checkpoints_of_a_paged_run_are_its_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = _engine(tiny_model_dir, tmp_path / "plain", None)
    paged = _engine(tiny_model_dir, tmp_path / "paged", 1)
    for engine in (plain, paged):
        engine.create_run(str(tiny_model_dir), LORA, run_id="a")
        engine.forward_backward_many([_op("a", 0)])
        engine.optim_step("a")
    paged.paging.settle()
    assert paged.paging.tier("a") == "disk"
    a = plain.save_state("a", tmp_path / "ckpt-plain")
    b = paged.save_state("a", tmp_path / "ckpt-paged")
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()


def test_deleting_a_paged_out_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_model_dir, tmp_path, 1)
    engine.create_run(str(tiny_model_dir), LORA, run_id="a")
    engine.forward_backward_many([_op("a", 0)])
    engine.paging.settle()
    assert engine.paging.tier("a") == "disk"
    engine.delete_run("a")
    assert not list((tmp_path / "pages").glob("*/*.safetensors"))
    assert engine.paging.stats().disk_runs == 0
    with pytest.raises(NotFoundError):
        engine.forward_backward("a", _op("a", 1).data)
    engine.create_run(str(tiny_model_dir), LORA, run_id="a")  # the id is free again
    engine.forward_backward("a", _op("a", 1).data)
    engine.paging.settle()
    assert engine.paging.stats().disk_runs == 1


def test_no_budget_pages_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_model_dir, tmp_path, None)
    engine.create_run(str(tiny_model_dir), LORA, run_id="a")
    engine.forward_backward_many([_op("a", 0)])
    stats = engine.paging.stats()
    assert not stats.enabled and stats.resident_runs == 0 and engine.paging.tier("a") == "device"
    assert not (tmp_path / "pages").exists()


# --- observability -------------------------------------------------------------------------------------


def test_metrics_and_dashboard_show_the_tiers(tiny_model_dir: Path, tmp_path: Path) -> None:
    import httpx

    import eztinker
    from eztinker import EZTinkerClient

    # A budget of one byte: every run pages out as soon as its op is over (in the op's thread).
    with eztinker.serve(data_dir=tmp_path / "data", models=[str(tiny_model_dir)], adapter_memory="1") as url:
        with EZTinkerClient(base_url=url) as client:
            for _ in range(2):
                run_id = client.create_run(str(tiny_model_dir), LORA)
                client.forward_backward(run_id, input_ids=_tokens(8, 3), target_ids=_tokens(8, 3)).result()
            client.forward_backward(run_id, input_ids=_tokens(8, 4), target_ids=_tokens(8, 4)).result()
        text = httpx.get(f"{url}/metrics").text
        paging = httpx.get(f"{url}/dashboard/api/stats").json()["paging"]
    assert 'eztinker_adapter_runs{tier="disk"} 2.0' in text
    assert 'eztinker_adapter_runs{tier="device"} 0.0' in text
    assert "eztinker_adapter_page_ins_total 3.0" in text  # each op's run was out
    assert "eztinker_adapter_page_in_seconds_total" in text
    assert "eztinker_adapter_memory_budget_bytes 1.0" in text
    assert paging["disk_runs"] == 2 and paging["resident_runs"] == 0 and paging["host_runs"] == 0
    assert paging["budget_bytes"] == 1 and paging["page_ins"] == 3 and paging["page_in_seconds"] > 0
