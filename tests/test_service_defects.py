"""The service under a demanding user: deleting a run takes its checkpoints with it, and bad settings
(a loss parameter, an optimizer value, a base model name) are refused when given, naming the field, with
the run as it was — never a failed job later, never a 5xx. A lost run's hint names a checkpoint that can
resume it."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

import eztinker
import eztinker.engine.checkpoint.disk as disk
from eztinker import EZTinkerClient
from eztinker.engine import Datum, DimuonParams, register_loss_function
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.errors import NotFoundError as EngineNotFoundError
from eztinker.engine.losses import unregister_loss_function
from eztinker.engine.optimizers import Dimuon
from eztinker.exceptions import ConflictError, JobFailedError, ValidationError
from eztinker.models import api
from eztinker.service import Service
from eztinker.service.access import PUBLIC_CHECKPOINTS
from eztinker.service.checkpoints import CHECKPOINT_EXPIRY
from eztinker.service.imports import import_adapter
from eztinker.settings import Settings

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(16)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[Service, EZTinkerClient, str]]:
    service = Service(
        Settings(data_dir=tmp_path_factory.mktemp("service-defects"), models=[str(tiny_model_dir)])
    )
    with eztinker.serve(service=service) as url, EZTinkerClient(base_url=url) as client:
        yield service, client, url


def trained_run(client: EZTinkerClient, model: str, run_id: str, **kwargs) -> str:
    client.create_run(model, lora_config={"r": 2}, run_id=run_id, **kwargs)
    client.forward_backward(run_id, input_ids=TOKENS)
    client.optim_step(run_id, learning_rate=1e-2).result()
    return run_id


# --- deleting a run ------------------------------------------------------------------------------------


def test_deleting_a_run_deletes_its_checkpoints_files_records_publication_and_expiry(
    served, tiny_model_dir
) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "doomed")
    client.save_checkpoint(run_id, "published")
    client.save_checkpoint(run_id, "expiring", kind="weights")
    service.access.set_public(run_id, "published", True, None)
    service.checkpoints.set_expiry(run_id, "expiring", 4102444800.0, None)
    run_dir = service.settings.checkpoint_dir / run_id
    assert (run_dir / "published").is_dir()

    client.delete_run(run_id)

    assert not run_dir.exists()  # nothing left on disk that no route could reach
    assert service.store.list_checkpoints(run_id=run_id, include_all=True) == []
    assert service.durable.records(PUBLIC_CHECKPOINTS, include_all=True, prefix=f"{run_id}/") == []
    assert service.durable.records(CHECKPOINT_EXPIRY, include_all=True, prefix=f"{run_id}/") == []
    # A new run of the same id starts clean: no old checkpoint, and one of the same name starts private.
    client.create_run(str(tiny_model_dir), lora_config={"r": 2}, run_id=run_id)
    assert client.get_checkpoints(run_id) == []
    client.save_checkpoint(run_id, "published")
    assert not service.access.is_public(run_id, "published")
    client.delete_run(run_id)


def test_ops_queued_for_a_deleted_run_fail_and_never_reach_a_new_run_of_its_id(
    tmp_path, tiny_model_dir
) -> None:
    service = Service(
        Settings(data_dir=tmp_path, models=[str(tiny_model_dir)])
    )  # not started: ops stay queued
    try:
        service.create_run(_create(str(tiny_model_dir), "reused"), None)
        queued = service.forward_backward("reused", [Datum.from_labels(TOKENS)], None, None)
        service.delete_run("reused", None)
        assert queued.status == "failed" and "was deleted before this op ran" in str(queued.error)
        assert queued.error_category == "user"  # the owner's doing, not the server's
        service.create_run(_create(str(tiny_model_dir), "reused"), None)
        assert service.scheduler.snapshot() == []  # nothing of the old run's is waiting for the new one
    finally:
        service.stop()


def test_a_copy_of_a_deleted_runs_checkpoint_stays_whole(served, tiny_model_dir) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "copied-from")
    client.save_checkpoint(run_id, "kept")
    copy = service.checkpoints.copy(run_id, "kept", None, new_run_id="the-copy")

    client.delete_run(run_id)

    assert (Path(copy.path) / "adapter_model.safetensors").is_file()
    assert [c.name for c in client.get_checkpoints("the-copy")] == ["kept"]
    trained = client.create_run(
        str(tiny_model_dir), from_checkpoint={"run_id": "the-copy", "name": "kept"}, run_id="from-copy"
    )
    assert client.get_run(trained).step == 1
    client.delete_run("from-copy")
    client.delete_run("the-copy")


def test_copying_a_checkpoint_whose_files_went_meanwhile_makes_no_empty_copy(served, tiny_model_dir) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "vanishing-source")
    shutil.rmtree(client.save_checkpoint(run_id, "c")["adapter_path"])  # as a run delete racing the copy does
    with pytest.raises(EngineNotFoundError, match="deleted while being copied"):
        service.checkpoints.copy(run_id, "c", None, new_run_id="empty-copy")
    assert service.store.get_run("empty-copy") is None
    assert not (service.settings.checkpoint_dir / "empty-copy").exists()
    client.delete_run(run_id)


def test_an_expiry_that_is_no_time_is_refused_and_deletes_nothing(served, tiny_model_dir) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "nan-ttl")
    client.save_checkpoint(run_id, "c")
    for never in (float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="finite"):
            service.checkpoints.set_expiry(run_id, "c", never, None)
    assert service.checkpoints.sweep_expired() == []
    assert [c.name for c in client.get_checkpoints(run_id)] == ["c"]
    client.delete_run(run_id)


def test_downloading_a_checkpoint_whose_files_went_is_a_404_and_leaves_no_archive(
    served, tiny_model_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, client, url = served
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the server builds archives
    run_id = trained_run(client, str(tiny_model_dir), "vanished-download")
    shutil.rmtree(client.save_checkpoint(run_id, "c")["adapter_path"])  # as a delete racing the download does
    answer = httpx.get(f"{url}/v1/runs/{run_id}/checkpoints/c/archive")
    assert answer.status_code == 404 and "has no files any more" in answer.json()["error"], answer.text
    assert list(tmp_path.iterdir()) == []
    client.delete_run(run_id)


def test_an_import_whose_checkpoint_cannot_be_recorded_keeps_no_run(
    served, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "exported")
    client.save_checkpoint(run_id, "c", kind="weights")
    archive = service.views.checkpoint_archive(run_id, "c", None)
    runs_before = {run.run_id for run in client.get_runs()}

    def database_down(record) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(service.store, "add_checkpoint", database_down)
    with pytest.raises(OSError):
        import_adapter(service, archive.read_bytes(), None, base_model=str(tiny_model_dir), run_id="imported")
    archive.unlink()
    assert {run.run_id for run in client.get_runs()} == runs_before
    assert not (service.settings.checkpoint_dir / "imported").exists()
    client.delete_run(run_id)


def test_a_save_that_finishes_after_its_run_was_deleted_keeps_no_files(
    served, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "deleted-mid-save")
    original = service.backend.save

    def save_then_lose_the_run(*args, **kwargs):
        future = original(*args, **kwargs)
        future.result()  # the files are written...
        service.store.delete_run(run_id)  # ...and the run is deleted before the save is recorded
        return future

    monkeypatch.setattr(service.backend, "save", save_then_lose_the_run)
    with pytest.raises(JobFailedError, match="was deleted while checkpoint 'late' was being saved"):
        client.save_checkpoint(run_id, "late")
    assert not (service.settings.checkpoint_dir / run_id).exists()


def test_a_run_delete_cut_short_by_a_crash_is_undone_or_finished_at_the_next_start(
    tmp_path, tiny_model_dir
) -> None:
    settings = Settings(data_dir=tmp_path, models=[str(tiny_model_dir)])
    service = Service(settings)
    service.start()
    try:
        for run_id in ("kept", "gone"):
            service.create_run(_create(str(tiny_model_dir), run_id), None)
            service.checkpoints.save(run_id, _save("c"), None).future.result()
        # A crash after the directories were set aside: `kept`'s rows were never deleted, `gone`'s were.
        kept_aside = service.checkpoints.set_aside("kept")
        service.checkpoints.set_aside("gone")
        service.store.delete_run("gone")
        assert kept_aside is not None and not (settings.checkpoint_dir / "kept").exists()
    finally:
        service.stop()

    restarted = Service(settings)
    restarted.start()
    try:
        kept = restarted.store.get_checkpoint("kept", "c")
        assert kept is not None and (Path(kept.path) / "adapter_model.safetensors").is_file()
        assert sorted(p.name for p in settings.checkpoint_dir.iterdir()) == ["kept"]
    finally:
        restarted.stop()


# --- a checkpoint save that runs out of disk ----------------------------------------------------------


def test_a_save_that_runs_out_of_disk_leaves_no_half_checkpoint_and_says_what_to_do(
    served, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "disk-full")
    before = client.save_checkpoint(run_id, "kept")
    real_put = disk._put

    def fills_the_disk(file: Path, content, recipients):
        if file.name == "optimizer.safetensors":  # a file or two written, then no space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(file, content, recipients)

    monkeypatch.setattr(disk, "_put", fills_the_disk)
    for name, overwrite in (("fresh", False), ("kept", True)):
        answer = service.checkpoints.save(run_id, api.SaveRequest(name=name, overwrite=overwrite), None)
        job = answer.future.result()
        assert job.status == "failed" and "disk is full" in str(job.error) and "save again" in str(job.error)
    monkeypatch.undo()
    run_dir = service.settings.checkpoint_dir / run_id
    assert sorted(p.name for p in run_dir.iterdir()) == ["kept"]  # no half checkpoint, no hidden leftover
    assert [c.name for c in client.get_checkpoints(run_id)] == ["kept"]
    assert (
        client.get_checkpoints(run_id)[0].size_bytes
        == service.store.get_checkpoint(run_id, "kept").size_bytes
    )
    assert Path(before["adapter_path"], "optimizer.safetensors").is_file()
    client.delete_run(run_id)


def test_a_replacing_save_or_import_cut_short_by_a_crash_is_tidied_at_the_next_start(
    tmp_path, tiny_model_dir
) -> None:
    settings = Settings(data_dir=tmp_path, models=[str(tiny_model_dir)])
    service = Service(settings)
    service.start()
    try:
        service.create_run(_create(str(tiny_model_dir), "swapped"), None)
        service.checkpoints.save("swapped", _save("a"), None).future.result()
        service.checkpoints.save("swapped", _save("b"), None).future.result()
    finally:
        service.stop()
    run_dir = settings.checkpoint_dir / "swapped"
    # `a`: the crash came after the old one was renamed aside, before the new one took its place;
    # `b`: after the new one was written beside it, before the swap.
    os.rename(run_dir / "a", run_dir / ".a.old-0123456789ab")
    shutil.copytree(run_dir / "b", run_dir / ".b.new-0123456789ab")
    staging = settings.checkpoint_dir / ".import.eztinker-tmp-0123456789ab"  # an import cut short
    shutil.copytree(run_dir / "b", staging)

    restarted = Service(settings)
    restarted.start()
    try:
        assert sorted(p.name for p in run_dir.iterdir()) == ["a", "b"]
        assert (run_dir / "a" / "adapter_model.safetensors").is_file()
        assert not staging.exists()
    finally:
        restarted.stop()


# --- a key's job quota ---------------------------------------------------------------------------------


def test_a_job_the_store_could_not_record_gives_its_place_in_the_keys_quota_back(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service(Settings(data_dir=tmp_path, api_keys=["key"], max_jobs_per_key=1))
    owner = service.access.owner_for_key("key")

    def database_down(record) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(service.store, "add_job", database_down)
    with pytest.raises(OSError):
        service.submit("noop", None, lambda: None, owner)
    assert service.limits.admit_job(owner)  # the failed submit holds no place: the key may queue again
    service.store.close()


# --- loss parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_config", "field", "message"),
    [
        ({"loss_type": "focal_loss", "focal_gamma": "x"}, "loss_config.focal_gamma", "must be a number"),
        ({"loss_type": "focal_loss", "focal_gamma": [2]}, "loss_config.focal_gamma", "must be a number"),
        ({"loss_type": "focal_loss", "focal_gama": 2.0}, "loss_config.focal_gama", "takes no parameter"),
        (
            {"loss_type": "smooth_l1", "smooth_l1_beta": True},
            "loss_config.smooth_l1_beta",
            "must be a number",
        ),
    ],
)
def test_a_built_in_losss_bad_parameter_is_refused_when_the_run_is_created(
    served, tiny_model_dir, loss_config, field, message
) -> None:
    _, client, url = served
    answer = httpx.post(
        f"{url}/v1/runs", json={"base_model": str(tiny_model_dir), "loss_config": loss_config}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and message in answer.json()["error"]
    assert not any(run.loss_config.loss_type == loss_config["loss_type"] for run in client.get_runs())


def test_a_registered_losss_parameters_are_checked_against_its_signature(served, tiny_model_dir) -> None:
    _, client, _ = served

    def temperature_scaled(logits, labels, weights=None, *, temperature: float = 1.0, **kwargs):
        z = logits[:, :-1].float() / temperature
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    register_loss_function("defects_temperature", temperature_scaled)
    try:
        with pytest.raises(ValidationError, match=r"loss_config\.temperature: must be a number"):
            client.create_run(
                str(tiny_model_dir), loss_config={"loss_type": "defects_temperature", "temperature": "hot"}
            )
        # A name it does not declare reaches its **kwargs; a good value trains.
        run_id = client.create_run(
            str(tiny_model_dir),
            loss_config={"loss_type": "defects_temperature", "temperature": 2.0, "note": "anything"},
        )
        assert client.forward_backward(run_id, input_ids=TOKENS).result()["loss"] > 0
        client.delete_run(run_id)
    finally:
        unregister_loss_function("defects_temperature")


def test_a_bad_loss_parameter_of_one_op_is_refused_and_the_run_trains_on(served, tiny_model_dir) -> None:
    _, client, url = served
    run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 2})
    body = {"data": [{"input_ids": TOKENS}], "loss_config": {"loss_type": "focal_loss", "focal_alpha": "a"}}
    answer = httpx.post(f"{url}/v1/runs/{run_id}/forward_backward", json=body)
    assert answer.status_code == 422 and answer.json()["field"] == "loss_config.focal_alpha", answer.text
    assert client.forward_backward(run_id, input_ids=TOKENS).result()["loss"] > 0
    client.delete_run(run_id)


# --- optimizer values ----------------------------------------------------------------------------------


def test_an_adamw_value_beyond_float32_is_refused_naming_it_and_the_run_is_unchanged(
    served, tiny_model_dir
) -> None:
    _, client, url = served
    run_id = trained_run(client, str(tiny_model_dir), "adam-overflow")
    client.forward_backward(run_id, input_ids=TOKENS)
    for name in ("learning_rate", "weight_decay", "grad_clip_norm"):
        answer = httpx.post(f"{url}/v1/runs/{run_id}/optim_step", json={name: 1e300})
        assert answer.status_code == 422 and answer.json()["field"] == name, answer.text
        assert "out of range" in answer.json()["error"]
    assert client.get_run(run_id).step == 1
    assert client.optim_step(run_id, learning_rate=1e-2).result()["step"] == 2
    client.delete_run(run_id)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (DimuonParams(learning_rate=1e-2, rank_lr_correction_exponent=-1e300), "rank_lr_correction_exponent"),
        (
            DimuonParams(learning_rate=1e-2, rank_lr_correction_exponent=-1000.0),
            "rank_lr_correction_exponent",
        ),
        (DimuonParams(learning_rate=1e38, rank_lr_correction_exponent=-1.0), "learning_rate"),
    ],
)
def test_a_dimuon_rate_that_overflows_is_refused_before_the_step(
    served, tiny_model_dir, params, field
) -> None:
    service, client, _ = served
    run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 2}, optimizer="dimuon")
    with pytest.raises(InvalidInputError) as refused:
        service.optim_step(run_id, params, None)
    assert refused.value.field == f"optimizer_params.{field}"
    assert client.get_run(run_id).step == 0
    client.delete_run(run_id)


def test_a_dimuon_step_whose_rate_overflows_changes_nothing_even_unchecked() -> None:
    weight = torch.nn.Parameter(torch.randn(2, 8))
    weight.grad = torch.randn(2, 8)
    optimizer = Dimuon([weight], rank=2)
    optimizer.set_hyperparameters(DimuonParams(learning_rate=1e-2, rank_lr_correction_exponent=-1e300))
    before = weight.detach().clone()
    with pytest.raises(InvalidInputError, match="rank_lr_correction_exponent"):
        optimizer.step()
    assert torch.equal(weight.detach(), before) and optimizer.state[weight] == {}


# --- resuming a lost run -------------------------------------------------------------------------------


def lose(service: Service, run_id: str) -> None:
    """What a restart does to a run: its adapter is gone from memory, and the store says it is lost."""
    service.backend.delete_run(run_id)
    service.store.update_run(run_id, status="lost")
    service.forget(run_id)


def test_a_lost_runs_hint_names_its_latest_state_checkpoint_not_a_newer_weights_one(
    served, tiny_model_dir
) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "lost-with-state")
    client.save_checkpoint(run_id, "state-1")
    client.save_checkpoint(run_id, "weights-1", kind="weights")
    lose(service, run_id)
    with pytest.raises(ConflictError, match=r"its latest is 'state-1' \(step 1\), POST"):
        client.forward(run_id, input_ids=TOKENS)
    assert client.load_checkpoint(run_id, "state-1").status == "active"
    client.delete_run(run_id)


def test_a_lost_run_with_weights_only_is_told_its_optimizer_starts_afresh(served, tiny_model_dir) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "lost-weights-only")
    client.save_checkpoint(run_id, "weights-1", kind="weights")
    lose(service, run_id)
    with pytest.raises(ConflictError, match=r"'weights-1' \(step 1\) \(weights only: its optimizer state"):
        client.forward(run_id, input_ids=TOKENS)
    client.delete_run(run_id)


def test_a_lost_run_whose_first_load_fails_still_resumes_from_a_good_checkpoint(
    served, tiny_model_dir
) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "lost-bad-load")
    client.save_checkpoint(run_id, "good")
    broken = Path(client.save_checkpoint(run_id, "broken")["adapter_path"])
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    lose(service, run_id)
    with pytest.raises(JobFailedError, match="unreadable adapter_model.safetensors"):
        client.load_checkpoint(run_id, "broken")
    assert client.get_run(run_id).status == "lost"
    assert client.load_checkpoint(run_id, "good").status == "active"
    assert client.forward(run_id, input_ids=TOKENS).result()["loss"] > 0
    client.delete_run(run_id)


def test_two_loads_queued_on_a_lost_run_both_load(served, tiny_model_dir) -> None:
    service, client, _ = served
    run_id = trained_run(client, str(tiny_model_dir), "lost-two-loads")
    client.save_checkpoint(run_id, "c")
    lose(service, run_id)
    first, second = (service.load(run_id, api.LoadRequest(name="c"), None) for _ in range(2))
    assert [first.future.result().status, second.future.result().status] == ["completed", "completed"]
    assert client.get_run(run_id).status == "active"
    client.delete_run(run_id)


# --- base model names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_model", "message"),
    [
        ("x" * 5000, "(5000 characters) is not a usable path"),
        ("/nonexistent/model", "path '/nonexistent/model' does not exist on the server"),
        ("./no/such/model", "does not exist on the server"),
        ("/nonexistent/model.gguf", "GGUF file '/nonexistent/model.gguf' does not exist"),
        ("not a repo!", "is neither a path on the server nor a Hugging Face repo id"),
    ],
)
def test_a_base_model_that_is_no_path_nor_repo_id_is_a_422_naming_base_model(
    served, base_model, message
) -> None:
    _, _, url = served
    answer = httpx.post(f"{url}/v1/runs", json={"base_model": base_model}, timeout=60)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "base_model" and message in answer.json()["error"]
    assert len(answer.text) < 1000  # a long name is not echoed back whole


def _create(model: str, run_id: str) -> api.CreateRunRequest:
    return api.CreateRunRequest(base_model=model, lora_config={"r": 2}, run_id=run_id)


def _save(name: str) -> api.SaveRequest:
    return api.SaveRequest(name=name)
