"""Conformance with the official `tinker` SDK (0.38.0): every public method of its clients and every `tinker`
CLI command, against a live EZTinker server on the tiny model.

The methods are enumerated by introspection (`public_methods`) and every call this file makes is recorded,
so a method a new SDK adds shows up in `test_every_sdk_method_and_cli_command_is_driven` as untested. A
method or command is either driven here against the server (served), or listed in `NOT_SERVED` with the
reason; each of those is checked to get a clear 4xx (400, "not served ...": never a 404 or a 500), and the
README's "What is not served" list is checked against `NOT_SERVED`.

Run the whole file: the last two tests check what the ones before drove.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import eztinker

tinker = pytest.importorskip("tinker")
from click.testing import CliRunner  # noqa: E402
from tinker import types  # noqa: E402
from tinker.cli.__main__ import main_cli  # noqa: E402

KEY, OTHER_KEY = "tml-conformance", "tml-conformance-other"
README = Path(__file__).resolve().parents[1] / "README.md"
CLIENTS = {
    "ServiceClient": tinker.ServiceClient,
    "TrainingClient": tinker.TrainingClient,
    "SamplingClient": tinker.SamplingClient,
    "RestClient": tinker.RestClient,
    "AdminClient": tinker.AdminClient,
}

# What EZTinker deliberately does not serve, and why. A method's `_async` twin shares its entry. Each is
# checked to be answered 400 "... is not served by EZTinker: <reason>"; README.md lists the same names.
NOT_SERVED = {
    "RestClient.get_audit_log": "a self-hosted server keeps no organization audit log",
    "RestClient.get_billing_usage": "a self-hosted server bills nothing",
    "AdminClient.get_audit_log": "a self-hosted server keeps no organization audit log",
    "AdminClient.get_billing_usage": "a self-hosted server bills nothing",
    "tinker billing usage": "a self-hosted server bills nothing",
    "GET /api/v1/audit": "the audit log route (AdminClient.get_audit_log)",
    "GET /api/v1/billing/usage/events": "the billing route (AdminClient.get_billing_usage)",
    "DELETE /api/v1/auth/apikey/me": "keys are the server's configuration (--api-key), not revoked by a client",
}
# CLI commands that run on the client and need what this offline test cannot reach. Driven as far as it goes.
CLIENT_SIDE = {
    "tinker checkpoint push-hf": "uploads to the Hugging Face Hub from the client (its download is served)",
}


def public_methods(cls: type) -> list[str]:
    """The public methods (and static methods) of an SDK client class, inherited ones included."""
    return sorted(
        name
        for name in dir(cls)
        if not name.startswith("_")
        and not isinstance(inspect.getattr_static(cls, name), property)
        and callable(getattr(cls, name))
    )


def cli_commands() -> list[str]:
    """Every `tinker` command, from the CLI's own (lazy) groups."""
    import click

    ctx = click.Context(main_cli)
    names = []
    for group_name in main_cli.list_commands(ctx):
        group = main_cli.get_command(ctx, group_name)
        if isinstance(group, click.Group):
            names += [f"tinker {group_name} {name}" for name in group.list_commands(ctx)]
        else:
            names.append(f"tinker {group_name}")
    return sorted(names)


# --- recording what this file drives ------------------------------------------------------------------------

CALLED: set[str] = set()
CLI_RAN: set[str] = set()


def _recording(qualname: str, raw: Any) -> Any:
    fn = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code.co_filename == __file__:  # only what this file calls itself
            CALLED.add(qualname)
        return fn(*args, **kwargs)

    if isinstance(raw, staticmethod):
        return staticmethod(wrapper)
    if isinstance(raw, classmethod):
        return classmethod(wrapper)
    return wrapper


@pytest.fixture(scope="module", autouse=True)
def _record_calls() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for class_name, cls in CLIENTS.items():
            for name in public_methods(cls):
                mp.setattr(cls, name, _recording(f"{class_name}.{name}", inspect.getattr_static(cls, name)))
        yield


# --- the server and the clients -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_API_KEY", KEY)
        mp.setenv("TINKER_TELEMETRY", "0")
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.delenv("TINKER_PROJECT_ID", raising=False)
        yield mp


@pytest.fixture(scope="module")
def server(env, tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    data = tmp_path_factory.mktemp("conformance-data")
    with eztinker.serve(data_dir=data, models=[str(tiny_model_dir)], api_keys=[KEY, OTHER_KEY]) as url:
        env.setenv("TINKER_BASE_URL", url)
        yield url


@pytest.fixture(scope="module")
def service_client(server: str) -> Iterator[Any]:
    client = tinker.ServiceClient(base_url=server, project_id="proj-conformance")
    assert client.get_server_capabilities().supported_models  # the REST holder first (see test_tinker_sdk)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def training(service_client, tiny_model_dir) -> Any:
    return _resolve(
        service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
    )


@pytest.fixture(scope="module")
def rest(server: str) -> Any:
    return tinker.RestClient()


TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


def _datum(tokens: list[int] = TOKENS) -> Any:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _resolve(value: Any) -> Any:
    """An SDK future's result (a client-creation future, an APIFuture), or the value itself."""
    result = getattr(value, "result", None)
    return result() if callable(result) else value


def _run(coroutine: Any) -> Any:
    """A deprecated `*_async` method's coroutine, awaited on a loop of its own."""
    return asyncio.run(coroutine)


def _neg_sum(logprobs):
    return -logprobs.sum(), {}


# --- ServiceClient and TrainingClient -----------------------------------------------------------------------


def test_service_client(service_client, training, tiny_model_dir, server) -> None:
    base = str(tiny_model_dir)
    caps = _run(service_client.get_server_capabilities_async())
    assert base in [m.model_name for m in caps.supported_models]
    other = _run(service_client.create_lora_training_client_async(base_model=base, rank=4, seed=1))
    assert other.get_info().model_data.model_name == base
    state = training.save_state("svc-state").result().path
    for make in (
        lambda: service_client.create_training_client_from_state(state),
        lambda: _run(service_client.create_training_client_from_state_async(state)),
        lambda: service_client.create_training_client_from_state_with_optimizer(state),
        lambda: _run(service_client.create_training_client_from_state_with_optimizer_async(state)),
    ):
        restored = _resolve(make())
        assert restored.get_info().model_data.model_name == base
    sampler_path = training.save_weights_for_sampler("svc-sampler").result().path
    for sampler in (
        _resolve(service_client.create_sampling_client(model_path=sampler_path)),
        _resolve(_run(service_client.create_sampling_client_async(base_model=base))),
    ):
        assert sampler.get_base_model() == base
    assert service_client.create_rest_client().get_training_run(training.model_id).result().lora_rank == 4
    copied = service_client.copy_weights(state).result()
    assert copied.startswith("tinker://") and copied != state
    assert service_client.get_console_url().startswith("https://")
    assert service_client.get_telemetry() is None  # TINKER_TELEMETRY=0
    handle = service_client.create_custom_loss(_neg_sum, {"logprobs": 1}).result()
    assert handle.loss_id is not None  # uploaded: the server runs it
    assert training.forward_backward_custom([_datum()], handle).result().metrics


def test_training_client(training) -> None:
    assert training.get_info().model_data.model_name and _run(training.get_info_async()).model_data
    assert training.get_tokenizer().encode("hello")
    fb = training.forward_backward([_datum()], "cross_entropy").result()
    assert len(fb.loss_fn_outputs[0]["logprobs"].data) == len(TOKENS) - 1
    assert _run(training.forward_backward_async([_datum()], "cross_entropy")).result().metrics
    assert training.forward([_datum()], "cross_entropy").result().metrics["loss:sum"] > 0
    assert _run(training.forward_async([_datum()], "cross_entropy")).result().metrics

    def custom(data, logprobs_list):
        loss = sum((lp**2).sum() for lp in logprobs_list)
        return loss, {"custom:sum": float(loss.detach())}

    assert "custom:sum" in training.forward_backward_custom([_datum()], custom).result().metrics
    assert _run(training.forward_backward_custom_async([_datum()], custom)).result().metrics
    adam = types.AdamParams(learning_rate=1e-2)
    assert training.optim_step(adam).result() is not None
    assert _run(training.optim_step_async(adam)).result() is not None

    state = training.save_state("tc-state").result().path
    assert _run(training.save_state_async("tc-state-2")).result().path.endswith("tc-state-2")
    training.load_state(state).result()
    _run(training.load_state_async(state)).result()
    training.load_state_with_optimizer(state).result()
    _run(training.load_state_with_optimizer_async(state)).result()

    sampler_path = training.save_weights_for_sampler("tc-sampler").result().path
    assert _run(training.save_weights_for_sampler_async("tc-sampler-2")).result().path
    for sampler in (
        training.save_weights_and_get_sampling_client(),
        _run(training.save_weights_and_get_sampling_client_async()),
        training.create_sampling_client(sampler_path),
        _run(training.create_sampling_client_async(sampler_path)),
    ):
        assert sampler.get_base_model() == training.get_info().model_data.model_name
    external = training.save_weights_external("tc-external").result().path
    assert "external_weights" in external
    assert "external_weights" in _run(training.save_weights_external_async("tc-external-2")).result().path
    assert training.get_console_url().startswith("https://")
    assert training.get_telemetry() is None


def test_sampling_client(training, service_client) -> None:
    sampler = _resolve(training.save_weights_and_get_sampling_client())  # the client, not its future
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=4, stop=[], seed=1)
    result = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    assert len(result.sequences) == 2 and all(len(s.tokens) == 4 for s in result.sequences)
    assert len(_run(sampler.sample_async(prompt, num_samples=1, sampling_params=params)).sequences) == 1
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()
    assert logprobs[0] is None and len(logprobs) == len(TOKENS)
    assert len(_run(sampler.compute_logprobs_async(types.ModelInput.from_ints(TOKENS)))) == len(TOKENS)
    base = sampler.get_base_model()
    assert _run(sampler.get_base_model_async()) == base
    assert sampler.get_tokenizer().encode("hi")
    handle = sampler.get_sampler_handle()
    again = tinker.SamplingClient.from_sampler_handle(handle)
    assert again.sample(prompt, num_samples=1, sampling_params=params).result().sequences
    created = _resolve(tinker.SamplingClient.create(service_client.holder, base_model=base))
    assert created.get_base_model() == base
    from tinker.lib.api_future_impl import QueueState

    sampler.on_queue_state_change(QueueState.PAUSED_CAPACITY, "a test")  # logs; a client-side callback
    assert sampler.get_telemetry() is None


# --- RestClient and AdminClient -----------------------------------------------------------------------------


def test_rest_client_runs_and_checkpoints(rest, training, tiny_model_dir) -> None:
    run_id = training.model_id
    path = training.save_state("rest-state").result().path
    checkpoint_id = path.removeprefix(f"tinker://{run_id}/")
    assert str(tiny_model_dir) in [
        m.model_name for m in rest.get_server_capabilities().result().supported_models
    ]
    assert rest.get_training_run(run_id).result().training_run_id == run_id
    assert _run(rest.get_training_run_async(run_id)).training_run_id == run_id
    assert rest.get_training_run_by_tinker_path(path).result().training_run_id == run_id
    assert _run(rest.get_training_run_by_tinker_path_async(path)).training_run_id == run_id
    assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4
    assert run_id in [r.training_run_id for r in rest.list_training_runs().result().training_runs]
    assert _run(rest.list_training_runs_async()).training_runs
    assert checkpoint_id in [c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints]
    assert _run(rest.list_checkpoints_async(run_id)).checkpoints
    assert path in [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints]
    assert _run(rest.list_user_checkpoints_async()).checkpoints

    rest.publish_checkpoint_from_tinker_path(path).result()
    assert _listed(rest, run_id, checkpoint_id).public
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    _run(rest.publish_checkpoint_from_tinker_path_async(path))
    _run(rest.unpublish_checkpoint_from_tinker_path_async(path))
    assert not _listed(rest, run_id, checkpoint_id).public
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    assert _listed(rest, run_id, checkpoint_id).expires_at is not None
    _run(rest.set_checkpoint_ttl_from_tinker_path_async(path, None))
    assert _listed(rest, run_id, checkpoint_id).expires_at is None

    external = training.save_weights_external("rest-external").result().path
    urls = rest.get_external_weights_urls(external).result().urls
    assert "adapter_config.json" in urls and httpx.get(urls["adapter_config.json"]).status_code == 200
    assert _run(rest.get_external_weights_urls_async(external)).urls

    copied = rest.copy_weights(path, destination_project_id="proj-a").result()
    assert copied.startswith("tinker://")
    copied_async = _run(rest.copy_weights_async(path, destination_project_id="proj-a"))
    assert copied_async.startswith("tinker://") and copied_async != copied
    for target in (copied, copied_async):
        copy_run = target.removeprefix("tinker://").split("/", 1)[0]
        assert rest.get_training_run(copy_run).result().training_run_id == copy_run

    for name in ("del-1", "del-2", "del-3", "del-4"):
        training.save_state(name).result()
    rest.delete_checkpoint(run_id, "weights/del-1").result()
    _run(rest.delete_checkpoint_async(run_id, "weights/del-2"))
    rest.delete_checkpoint_from_tinker_path(f"tinker://{run_id}/weights/del-3").result()
    _run(rest.delete_checkpoint_from_tinker_path_async(f"tinker://{run_id}/weights/del-4"))
    left = {c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert not left & {"weights/del-1", "weights/del-2", "weights/del-3", "weights/del-4"}


def _listed(rest, run_id: str, checkpoint_id: str) -> Any:
    return next(
        c for c in rest.list_checkpoints(run_id).result().checkpoints if c.checkpoint_id == checkpoint_id
    )


def test_rest_client_sessions_identity_and_samplers(rest, service_client, training, tiny_model_dir) -> None:
    session_id = training.model_id.split(":train:")[0]
    finished = tinker.ServiceClient(project_id="proj-finished")  # a second session, closed by its client
    assert _resolve(finished.create_sampling_client(base_model=str(tiny_model_dir))).get_base_model()
    finished.close("success").result()
    assert session_id in rest.list_sessions().result().sessions
    assert _run(rest.list_sessions_async()).sessions
    assert training.model_id in rest.get_session(session_id).result().training_run_ids
    assert _run(rest.get_session_async(session_id)).training_run_ids
    rest.assign_session_project(session_id, "proj-b").result()
    _run(rest.assign_session_project_async(session_id, "proj-c"))

    found = rest.search_sessions(types.SessionSearchRequest(session_id=session_id)).result()
    assert [s.session_id for s in found.sessions] == [session_id]
    summary = found.sessions[0]
    assert summary.project_id == "proj-c" and summary.status is not None and summary.status.type == "active"
    assert summary.checkpoints_count > 0 and summary.checkpoint_storage_bytes
    pages = rest.search_sessions(types.SessionSearchRequest(limit=1)).result()
    assert len(pages.sessions) == 1 and pages.next_cursor is not None
    second = rest.search_sessions(types.SessionSearchRequest(limit=1, cursor=pages.next_cursor)).result()
    assert second.sessions[0].session_id != pages.sessions[0].session_id
    finished = types.SessionSearchRequest(
        statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])]
    )
    closed = rest.search_sessions(finished).result().sessions
    assert closed and all(s.status.type == "client_finished" for s in closed)
    assert session_id not in [s.session_id for s in closed]
    none = rest.search_sessions(types.SessionSearchRequest(display_name="no such session")).result()
    assert none.sessions == [] and none.next_cursor is None

    url = rest.export_session_trace(session_id).result()
    trace = httpx.get(url).json()  # a signed URL: no key
    names = {e["name"] for e in trace["traceEvents"]}
    assert {"forward_backward", "optim_step", "save"} <= names
    assert _run(rest.export_session_trace_async(session_id)).startswith("http")
    assert httpx.get(url.replace("token=", "token=0")).status_code == 404

    me = rest.whoami().result()
    assert (
        me.user_urn.startswith("tml:user:") and me.org_urn == "tml:organization:eztinker" and me.email is None
    )
    other = tinker.RestClient(api_key=OTHER_KEY)
    assert other.whoami().result().user_urn != me.user_urn
    # another key reaches none of it: its search finds nothing, and the session is answered as missing
    assert other.search_sessions(types.SessionSearchRequest(session_id=session_id)).result().sessions == []
    with pytest.raises(tinker.NotFoundError):
        other.export_session_trace(session_id).result()

    sampler = _resolve(training.save_weights_and_get_sampling_client())
    sampler_id = sampler._sampling_session_id
    assert rest.get_sampler(sampler_id).result().base_model == training.get_info().model_data.model_name
    assert _run(rest.get_sampler_async(sampler_id)).base_model
    usage = rest.get_current_checkpoint_storage_usage().result()
    assert sum(item.checkpoint_count for item in usage.data) > 0
    assert _run(rest.get_current_checkpoint_storage_usage_async()).data
    assert rest.get_telemetry() is None


def test_admin_client(server, training) -> None:
    admin = tinker.AdminClient()
    usage = admin.get_current_checkpoint_storage_usage().result()
    assert usage.data and usage.effective_rate_usd_per_gigabyte_month is None
    assert _run(admin.get_current_checkpoint_storage_usage_async()).data
    assert admin.get_telemetry() is None


def test_not_served_methods_are_a_clear_400(rest, server) -> None:
    from datetime import date

    admin = tinker.AdminClient()
    calls: dict[str, Callable[[], Any]] = {
        "RestClient.get_audit_log": lambda: rest.get_audit_log().result(),
        "RestClient.get_audit_log_async": lambda: _run(rest.get_audit_log_async()),
        "RestClient.get_billing_usage": lambda: rest.get_billing_usage("2026-01-01", "2026-02-01").result(),
        "RestClient.get_billing_usage_async": lambda: _run(
            rest.get_billing_usage_async("2026-01-01", "2026-02-01")
        ),
        "AdminClient.get_audit_log": lambda: admin.get_audit_log(day=date(2026, 1, 1)).result(),
        "AdminClient.get_audit_log_async": lambda: _run(admin.get_audit_log_async()),
        "AdminClient.get_billing_usage": lambda: admin.get_billing_usage("2026-01-01", "2026-02-01").result(),
        "AdminClient.get_billing_usage_async": lambda: _run(
            admin.get_billing_usage_async("2026-01-01", "2026-02-01")
        ),
    }
    for name, call in calls.items():
        with pytest.raises(tinker.BadRequestError) as refused:
            call()
        assert refused.value.status_code == 400 and "not served by EZTinker" in str(refused.value), name
        assert NOT_SERVED[name.removesuffix("_async")] in str(refused.value), name
    for route in (r for r in NOT_SERVED if r.split(" ")[0] in ("GET", "DELETE")):
        method, path = route.split(" ")
        response = httpx.request(method, server + path, headers={"X-API-Key": KEY})
        assert response.status_code == 400 and "not served by EZTinker" in response.text, route


def test_the_jwt_exchange(server) -> None:
    """`POST /auth/token` (what the SDK does first, then sends the JWT as its key): the JWT acts as its key's
    owner; a tampered one, or one sent with no key behind it, is a 401 marked invalid_token."""
    import base64

    def as_key(key: str) -> httpx.Response:
        return httpx.get(f"{server}/api/v1/training_runs", headers={"X-API-Key": key})

    jwt = httpx.post(f"{server}/api/v1/auth/token", json={}, headers={"X-API-Key": KEY}).json()["jwt"]
    other = httpx.post(f"{server}/api/v1/auth/token", json={}, headers={"X-API-Key": OTHER_KEY}).json()["jwt"]
    assert as_key(jwt).json() == as_key(KEY).json() and as_key(other).json() == as_key(OTHER_KEY).json()
    header, payload, signature = jwt.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["own"] = claims["own"][::-1]  # someone else's owner id, unsigned
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for rejected in (
        f"{header}.{forged}.{signature}",
        f"{header}.{payload}.{signature[::-1]}",
        "eyJnot-a-jwt",
    ):
        response = as_key(rejected)
        # RFC 6750's invalid_token: on it the SDK exchanges its API key for a new JWT and replays the request
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    wrong_key = httpx.post(f"{server}/api/v1/auth/token", json={}, headers={"X-API-Key": "wrong"})
    assert (
        wrong_key.status_code == 401 and "WWW-Authenticate" not in wrong_key.headers
    )  # a new JWT won't help


def test_a_jwt_expires_and_goes_with_its_key(tmp_path) -> None:
    from eztinker.service import Access, AuthenticationError
    from eztinker.service.access import hash_key
    from eztinker.service.identity import JWT_SECONDS, mint
    from eztinker.store import Store

    url, owner = f"sqlite:///{tmp_path / 'db.sqlite'}", hash_key(KEY)
    with Store(url) as store:
        access = Access([KEY], store)
        token = mint(access, owner)
        assert access.owner_for_key(token) == owner
        with pytest.raises(AuthenticationError):
            access.owner_for_key(mint(access, owner, now=time.time() - JWT_SECONDS - 1))
    with Store(url) as restarted:  # the signing secret is in the database: a token outlives a restart
        assert Access([KEY], restarted).owner_for_key(token) == owner
    with Store(url) as reconfigured, pytest.raises(AuthenticationError):  # its key is no longer the server's
        Access([OTHER_KEY], reconfigured).owner_for_key(token)


# --- the `tinker` CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


def cli(*args: str, input: str | None = None, ok: bool = True) -> Any:
    """`tinker ARGS` in this process (its console script is `main_cli` wrapped in `TinkerCliError` handling)."""
    words = list(args[2:] if args[:1] in (("-f",), ("--format",)) else args)
    CLI_RAN.add(" ".join(["tinker", *words[: 1 if words[0] == "version" else 2]]))
    result = runner.invoke(main_cli, list(args), input=input)
    if ok:
        assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def test_cli_auth(server) -> None:
    login = cli("auth", "login", input=f"{KEY}\n")
    assert "Logged in as" in login.output and "Stored API key 'eztinker-" in login.output
    credentials = json.loads((Path.home() / ".tinker" / "credentials.json").read_text())
    assert credentials["default"] is not None
    assert "Tinker accessible: yes" in cli("auth", "status").output
    me = json.loads(cli("-f", "json", "auth", "whoami").output)
    assert me["org_urn"] == "tml:organization:eztinker"
    assert "Removed credential" in cli("auth", "logout").output
    bad = cli("auth", "login", input="not-a-key\n", ok=False)
    assert bad.exit_code != 0 and "HTTP 401" in str(bad.exception.details)


def test_cli_models_runs_and_checkpoints(server, training, tmp_path) -> None:
    run_id = training.model_id
    path = training.save_state("cli-state").result().path
    models = json.loads(cli("-f", "json", "model", "list").output)["models"]
    assert models and models[0]["trainable"]
    runs = json.loads(cli("-f", "json", "run", "list").output)
    assert run_id in [r["training_run_id"] for r in runs["runs"]]
    assert json.loads(cli("-f", "json", "run", "info", run_id).output)["training_run_id"] == run_id
    assert path in cli("-f", "json", "checkpoint", "list").output
    assert path in cli("-f", "json", "checkpoint", "list", "--run-id", run_id).output
    assert json.loads(cli("-f", "json", "checkpoint", "info", path).output)["tinker_path"] == path
    cli("checkpoint", "publish", path)
    assert json.loads(cli("-f", "json", "checkpoint", "info", path).output)["public"] is True
    cli("checkpoint", "unpublish", path)
    cli("checkpoint", "set-ttl", path, "--ttl", "7200")
    assert json.loads(cli("-f", "json", "checkpoint", "info", path).output)["expires_at"] is not None
    cli("checkpoint", "set-ttl", path, "--remove")
    cli("checkpoint", "download", path, "--output", str(tmp_path / "dl"))
    downloaded = list((tmp_path / "dl").rglob("adapter_model.safetensors"))
    assert len(downloaded) == 1  # a PEFT adapter directory, exported through a training session
    assert "Deleted 1 checkpoint" in cli("checkpoint", "delete", path, "-y").output
    assert "tinker 0.38" in cli("version").output
    storage = json.loads(cli("-f", "json", "billing", "checkpoint-storage").output)
    assert storage["data"]
    refused = cli("billing", "usage", "2026-01-01", "2026-02-01", ok=False)
    assert refused.exit_code != 0 and "not served by EZTinker" in str(refused.exception.details)
    pushed = cli("checkpoint", "push-hf", f"tinker://{run_id}/weights/tc-state", "--repo-id", "x/y", ok=False)
    assert pushed.exit_code != 0 and isinstance(pushed.exception, SystemExit | Exception)


def test_cli_session_export_trace(server, training, tmp_path) -> None:
    session_id = training.model_id.split(":train:")[0]
    out = tmp_path / "trace.pftrace"
    cli("session", "export-trace", session_id, "--output", str(out))
    assert json.loads(out.read_text())["traceEvents"]
    url = cli("session", "export-trace", session_id, "--url-only").output.strip().splitlines()[-1]
    assert url.startswith("http") and "token=" in url


@pytest.mark.slow  # a process of its own pays `import tinker` again (~11 s of CPU)
def test_the_tinker_console_script_runs(server, training) -> None:
    """The installed `tinker` entry point itself, in a process of its own (the env carries the URL and key)."""
    script = Path(sys.executable).parent / "tinker"
    done = subprocess.run(
        [str(script), "-f", "json", "run", "info", training.model_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["training_run_id"] == training.model_id


# --- what is covered ------------------------------------------------------------------------------------


def _not_served_or_twin(name: str) -> bool:
    return name in NOT_SERVED or name.removesuffix("_async") in NOT_SERVED


def test_every_sdk_method_and_cli_command_is_driven() -> None:
    """Every public method of the SDK's clients was called above (served), or is NOT_SERVED; the same for
    every `tinker` command. A method or command a new SDK adds fails here until it is driven or listed."""
    methods = {f"{c}.{m}" for c, cls in CLIENTS.items() for m in public_methods(cls)}
    untested = sorted(m for m in methods - CALLED if not _not_served_or_twin(m))
    assert not untested, f"SDK methods neither driven nor NOT_SERVED: {untested}"
    commands = set(cli_commands())
    untested_cli = sorted(commands - CLI_RAN - set(NOT_SERVED) - set(CLIENT_SIDE))
    assert not untested_cli, f"tinker commands neither driven nor NOT_SERVED: {untested_cli}"
    stale = sorted(n for n in NOT_SERVED if n.startswith(tuple(CLIENTS)) and n not in methods)
    assert not stale, f"NOT_SERVED names methods the SDK no longer has: {stale}"


_NAME = re.compile(
    r"`((?:"
    + "|".join(CLIENTS)
    + r")\.\w+|tinker [a-z-]+ [a-z-]+|(?:GET|POST|PUT|DELETE) /api/v1/[\w/{}.-]+)`"
)


def test_readme_not_served_list_matches() -> None:
    """The README's "Refused with a 400" list (under "What is not served") names exactly NOT_SERVED:
    methods, commands and routes in backticks."""
    text = README.read_text()
    section = text[text.index("### What is not served") :]
    block = section[section.index("- **Refused with a 400**") :].splitlines()
    lines = [block[0], *itertools.takewhile(lambda line: not line.startswith("- "), block[1:])]
    listed = set(_NAME.findall(" ".join(line.strip() for line in lines)))
    assert listed == set(NOT_SERVED), (
        f"in README, not in NOT_SERVED: {sorted(listed - set(NOT_SERVED))}; "
        f"in NOT_SERVED, not in README: {sorted(set(NOT_SERVED) - listed)}"
    )
