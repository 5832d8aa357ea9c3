"""Server-side custom losses: the SDK's `create_custom_loss` upload, the allow-list interpreter
(`eztinker.engine.loss_graph`), and `forward_backward_custom(data, handle)` in one server round trip,
equal to the SDK's client-side path."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import httpx
import pytest
import torch

import eztinker
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.loss_graph import ALLOWED_FUNCTIONS, ALLOWED_METHODS, parse_loss_graph

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss  # noqa: E402

ALICE, BOB = "tml-alice-customloss", "tml-bob-customloss"
TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]
K = 3


# --- losses (module level: torch.fx traces them) -----------------------------------------------------


def ppo_like(logprobs, advantages, old_logprobs):
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum() + 0.1 * (logprobs**2).mean()
    return loss, {"custom/ratio:mean": ratio.mean()}


def topk_distill(logprobs, teacher):
    loss = -(teacher * logprobs).sum() + logprobs.logsumexp(dim=-1).pow(2).sum() * 0.01
    return loss, {"custom/topk:sum": logprobs.sum()}


def _upload(fn, ranks: dict[str, int]) -> dict[str, Any]:
    handle = trace_loss(fn, ranks, "sess-unit")
    return {
        "name": handle.name,
        "inputs": [i.model_dump() for i in handle.inputs],
        "graph": encode_graph(handle).model_dump(mode="json"),
    }


# --- the interpreter's allow-list --------------------------------------------------------------------


def test_interpreter_matches_the_traced_function() -> None:
    up = _upload(ppo_like, {"logprobs": 1, "advantages": 1, "old_logprobs": 1})
    graph = parse_loss_graph(up["name"], up["inputs"], up["graph"])
    assert graph.loss_fn_inputs == ("advantages", "old_logprobs")
    gen = torch.Generator().manual_seed(0)
    lp = (-torch.rand(7, generator=gen) * 3).requires_grad_(True)
    adv, old = torch.randn(7, generator=gen), -torch.rand(7, generator=gen) * 3
    loss, metrics = graph.evaluate(lp, adv, old)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    want, want_metrics = ppo_like(lp2, adv, old)
    want.backward()
    assert torch.equal(loss.detach(), want.detach())
    assert torch.equal(grad, lp2.grad)
    assert torch.equal(metrics["custom/ratio:mean"], want_metrics["custom/ratio:mean"])


def test_token_loss_fn_runs_each_datum_on_its_real_positions() -> None:
    up = _upload(topk_distill, {"logprobs": 2, "teacher": 2})
    graph = parse_loss_graph(up["name"], up["inputs"], up["graph"])
    lp = -torch.rand(2, 5, K)
    teacher = torch.rand(2, 5, K)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    per_datum, metrics = graph.token_loss_fn()(lp, {"teacher": teacher}, mask)
    assert per_datum.shape == (2,)
    want_loss, want_metrics = topk_distill(lp[1, :3], teacher[1, :3])
    assert torch.allclose(per_datum[1], want_loss)
    # Each metric comes back per datum, from the datum's own positions.
    assert metrics["custom/topk:sum"].shape == (2,)
    assert torch.allclose(metrics["custom/topk:sum"][1], want_metrics["custom/topk:sum"])


def _graph(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"format": 1, "nodes": [{"op": "placeholder", "name": "logprobs", "target": "logprobs"}, *nodes]}


def _out(ref: str) -> dict[str, Any]:
    return {
        "op": "output",
        "name": "output",
        "target": "output",
        "args": [{"tuple": [{"ref": ref}, {"dict": {}}]}],
    }


LP1 = [{"name": "logprobs", "rank": 1}]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"op": "call_function", "name": "boom", "target": "os.system", "args": ["echo hi"]},
            "node 'boom' calls os.system, which is not allowed",
        ),
        (
            {"op": "call_function", "name": "imp", "target": "builtins.__import__", "args": ["os"]},
            "node 'imp' calls builtins.__import__, which is not allowed",
        ),
        (
            {"op": "call_function", "name": "ev", "target": "builtins.eval", "args": ["1"]},
            "node 'ev' calls builtins.eval",
        ),
        ({"op": "get_attr", "name": "w", "target": "weight"}, "node 'w' reads attribute 'weight' (get_attr)"),
        ({"op": "call_module", "name": "lin", "target": "linear"}, "node 'lin' calls module 'linear'"),
        (
            {"op": "call_method", "name": "item", "target": "item", "args": [{"ref": "logprobs"}]},
            "node 'item' calls method 'item', which is not allowed",
        ),
        (
            {"op": "call_method", "name": "inplace", "target": "add_", "args": [{"ref": "logprobs"}, 1.0]},
            "node 'inplace' calls method 'add_'",
        ),
        (
            {
                "op": "call_function",
                "name": "cls",
                "target": "builtins.getattr",
                "args": [{"ref": "logprobs"}, "__class__"],
            },
            "node 'cls' reads attribute '__class__', which is not allowed",
        ),
        (
            {
                "op": "call_function",
                "name": "save",
                "target": "torch.save",
                "args": [{"ref": "logprobs"}, "/tmp/x"],
            },
            "node 'save' calls torch.save",
        ),
    ],
)
def test_a_disallowed_node_is_refused_by_name(node: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match="not allowed") as info:
        parse_loss_graph("bad", LP1, _graph(node, _out(node["name"])))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "graph",
    [
        {"nodes": []},  # no format
        {"format": 1, "nodes": "x"},
        _graph({"op": "call_method", "name": "s", "target": "sum", "args": [{"ref": "later"}]}, _out("s")),
        _graph({"op": "call_method", "name": "s", "target": "sum", "args": [{"pickle": "gASV"}]}, _out("s")),
        _graph(
            {"op": "call_method", "name": "s", "target": "sum", "args": [{"ref": "logprobs"}]}
        ),  # no output
        _graph({"op": "nonsense", "name": "s", "target": "sum"}, _out("s")),
    ],
)
def test_a_malformed_graph_is_refused(graph: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        parse_loss_graph("bad", LP1, graph)


def test_the_allow_list_holds_no_escape_hatches() -> None:
    names = set(ALLOWED_FUNCTIONS)
    for forbidden in ("torch.load", "torch.save", "builtins.eval", "builtins.getattr", "torch.from_file"):
        assert forbidden not in names
    assert not any(m.endswith("_") for m in ALLOWED_METHODS)
    assert not {"item", "tolist", "numpy", "backward", "__reduce__"} & ALLOWED_METHODS


# --- against a live server, through the SDK ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_TELEMETRY", "0")
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        data_dir = tmp_path_factory.mktemp("custom-loss-data")
        with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[ALICE, BOB]) as url:
            yield url


@pytest.fixture(scope="module")
def alice(server):
    client = tinker.ServiceClient(base_url=server, api_key=ALICE)
    client.get_server_capabilities()
    yield client
    client.close("success").result()


def _data(topk: bool = False) -> list[types.Datum]:
    out = []
    for d, n in enumerate((10, 7)):
        tokens = TOKENS[d : d + n + 1]
        inputs: dict[str, Any]
        if topk:
            targets = torch.tensor([[t, (t + 1) % 900, (t + 5) % 900] for t in tokens[1:]])
            teacher = torch.softmax(torch.arange(n * K, dtype=torch.float32).reshape(n, K) / 7, dim=-1)
            inputs = {"target_tokens": targets, "teacher": teacher}
        else:
            inputs = {
                "target_tokens": tokens[1:],
                "advantages": torch.linspace(-1, 1, n) * (d + 1),
                "old_logprobs": torch.full((n,), -6.5),
                "weights": torch.ones(n),  # sent, not read by the loss
            }
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return out


def _logprobs(client, data) -> list[torch.Tensor]:
    plain = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]},
        )
        for d in data
    ]
    out = client.forward(plain, "cross_entropy").result()
    return [o["logprobs"].to_torch() for o in out.loss_fn_outputs]


@pytest.mark.parametrize(
    ("fn", "ranks", "topk"),
    [
        (ppo_like, {"logprobs": 1, "advantages": 1, "old_logprobs": 1}, False),
        (topk_distill, {"logprobs": 2, "teacher": 2}, True),
    ],
)
def test_server_side_custom_loss_equals_the_client_side_path(alice, tiny_model_dir, fn, ranks, topk) -> None:
    handle = alice.create_custom_loss(fn, ranks).result()
    assert handle.loss_id is not None  # uploaded: the server advertised custom_loss_server_side
    local = dataclasses.replace(handle, loss_id=None)  # the same traced loss, run by the SDK itself
    server_run = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)
    client_run = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)
    data = _data(topk)
    adam = types.AdamParams(learning_rate=1e-2, eps=1e-3)

    on_server = server_run.forward_backward_custom(data, handle).result()
    on_client = client_run.forward_backward_custom(data, local).result()
    server_run.optim_step(adam).result()
    client_run.optim_step(adam).result()

    a, b = on_server.metrics["loss:sum"], on_client.metrics["loss:sum"]
    assert math.isfinite(a) and abs(a - b) <= 1e-6 * max(1.0, abs(b)), (a, b)
    # The loss's own metrics come back as the SDK combines them: summed, or meaned for `:mean`, over datums.
    own = {k: v for k, v in on_client.metrics.items() if k.startswith("custom/")}
    assert own and own.keys() == {k for k in on_server.metrics if k.startswith("custom/")}
    for key, want in own.items():
        assert abs(on_server.metrics[key] - want) <= 1e-5 * max(1.0, abs(want)), (
            key,
            on_server.metrics[key],
            want,
        )
    for lp_s, lp_c in zip(on_server.loss_fn_outputs, on_client.loss_fn_outputs, strict=True):
        assert torch.allclose(lp_s["logprobs"].to_torch(), lp_c["logprobs"].to_torch(), atol=1e-6, rtol=0)
    # The weights after the step agree: both runs give the same log-probs, and they moved.
    before = _logprobs(
        alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0), data
    )
    after_s, after_c = _logprobs(server_run, data), _logprobs(client_run, data)
    for s, c, b0 in zip(after_s, after_c, before, strict=True):
        assert torch.allclose(s, c, atol=1e-6, rtol=0), (s - c).abs().max()
        assert not torch.allclose(s, b0, atol=1e-4)


def _raw_upload(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/create_custom_loss", json=body, headers={"X-API-Key": key}, timeout=60)


def test_a_disallowed_node_upload_is_a_4xx_naming_the_node(server) -> None:
    graph = _graph(
        {"op": "call_function", "name": "pwn", "target": "os.system", "args": ["touch /tmp/pwned"]},
        _out("pwn"),
    )
    body = {"session_id": "sess-raw", "custom_loss_seq_id": 0, "name": "pwn", "inputs": LP1, "graph": graph}
    response = _raw_upload(server, ALICE, body)
    assert 400 <= response.status_code < 500, response.text
    assert "node 'pwn' calls os.system, which is not allowed" in response.text


@pytest.mark.parametrize(
    "body",
    [
        {"session_id": "sess-raw", "custom_loss_seq_id": 1, "name": "x", "inputs": LP1},  # no graph
        {
            "session_id": "sess-raw",
            "custom_loss_seq_id": 2,
            "name": "x",
            "inputs": LP1,
            "graph": {"format": 2},
        },
        {
            "session_id": "sess-raw",
            "custom_loss_seq_id": 3,
            "name": "x",
            "inputs": [{"name": "logprobs", "rank": 7}],
            "graph": _graph(_out("logprobs")),
        },
    ],
)
def test_a_malformed_upload_is_a_4xx(server, body) -> None:
    response = _raw_upload(server, ALICE, body)
    assert 400 <= response.status_code < 500, response.text


def test_another_keys_loss_id_is_answered_like_a_missing_one(server, alice, tiny_model_dir) -> None:
    def neg_sum(logprobs):
        loss = -logprobs.sum()
        return loss, {}

    handle = alice.create_custom_loss(neg_sum, {"logprobs": 1}).result()
    assert handle.loss_id is not None
    bob = tinker.ServiceClient(base_url=server, api_key=BOB)
    try:
        bob.get_server_capabilities()
        run = bob.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                loss_fn_inputs={"target_tokens": TOKENS[1:]},
            )
        ]
        session = bob.holder.get_session_id()
        errors = []
        for loss_id in (handle.loss_id, "loss-missing"):
            stolen = dataclasses.replace(handle, session_id=session, loss_id=loss_id)
            with pytest.raises(Exception) as info:
                run.forward_backward_custom(data, stolen).result()
            errors.append(re.sub(r"req-[0-9a-f]+", "REQ", str(info.value).replace(loss_id, "ID")))
        assert "no custom loss" in errors[0]
        assert errors[0] == errors[1]
        assert run.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0  # Bob is unharmed
    finally:
        bob.close("success").result()


def test_custom_names_are_reserved(server, alice, tiny_model_dir) -> None:
    def mean_lp(logprobs):
        loss = -logprobs.mean()
        return loss, {}

    loss_id = alice.create_custom_loss(mean_lp, {"logprobs": 1}).result().loss_id
    run = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)
    with pytest.raises(Exception, match="unknown loss_fn"):
        run.forward_backward(_data(), f"custom/{loss_id}").result()


def test_a_node_making_a_huge_tensor_fails_naming_it() -> None:
    def pairwise(logprobs):
        table = logprobs.unsqueeze(0) * logprobs.unsqueeze(1)  # T x T
        loss = table.sum()
        return loss, {}

    up = _upload(pairwise, {"logprobs": 1})
    graph = parse_loss_graph(up["name"], up["inputs"], up["graph"])
    graph.evaluate(-torch.rand(100))  # 10k elements: within the limit
    with pytest.raises(InvalidInputError, match=r"node 'mul' \(operator.mul\) makes a tensor of 90000"):
        graph.evaluate(-torch.rand(300))


def test_an_uploaded_loss_outlives_a_server_restart(tmp_path, tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    data_dir = tmp_path / "data"
    ranks = {"logprobs": 1, "advantages": 1, "old_logprobs": 1}
    results = []
    handle = None
    for _ in range(2):  # the second server reads the loss back from the store
        with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[ALICE]) as url:
            client = tinker.ServiceClient(base_url=url, api_key=ALICE)
            try:
                client.get_server_capabilities()
                if handle is None:
                    handle = client.create_custom_loss(ppo_like, ranks).result()
                own = dataclasses.replace(handle, session_id=client.holder.get_session_id())
                run = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)
                results.append(run.forward_backward_custom(_data(), own).result().metrics["loss:sum"])
            finally:
                client.close("success").result()
    assert math.isfinite(results[0]) and results[0] == pytest.approx(results[1], rel=1e-6, abs=1e-6)


def test_a_metric_that_is_not_a_scalar_is_refused_naming_it() -> None:
    def per_token_metric(logprobs):
        return -logprobs.sum(), {"custom/per_token:sum": logprobs}

    up = _upload(per_token_metric, {"logprobs": 1})
    graph = parse_loss_graph(up["name"], up["inputs"], up["graph"])
    with pytest.raises(InvalidInputError, match="custom/per_token:sum.*scalar"):
        graph.evaluate(-torch.rand(4))
