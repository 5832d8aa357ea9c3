"""Key B walks every route of every surface against key A's objects, and reaches none of them.

Alice (key A) trains a run through the Tinker wire and leaves behind every kind of object a route can
name by id: a run, state / sampler / external checkpoints, a sampling session on her trained weights,
futures (request ids) holding her logprobs and samples, a native job, a Tinker session. Bob (key B)
then sends, to every route the server serves (read from its OpenAPI document, so a new route without a
case here fails `test_every_route_has_an_isolation_case`), the request that would reach Alice's object.

Each answer must be exactly what a missing id gets: 404 on plain routes, 410 "unknown request" from
`retrieve_future`, and a future that fails as "not found" where the Tinker wire answers with futures.
Listings must not show Alice's ids. Afterwards Alice's run, checkpoints, sampler and futures are
exactly as she left them, and her next op in `seq_id` order still runs (Bob's ops took no place in
her sequence).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

import eztinker

ALICE, BOB = "tml-alice-routes", "tml-bob-routes"
TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


def _post(url: str, key: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body or {}, headers={"X-API-Key": key}, timeout=60)


def _settled(url: str, key: str, response: httpx.Response) -> dict[str, Any]:
    """What a Tinker future answer settles to, long-polling as `key`."""
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    for _ in range(40):  # bounded: each poll returns within the server's long-poll window
        answer = _post(url, key, "/api/v1/retrieve_future", {"request_id": request_id})
        assert answer.status_code == 200, answer.text
        if answer.json().get("type") != "try_again":
            return answer.json()
    raise AssertionError(f"future {request_id} never settled")


def _datum(tokens: list[int]) -> dict[str, Any]:
    targets = [*tokens[1:], tokens[0]]
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]},
            "weights": {"data": [1.0] * len(tokens), "dtype": "float32", "shape": [len(tokens)]},
        },
    }


def _forward_body(model_id: str, seq_id: int) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "seq_id": seq_id,
        "forward_input": {"data": [_datum(TOKENS)], "loss_fn": "cross_entropy", "loss_fn_config": {}},
    }


def _sample_body(sampler_id: str, seq_id: int) -> dict[str, Any]:
    return {
        "sampling_session_id": sampler_id,
        "seq_id": seq_id,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:4]}]},
        "sampling_params": {"max_tokens": 3, "temperature": 1.0, "seed": 1},
        "prompt_logprobs": True,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A server with two keys, and every kind of object of Alice's (ids in the yielded dict)."""
    data_dir = tmp_path_factory.mktemp("isolation-routes")
    with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[ALICE, BOB]) as url:
        session = _post(url, ALICE, "/api/v1/create_session", {"tags": [], "sdk_version": "0.38.0"})
        session_id = session.json()["session_id"]
        created = _post(
            url,
            ALICE,
            "/api/v1/create_model",
            {
                "session_id": session_id,
                "model_seq_id": 0,
                "base_model": str(tiny_model_dir),
                "lora_config": {"rank": 4, "seed": 0},
            },
        )
        model_id = _settled(url, ALICE, created)["model_id"]
        fb = _forward_body(model_id, 1)
        fb["forward_backward_input"] = fb.pop("forward_input")
        assert "error" not in _settled(url, ALICE, _post(url, ALICE, "/api/v1/forward_backward", fb))
        step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}}
        assert "error" not in _settled(url, ALICE, _post(url, ALICE, "/api/v1/optim_step", step))
        state = _settled(
            url,
            ALICE,
            _post(url, ALICE, "/api/v1/save_weights", {"model_id": model_id, "path": "a-state", "seq_id": 3}),
        )["path"]
        sampler_ckpt = _settled(
            url,
            ALICE,
            _post(
                url,
                ALICE,
                "/api/v1/save_weights_for_sampler",
                {"model_id": model_id, "path": "a-smp", "seq_id": 4},
            ),
        )["path"]
        external = _settled(
            url,
            ALICE,
            _post(
                url,
                ALICE,
                "/api/v1/save_weights_external",
                {"model_id": model_id, "path": "a-ext", "seq_id": 5},
            ),
        )["path"]
        snapshot = _post(
            url,
            ALICE,
            "/api/v1/save_weights_for_sampler",
            {"model_id": model_id, "seq_id": 6, "sampling_session_seq_id": 0},
        )
        sampler_id = _settled(url, ALICE, snapshot)["sampling_session_id"]
        # Futures of Alice's that hold her trained weights' outputs: logprobs and a sample.
        forward_future = _post(url, ALICE, "/api/v1/forward", _forward_body(model_id, 7)).json()["request_id"]
        sample_future = _post(url, ALICE, "/api/v1/asample", _sample_body(sampler_id, 0)).json()["request_id"]
        job = httpx.post(
            f"{url}/v1/runs/{model_id}/forward",
            json={"data": [{"input_ids": TOKENS}]},
            headers={"X-API-Key": ALICE},
            timeout=60,
        )
        assert job.status_code == 202, job.text
        yield {
            "url": url,
            "model": str(tiny_model_dir),
            "session_id": session_id,
            "model_id": model_id,
            "state": state,
            "sampler_ckpt": sampler_ckpt,
            "external": external,
            "sampler_id": sampler_id,
            "forward_future": forward_future,
            "sample_future": sample_future,
            "job_id": job.json()["job_id"],
            "next_seq": 8,
        }


def _checkpoint_id(tinker_path: str) -> str:
    return tinker_path.split("/", 3)[3]  # tinker://<run>/<kind>/<name> -> <kind>/<name>


# Routes that name no object of anyone's: nothing of Alice's can be reached through them.
NO_OBJECT = {
    "POST /api/v1/client/config",
    "POST /api/v1/client/dynamic_config",
    "GET /api/v1/healthz",
    "GET /api/v1/get_server_capabilities",
    "POST /api/v1/create_session",
    "POST /api/v1/session_heartbeat",
    "POST /api/v1/telemetry",
    "POST /dashboard/api/tokens",
    "GET /dashboard/api/stats",
    "GET /health",
    "GET /metrics",
    "POST /v1/runs",
    "POST /v1/runs/import",  # makes a new run of the caller's
    "POST /api/v1/auth/token",  # the caller's own identity
    "GET /api/v1/auth/apikey/me",
    "DELETE /api/v1/auth/apikey/me",  # not served (400)
    "GET /api/v1/audit",  # not served (400)
    "GET /api/v1/billing/usage/events",  # not served (400)
}


OPENAI = (
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /v1/responses",
)
ANTHROPIC = ("POST /anthropic/api/v1/messages", "POST /anthropic/api/v1/messages/count_tokens")


def _cases(w: dict[str, Any]) -> dict[str, list[tuple[str, str, dict[str, Any] | None]]]:
    """`METHOD route` -> Bob's requests aimed at Alice's objects; the OpenAI and Anthropic routes under
    both of their prefixes."""
    cases = _native_tinker_openai_cases(w)
    for route in OPENAI:
        method, path = route.split(" ")
        hosted = path.replace("/v1/", "/oai/api/v1/", 1)
        cases[f"{method} {hosted}"] = [
            (m, p.replace("/v1/", "/oai/api/v1/", 1), b) for m, p, b in cases[route]
        ]
    for route in ANTHROPIC:
        method, path = route.split(" ")
        plain = path.replace("/anthropic/api/v1/", "/v1/", 1)
        cases[f"{method} {plain}"] = [
            (m, p.replace("/anthropic/api/v1/", "/v1/", 1), b) for m, p, b in cases[route]
        ]
    return cases


def _native_tinker_openai_cases(w: dict[str, Any]) -> dict[str, list[tuple[str, str, dict[str, Any] | None]]]:
    """`METHOD route` -> Bob's requests (method, concrete path, JSON body) aimed at Alice's objects."""
    run, sid, smp = w["model_id"], w["session_id"], w["sampler_id"]
    state_ckpt = _checkpoint_id(w["state"])
    ext = _checkpoint_id(w["external"])
    ckpt = f"/api/v1/training_runs/{run}/checkpoints/{state_ckpt}"
    fwd = {"data": [{"input_ids": TOKENS}]}
    return {
        "GET /v1/runs/{run_id}": [("GET", f"/v1/runs/{run}", None)],
        "DELETE /v1/runs/{run_id}": [("DELETE", f"/v1/runs/{run}", None)],
        "POST /v1/runs/{run_id}/forward_backward": [("POST", f"/v1/runs/{run}/forward_backward", fwd)],
        "POST /v1/runs/{run_id}/forward": [("POST", f"/v1/runs/{run}/forward", fwd)],
        "POST /v1/runs/{run_id}/optim_step": [("POST", f"/v1/runs/{run}/optim_step", {})],
        "POST /v1/runs/{run_id}/sample": [("POST", f"/v1/runs/{run}/sample", {"prompt_tokens": TOKENS[:3]})],
        "POST /v1/sample": [("POST", "/v1/sample", {"sampler_id": smp, "prompt_tokens": TOKENS[:3]})],
        "POST /v1/runs/{run_id}/save": [("POST", f"/v1/runs/{run}/save", {"name": "stolen"})],
        "POST /v1/runs/{run_id}/load": [("POST", f"/v1/runs/{run}/load", {"name": "a-state"})],
        "GET /v1/runs/{run_id}/checkpoints": [("GET", f"/v1/runs/{run}/checkpoints", None)],
        "GET /v1/runs/{run_id}/checkpoints/{name}/archive": [
            ("GET", f"/v1/runs/{run}/checkpoints/a-state/archive", None)
        ],
        "DELETE /v1/runs/{run_id}/checkpoints/{name}": [
            ("DELETE", f"/v1/runs/{run}/checkpoints/a-state", None)
        ],
        "GET /v1/runs/{run_id}/metrics": [("GET", f"/v1/runs/{run}/metrics", None)],
        "GET /v1/jobs/{job_id}": [("GET", f"/v1/jobs/{w['job_id']}", None)],
        "GET /api/v1/external_weights/{run_id}/{name}/{relpath}": [
            (
                "GET",
                f"/api/v1/external_weights/{run}/a-ext/adapter_config.json?expires=9999999999&token=x",
                None,
            )
        ],
        "POST /api/v1/sessions/{session_id}/finish": [("POST", f"/api/v1/sessions/{sid}/finish", {})],
        "GET /api/v1/sessions/{session_id}": [("GET", f"/api/v1/sessions/{sid}", None)],
        "GET /api/v1/sessions/{session_id}/trace_export": [
            ("GET", f"/api/v1/sessions/{sid}/trace_export", None)
        ],
        "GET /api/v1/session_traces/{session_id}": [
            ("GET", f"/api/v1/session_traces/{sid}?expires=9999999999&token=00", None)
        ],
        "POST /api/v1/sessions/search": [("POST", "/api/v1/sessions/search", {"session_id": sid})],
        "GET /api/v1/billing/usage/checkpoints/current": [
            ("GET", "/api/v1/billing/usage/checkpoints/current", None)
        ],
        "PUT /api/v1/sessions/{session_id}/project": [
            ("PUT", f"/api/v1/sessions/{sid}/project", {"project_id": "bobs"})
        ],
        "POST /api/v1/create_model": [
            (
                "POST",
                "/api/v1/create_model",
                {"session_id": sid, "model_seq_id": 5, "base_model": w["model"], "lora_config": {"rank": 2}},
            )
        ],
        "POST /api/v1/get_info": [("POST", "/api/v1/get_info", {"model_id": run})],
        "POST /api/v1/forward_backward": [("POST", "/api/v1/forward_backward", _fb_body(run, w["next_seq"]))],
        "POST /api/v1/forward": [("POST", "/api/v1/forward", _forward_body(run, w["next_seq"] + 1))],
        "POST /api/v1/optim_step": [
            ("POST", "/api/v1/optim_step", {"model_id": run, "seq_id": w["next_seq"], "adam_params": {}})
        ],
        "POST /api/v1/save_weights": [
            ("POST", "/api/v1/save_weights", {"model_id": run, "path": "stolen", "seq_id": w["next_seq"]})
        ],
        "POST /api/v1/save_weights_for_sampler": [
            ("POST", "/api/v1/save_weights_for_sampler", {"model_id": run, "seq_id": w["next_seq"]}),
            ("POST", "/api/v1/save_weights_for_sampler", {"model_id": run, "path": "x", "seq_id": 99}),
        ],
        "POST /api/v1/save_weights_external": [
            ("POST", "/api/v1/save_weights_external", {"model_id": run, "path": "x", "seq_id": w["next_seq"]})
        ],
        "POST /api/v1/load_weights": [
            ("POST", "/api/v1/load_weights", {"model_id": run, "path": w["state"], "seq_id": w["next_seq"]}),
            (
                "POST",
                "/api/v1/load_weights",
                {"session_id": "sess-bob", "model_seq_id": 0, "path": w["state"]},
            ),
            ("POST", "/api/v1/load_weights", {"session_id": sid, "model_seq_id": 7, "path": w["state"]}),
        ],
        "POST /api/v1/create_sampling_session": [
            (
                "POST",
                "/api/v1/create_sampling_session",
                {"session_id": "sess-bob", "model_path": w["sampler_ckpt"]},
            ),
            ("POST", "/api/v1/create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0}),
        ],
        "POST /api/v1/create_custom_loss": [  # in Alice's session: refused as a missing session
            ("POST", "/api/v1/create_custom_loss", _custom_loss_body(sid)),
        ],
        "GET /api/v1/samplers/{sampler_id}": [("GET", f"/api/v1/samplers/{smp}", None)],
        "POST /api/v1/asample": [("POST", "/api/v1/asample", _sample_body(smp, 0))],
        "GET /api/v1/training_runs/{run_id}": [("GET", f"/api/v1/training_runs/{run}", None)],
        "GET /api/v1/training_runs/{run_id}/checkpoints": [
            ("GET", f"/api/v1/training_runs/{run}/checkpoints", None)
        ],
        "POST /api/v1/weights_info": [("POST", "/api/v1/weights_info", {"tinker_path": w["state"]})],
        "POST /api/v1/copy_weights": [
            ("POST", "/api/v1/copy_weights", {"source_path": w["state"], "destination_project_id": "bobs"}),
            (
                "POST",
                "/api/v1/copy_weights",
                {"source_path": w["sampler_ckpt"], "destination_project_id": "b"},
            ),
        ],
        "POST /api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish": [
            ("POST", f"{ckpt}/publish", None)
        ],
        "DELETE /api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish": [
            ("DELETE", f"{ckpt}/publish", None)
        ],
        "PUT /api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/ttl": [
            ("PUT", f"{ckpt}/ttl", {"ttl_seconds": 7200})
        ],
        "GET /api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive": [
            ("GET", f"{ckpt}/archive", None)
        ],
        "GET /api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/external_weights_urls": [
            ("GET", f"/api/v1/training_runs/{run}/checkpoints/{ext}/external_weights_urls", None)
        ],
        "DELETE /api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}": [("DELETE", ckpt, None)],
        "POST /api/v1/retrieve_futures": [
            ("POST", "/api/v1/retrieve_futures", {"target": {"sampling_session_id": smp}, "timeout": 0})
        ],
        "POST /api/v1/join_sampling_session": [
            ("POST", "/api/v1/join_sampling_session", {"sampling_session_id": smp})
        ],
        "POST /api/v1/cancel_future": [
            ("POST", "/api/v1/cancel_future", {"request_id": w["sample_future"]}),
            ("POST", "/api/v1/cancel_future", {"request_id": w["forward_future"]}),
        ],
        "POST /api/v1/retrieve_future": [
            ("POST", "/api/v1/retrieve_future", {"request_id": w["forward_future"]}),
            ("POST", "/api/v1/retrieve_future", {"request_id": w["sample_future"]}),
            ("POST", "/api/v1/retrieve_future", {"request_id": w["job_id"]}),
        ],
        "POST /v1/completions": [
            ("POST", "/v1/completions", {"model": run, "prompt": "hi", "max_tokens": 2}),
            ("POST", "/v1/completions", {"model": smp, "prompt": "hi", "max_tokens": 2}),
            ("POST", "/v1/completions", {"model": w["sampler_ckpt"], "prompt": "hi", "max_tokens": 2}),
            ("POST", "/v1/completions", {"model": w["state"], "prompt": "hi", "max_tokens": 2}),
        ],
        "POST /v1/chat/completions": [
            (
                "POST",
                "/v1/chat/completions",
                {"model": smp, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
        ],
        "POST /v1/responses": [
            ("POST", "/v1/responses", {"model": m, "input": "hi", "max_output_tokens": 2})
            for m in (run, smp, w["sampler_ckpt"], f"{w['model']};{w['sampler_ckpt']}")
        ],
        "POST /anthropic/api/v1/messages": [
            (
                "POST",
                "/anthropic/api/v1/messages",
                {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            for m in (run, smp, w["sampler_ckpt"])
        ],
        "POST /anthropic/api/v1/messages/count_tokens": [
            (
                "POST",
                "/anthropic/api/v1/messages/count_tokens",
                {"model": m, "messages": [{"role": "user", "content": "hi"}]},
            )
            for m in (run, smp)
        ],
        "GET /dashboard/api/runs/{run_id}/checkpoints/{name}/merged": [
            ("GET", f"/dashboard/api/runs/{run}/checkpoints/a-state/merged", None)
        ],
        # Listings: answered, but without any of Alice's ids.
        "GET /v1/runs": [("GET", "/v1/runs", None)],
        "GET /v1/queue": [("GET", "/v1/queue", None)],
        "GET /api/v1/sessions": [("GET", "/api/v1/sessions", None)],
        "GET /api/v1/training_runs": [("GET", "/api/v1/training_runs", None)],
        "GET /api/v1/checkpoints": [("GET", "/api/v1/checkpoints", None)],
        "GET /v1/models": [("GET", "/v1/models", None)],
        "GET /v1/models/{model_id}": [("GET", f"/v1/models/{run}", None), ("GET", f"/v1/models/{smp}", None)],
        "GET /dashboard/api/runs": [("GET", "/dashboard/api/runs", None)],
        "GET /dashboard/api/samplers": [("GET", "/dashboard/api/samplers", None)],
        "GET /dashboard/api/events": [("GET", f"/dashboard/api/events?run={run}", None)],
    }


LISTINGS = {
    "GET /v1/runs",
    "POST /api/v1/sessions/search",
    "GET /api/v1/billing/usage/checkpoints/current",
    "GET /v1/queue",
    "GET /api/v1/sessions",
    "GET /api/v1/training_runs",
    "GET /api/v1/checkpoints",
    "GET /v1/models",
    "GET /oai/api/v1/models",
    "GET /dashboard/api/runs",
    "GET /dashboard/api/samplers",
}


def _custom_loss_body(session_id: str) -> dict[str, Any]:
    """A valid `create_custom_loss` upload: loss = -sum(logprobs)."""
    nodes = [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
        {"op": "call_method", "name": "sum_1", "target": "sum", "args": [{"ref": "logprobs"}]},
        {"op": "call_function", "name": "neg", "target": "operator.neg", "args": [{"ref": "sum_1"}]},
        {
            "op": "output",
            "name": "output",
            "target": "output",
            "args": [{"tuple": [{"ref": "neg"}, {"dict": {}}]}],
        },
    ]
    return {
        "session_id": session_id,
        "custom_loss_seq_id": 0,
        "name": "neg_sum",
        "inputs": [{"name": "logprobs", "rank": 1}],
        "graph": {"format": 1, "nodes": nodes},
    }


def _fb_body(model_id: str, seq_id: int) -> dict[str, Any]:
    body = _forward_body(model_id, seq_id)
    body["forward_backward_input"] = body.pop("forward_input")
    return body


def _served_routes(url: str) -> set[str]:
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    return {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}


def test_every_route_has_an_isolation_case(world) -> None:
    cases = _cases(world)
    missing = sorted(_served_routes(world["url"]) - set(cases) - NO_OBJECT)
    assert not missing, f"routes without an isolation case in this file: {missing}"


def _alice_ids(w: dict[str, Any]) -> list[str]:
    return [w["model_id"], w["sampler_id"], w["session_id"], w["forward_future"], w["sample_future"]]


def _is_refusal(url: str, route: str, response: httpx.Response) -> str | None:
    """None if `response` is what a missing id gets; else what is wrong with it."""
    if route == "POST /api/v1/retrieve_future":
        return None if response.status_code == 410 else f"{response.status_code} {response.text[:200]}"
    if response.status_code == 404:
        return None
    if response.status_code == 200 and route.startswith("POST /api/v1/") and "request_id" in response.text:
        settled = _settled(url, BOB, response)  # a future: it must fail as "not found"
        if re.search(
            r"(?i)no (run|sampler|sampling session|session|checkpoint)|not found", settled.get("error", "")
        ):
            return None
        return f"future settled as {settled}"
    return f"{response.status_code} {response.text[:200]}"


def _first_metrics_event(url: str, path: str, key: str) -> str:
    """The data of the first `metrics` event of the dashboard's event stream (then hangs up)."""
    with httpx.stream("GET", f"{url}{path}", headers={"X-API-Key": key}, timeout=30) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "metrics":
                return line.removeprefix("data: ")
    raise AssertionError("the stream ended without a metrics event")


def test_key_b_reaches_none_of_key_a_objects_on_any_route(world) -> None:
    url = world["url"]
    failures = []
    for route, requests in _cases(world).items():
        for method, path, body in requests:
            if route == "GET /dashboard/api/events":  # a stream: its metrics event says "no run"
                data = _first_metrics_event(url, path, BOB)
                if '"history":[]' not in data or "no run" not in data:
                    failures.append(f"{route}: {data[:200]}")
                continue
            response = httpx.request(
                method,
                f"{url}{path}",
                json=body if body is not None else None,
                headers={"X-API-Key": BOB},
                timeout=60,
            )
            if route in LISTINGS:
                leaked = [i for i in _alice_ids(world) if i in response.text]
                if response.status_code != 200 or leaked:
                    failures.append(f"{route}: {response.status_code}, shows {leaked}")
                continue
            problem = _is_refusal(url, route, response)
            if problem is not None:
                failures.append(f"{method} {path}: {problem}")
    assert not failures, "Bob reached Alice's objects:\n" + "\n".join(failures)


def test_a_wrong_owner_gets_the_same_answer_as_a_missing_id(world) -> None:
    url = world["url"]
    for path in (f"/api/v1/samplers/{world['sampler_id']}", f"/v1/jobs/{world['job_id']}"):
        theirs = httpx.get(f"{url}{path}", headers={"X-API-Key": BOB}, timeout=30)
        missing = httpx.get(f"{url}{path}-missing", headers={"X-API-Key": BOB}, timeout=30)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"].replace(path.rsplit("/", 1)[1], "ID") == missing.json()[
            "error"
        ].replace(path.rsplit("/", 1)[1] + "-missing", "ID")
    theirs = _post(url, BOB, "/api/v1/retrieve_future", {"request_id": world["sample_future"]})
    missing = _post(url, BOB, "/api/v1/retrieve_future", {"request_id": "req-missing"})
    assert theirs.status_code == missing.status_code == 410
    assert theirs.json()["category"] == missing.json()["category"]


def test_alice_finds_everything_as_she_left_it(world) -> None:
    """Runs after the walks above (file order): nothing of Alice's changed, and her sequence is intact."""
    url, run = world["url"], world["model_id"]
    assert httpx.get(f"{url}/v1/runs/{run}", headers={"X-API-Key": ALICE}, timeout=30).json()["step"] == 1
    names = {
        c["name"] for c in httpx.get(f"{url}/v1/runs/{run}/checkpoints", headers={"X-API-Key": ALICE}).json()
    }
    assert {"a-state"} <= {n.split(".", 1)[-1] for n in names} or "a-state" in str(names)
    assert "stolen" not in str(names)
    for future in (world["forward_future"], world["sample_future"]):
        assert "error" not in _post(url, ALICE, "/api/v1/retrieve_future", {"request_id": future}).text[:100]
    sample = _settled(url, ALICE, _post(url, ALICE, "/api/v1/asample", _sample_body(world["sampler_id"], 1)))
    assert "error" not in sample
    # Bob sent ops for Alice's model at her next seq_ids: her own ops at those ids still run, in order.
    step = {"model_id": run, "seq_id": world["next_seq"], "adam_params": {"learning_rate": 1e-2}}
    assert "error" not in _settled(url, ALICE, _post(url, ALICE, "/api/v1/optim_step", step))
    forward = _settled(
        url, ALICE, _post(url, ALICE, "/api/v1/forward", _forward_body(run, world["next_seq"] + 1))
    )
    assert "error" not in forward
    session = httpx.get(f"{url}/api/v1/sessions/{world['session_id']}", headers={"X-API-Key": ALICE}).json()
    assert run in session["training_run_ids"]
