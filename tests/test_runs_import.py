"""`eztinker runs import DIR --base-model M` and `POST /v1/runs/import`: a PEFT LoRA adapter directory (here,
a run's checkpoint exported as PEFT) becomes a new run that computes what the original did and trains on;
an adapter that does not match what the caller states, or is not an adapter, is a 4xx naming the field."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import eztinker
from eztinker import EZTinkerClient
from eztinker.cli import adapter_archive, app

runner = CliRunner()
KEY, OTHER_KEY = "import-key", "other-key"


def ids(n: int, start: int = 7) -> list[int]:
    return [(start + 13 * i) % 900 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    data = tmp_path_factory.mktemp("import-data")
    with eztinker.serve(data_dir=data, models=[str(tiny_model_dir)], api_keys=[KEY, OTHER_KEY]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[EZTinkerClient]:
    with EZTinkerClient(base_url=server, api_key=KEY) as client:
        yield client


@pytest.fixture(scope="module")
def exported(client: EZTinkerClient, tiny_model_dir, tmp_path_factory) -> tuple[str, Path]:
    """A trained run (so its adapter is not the identity) and its checkpoint exported as a PEFT directory."""
    run_id = client.create_run(
        str(tiny_model_dir), lora_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    for _ in range(3):
        client.forward_backward(run_id, input_ids=[ids(16), ids(9, 5)])
        client.optim_step(run_id, learning_rate=2e-2).result()
    client.save_checkpoint(run_id, "ckpt")
    out = client.download_checkpoint(run_id, "ckpt", tmp_path_factory.mktemp("export") / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return run_id, out


def _post(server: str, archive: bytes, key: str = KEY, **params) -> httpx.Response:
    return httpx.post(
        f"{server}/v1/runs/import",
        content=archive,
        params=params,
        headers={"X-API-Key": key, "Content-Type": "application/x-tar"},
        timeout=120,
    )


def _logprobs(client: EZTinkerClient, run_id: str) -> list[float]:
    result = client.forward(run_id, input_ids=[ids(16), ids(9, 5)]).result()
    return [lp for row in result["logprobs"] for lp in row]


def test_cli_import_computes_what_the_original_did_and_trains_on(
    server: str, client: EZTinkerClient, exported, tiny_model_dir
) -> None:
    original, adapter_dir = exported
    targets = ["--target-module", "q_proj", "--target-module", "v_proj"]
    args = ["runs", "import", str(adapter_dir), "--base-model", str(tiny_model_dir), "--rank", "4", *targets]
    result = runner.invoke(app, [*args, "--run-id", "imported-1", "--url", server, "--api-key", KEY])
    assert result.exit_code == 0, result.output
    assert "imported-1" in result.output
    run = client.get_run("imported-1")
    assert run.base_model == str(tiny_model_dir) and run.lora_config.r == 4 and run.step == 0
    assert run.lora_config.lora_alpha == 8 and sorted(run.lora_config.target_modules or []) == [
        "q_proj",
        "v_proj",
    ]
    assert _logprobs(client, "imported-1") == pytest.approx(_logprobs(client, original), abs=1e-6)
    assert [c.name for c in client.get_checkpoints("imported-1")] == ["imported"]

    before = client.forward("imported-1", input_ids=[ids(16)]).result()["loss"]
    for _ in range(3):
        client.forward_backward("imported-1", input_ids=[ids(16)])
        client.optim_step("imported-1", learning_rate=1e-2).result()
    after = client.forward("imported-1", input_ids=[ids(16)]).result()["loss"]
    assert client.get_run("imported-1").step == 3 and after < before
    assert _logprobs(client, original) != pytest.approx(_logprobs(client, "imported-1"), abs=1e-6)


def test_route_imports_a_gzip_archive_in_a_directory_and_ignores_extras(
    server: str, client: EZTinkerClient, exported, tiny_model_dir, tmp_path
) -> None:
    original, adapter_dir = exported
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(adapter_dir, arcname="my-adapter")  # with eztinker.json / optimizer state, if any: ignored
        readme = tmp_path / "README.md"
        readme.write_text("hello")
        tar.add(readme, arcname="my-adapter/README.md")
    response = _post(server, buffer.getvalue(), base_model=str(tiny_model_dir))
    assert response.status_code == 201, response.text
    run_id = response.json()["run_id"]
    assert response.json()["step"] == 0
    assert _logprobs(client, run_id) == pytest.approx(_logprobs(client, original), abs=1e-6)
    # the run is its importer's: another key is answered as for a missing run
    with EZTinkerClient(base_url=server, api_key=OTHER_KEY) as other:
        assert run_id not in [r.run_id for r in other.get_runs()]
        assert httpx.get(f"{server}/v1/runs/{run_id}", headers={"X-API-Key": OTHER_KEY}).status_code == 404


def _with_config(adapter_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "changed"
    shutil.copytree(adapter_dir, copy)
    config_path = copy / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"lora_rank": 8}, "lora_rank"),
        ({"target_modules": ["q_proj"]}, "target_modules"),
        ({"target_modules": ["q_proj", "k_proj", "v_proj"]}, "target_modules"),
    ],
)
def test_a_stated_mismatch_is_refused_naming_the_field(
    server: str, exported, tiny_model_dir, params, field
) -> None:
    response = _post(server, adapter_archive(exported[1]), base_model=str(tiny_model_dir), **params)
    assert response.status_code == 422, response.text
    assert field in response.text


def test_another_base_model_is_refused(server: str, exported, tiny_model_dir, tmp_path) -> None:
    changed = _with_config(exported[1], tmp_path, base_model_name_or_path="Org/another-model")
    response = _post(server, adapter_archive(changed), base_model=str(tiny_model_dir))
    assert response.status_code == 422 and "base_model" in response.text, response.text
    # the same model under another path (hub id vs a local directory) is the same model
    same = tmp_path / "same"
    shutil.copytree(exported[1], same)
    config = json.loads((same / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = f"Org/{Path(str(tiny_model_dir)).name}"
    (same / "adapter_config.json").write_text(json.dumps(config))
    assert _post(server, adapter_archive(same), base_model=str(tiny_model_dir)).status_code == 201


def test_bad_archives_and_adapters_are_4xx(server: str, exported, tiny_model_dir, tmp_path) -> None:
    base = str(tiny_model_dir)
    not_tar = _post(server, b"this is not a tar archive", base_model=base)
    assert not_tar.status_code == 422 and "archive" in not_tar.text

    def tar_of(*files: tuple[str, bytes], link: str | None = None) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if link is not None:
                info = tarfile.TarInfo(link)
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
        return buffer.getvalue()

    config = (exported[1] / "adapter_config.json").read_bytes()
    weights = (exported[1] / "adapter_model.safetensors").read_bytes()
    no_weights = _post(server, tar_of(("adapter_config.json", config)), base_model=base)
    assert no_weights.status_code == 422 and "adapter_model.safetensors" in no_weights.text
    no_config = _post(server, tar_of(("adapter_model.safetensors", weights)), base_model=base)
    assert no_config.status_code == 422 and "adapter_config.json" in no_config.text
    climbing = _post(server, tar_of(("../adapter_config.json", config)), base_model=base)
    assert climbing.status_code == 422 and "climbs out" in climbing.text
    linked = _post(
        server, tar_of(("adapter_config.json", config), link="adapter_model.safetensors"), base_model=base
    )
    assert linked.status_code == 422 and "link" in linked.text
    garbage = _post(
        server,
        tar_of(("adapter_config.json", config), ("adapter_model.safetensors", b"x" * 64)),
        base_model=base,
    )
    assert garbage.status_code == 422, garbage.text
    dora = _with_config(exported[1], tmp_path, use_dora=True)
    refused = _post(server, adapter_archive(dora), base_model=base)
    assert refused.status_code == 422 and "dora" in refused.text.lower(), refused.text
    unknown_model = _post(server, adapter_archive(exported[1]), base_model=str(tmp_path / "no-such-model"))
    assert 400 <= unknown_model.status_code < 500, unknown_model.text
    no_key = _post(server, adapter_archive(exported[1]), key="wrong", base_model=base)
    assert no_key.status_code == 401


def test_cli_refuses_a_directory_that_is_not_an_adapter(server: str, tiny_model_dir, tmp_path) -> None:
    result = runner.invoke(
        app, ["runs", "import", str(tmp_path), "--base-model", str(tiny_model_dir), "--url", server]
    )
    assert result.exit_code == 1 and "not a PEFT adapter directory" in result.output
    mismatch = runner.invoke(
        app,
        ["runs", "import", str(tmp_path / "missing"), "--base-model", str(tiny_model_dir), "--url", server],
    )
    assert mismatch.exit_code == 1 and "not a directory" in mismatch.output
