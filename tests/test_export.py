"""Getting trained weights out: Tinker exports (age-encrypted or not), tinker-cookbook's weights tools, PEFT,
and `eztinker checkpoints export --merge`, on a base with tied embeddings and one without.

Behaviour as specification:
- `save_weights_external(..., age_encryption_recipients=[...])` stores and serves only `.age` files, so
  `tinker_cookbook.weights.download` of a training checkpoint (which exports encrypted to a key of its
  own, downloads and decrypts) ends with a plain adapter directory; an invalid recipient is a user error
  naming the field;
- the Tinker export names the unembedding as Tinker does (`model.unembed_tokens`), so the cookbook's
  `build_hf_model` and `build_lora_adapter` take a run trained with the SDK's default `train_unembed=True`:
  on an untied base both reproduce the server's log-probabilities; on a tied base the cookbook merges the
  head's delta into the shared weight (its design: the merged model keeps `tie_word_embeddings`), which is
  exact on an untied copy of the base;
- our own checkpoint directories load into `peft.PeftModel` with the server's log-probabilities;
- `eztinker checkpoints export --merge` unties a tied head before merging: the merged model equals the
  adapted one.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import eztinker
from eztinker.cli import app
from eztinker.engine import AdamParams, Datum, Engine, EngineConfig, InvalidInputError, checkpoint
from eztinker.engine.lora import Segment, routed
from eztinker.testing import make_tiny_model

tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker_cookbook")
pyrage = pytest.importorskip("pyrage")
from tinker import types  # noqa: E402
from tinker_cookbook import weights  # noqa: E402

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]
PROMPT = [(5 + 29 * i) % 900 + 3 for i in range(10)]  # scored, never trained on
ATOL = 1e-4
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The tiny Qwen2 of `tiny_model_dir`, with an output head of its own (tie_word_embeddings=False)."""
    out = tmp_path_factory.mktemp("tiny-qwen2-untied")
    return make_tiny_model(out, "qwen2", tokenizer_dir=tiny_tokenizer_dir, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def bases(tiny_model_dir, untied_model_dir) -> dict[str, Path]:
    tied = json.loads((tiny_model_dir / "config.json").read_text())
    assert tied.get("tie_word_embeddings", True) is True  # the shared fixture is a tied model
    return {"tied": tiny_model_dir, "untied": untied_model_dir}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bases, monkeypatch_module) -> str:
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    models = [str(bases["tied"]), str(bases["untied"])]
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("data"), models=models) as url:
        monkeypatch_module.setenv("TINKER_BASE_URL", url)
        yield url


@pytest.fixture(scope="module")
def service_client(server: str):
    client = tinker.ServiceClient(base_url=server)
    client.get_server_capabilities()
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def trained(service_client, bases) -> dict[str, tuple]:
    """Per base: an SDK training client (train_unembed=True, the default) moved away from B = 0, with a
    training checkpoint `ckpt`, and the server's log-probabilities of PROMPT under it."""
    out = {}
    for tie, base in bases.items():
        client = service_client.create_lora_training_client(base_model=str(base), rank=4, seed=0)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(TOKENS[:-1]),
            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
        )
        for _ in range(3):
            client.forward_backward([datum], "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        path = client.save_state("ckpt").result().path
        sampler = client.save_weights_and_get_sampling_client()
        logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
        out[tie] = (client, path, torch.tensor(logprobs[1:], dtype=torch.float32))
    return out


def hf_logprobs(model: torch.nn.Module, tokens: list[int] = PROMPT) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, as the server's compute_logprobs reports them."""
    model.eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def untied_copy(base: Path, out: Path) -> Path:
    """`base` saved with its output head as a weight of its own (same values): a base the cookbook can merge
    a head-only delta into exactly."""
    import shutil

    model = load_hf(base)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    for file in base.iterdir():
        if "token" in file.name or file.suffix in (".txt", ".jinja"):
            shutil.copy(file, out / file.name)
    return out


# --- age encryption -------------------------------------------------------------------------------------


def test_download_of_a_training_checkpoint_decrypts_to_a_loadable_adapter(
    server, service_client, trained, bases, tmp_path
) -> None:
    """The cookbook exports a `weights/` checkpoint encrypted to a fresh key, downloads, decrypts, deletes."""
    client, path, served = trained["untied"]
    out = tmp_path / "adapter"
    assert weights.download(tinker_path=path, output_dir=str(out), base_url=server) == str(out)
    files = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(name.endswith(".age") for name in files)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # The decrypted adapter is the run's: merged by the cookbook, it scores PROMPT as the server does.
    weights.build_hf_model(
        base_model=str(bases["untied"]), adapter_path=str(out), output_path=str(tmp_path / "m")
    )
    torch.testing.assert_close(hf_logprobs(load_hf(tmp_path / "m")), served, atol=ATOL, rtol=0)
    # ...and the temporary encrypted export is gone from the server.
    listed = service_client.create_rest_client().list_checkpoints(client.model_id).result().checkpoints
    assert not [c for c in listed if c.checkpoint_type == "external"]


def test_an_encrypted_export_serves_only_age_files(service_client, trained, tmp_path) -> None:
    client = trained["untied"][0]
    identity = pyrage.x25519.Identity.generate()
    recipients = [str(identity.to_public()), SSH_KEY]  # to several recipients, of both kinds
    saved = client.save_weights_external("sealed", age_encryption_recipients=recipients).result()
    urls = service_client.create_rest_client().get_external_weights_urls(saved.path).result().urls
    assert set(urls) >= {"adapter_config.json.age", "adapter_model.safetensors.age"}
    assert all(name.endswith(".age") for name in urls)  # nothing is served in the clear
    for name, url in urls.items():
        with urllib.request.urlopen(url) as answer:
            data = answer.read()
        assert data.startswith(b"age-encryption.org/v1\n")  # binary age, as `age -d` reads it
        plain = pyrage.decrypt(data, [identity])
        (tmp_path / name.removesuffix(".age")).write_bytes(plain)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.unembed_tokens.lora_A.weight" in tensors


def test_an_invalid_recipient_is_a_user_error_naming_the_field(service_client, trained) -> None:
    client = trained["untied"][0]
    cases = [
        (["age1notakey"], r"age_encryption_recipients\[0\]: 'age1notakey' is not an age recipient"),
        ([SSH_KEY, "ssh-ed25519 AAAAnope"], r"age_encryption_recipients\[1\]: .* is not an age recipient"),
        ([], "age_encryption_recipients: must be a non-empty list"),
        ([SSH_KEY] * 11, "age_encryption_recipients: names 11 recipients; at most 10"),
    ]
    for bad, message in cases:
        with pytest.raises(tinker.RequestFailedError, match=message):
            client.save_weights_external("refused", age_encryption_recipients=bad).result(timeout=30)
    listed = service_client.create_rest_client().list_checkpoints(client.model_id).result().checkpoints
    assert not [c for c in listed if "refused" in c.tinker_path]
    client.save_weights_external("after-refusals").result()  # the client still works


def test_encrypted_checkpoint_files_on_disk(bases, tmp_path) -> None:
    """No plaintext file is ever written; the server cannot read it back but can delete it."""
    engine = Engine(EngineConfig(device="cpu", dtype=torch.float32))
    run_id = engine.create_run(str(bases["tied"]), {"r": 2, "lora_alpha": 4, "seed": 0}).run_id
    identity = pyrage.x25519.Identity.generate()
    with pytest.raises(InvalidInputError, match="age_recipients"):
        engine.save_weights(run_id, tmp_path / "bad", age_recipients=["not a key"])
    assert not (tmp_path / "bad").exists()
    info = engine.save_weights(run_id, tmp_path / "sealed", age_recipients=[str(identity.to_public())])
    names = sorted(p.name for p in (tmp_path / "sealed").iterdir())
    assert names == [
        "adapter_config.json.age",
        "adapter_model.safetensors.age",
        "eztinker.json.age",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sealed"]  # no temporary directory left behind
    assert info.size_bytes == sum(p.stat().st_size for p in (tmp_path / "sealed").iterdir())
    config = json.loads(
        pyrage.decrypt((tmp_path / "sealed/adapter_config.json.age").read_bytes(), [identity])
    )
    assert config["r"] == 2
    with pytest.raises(InvalidInputError, match="encrypted"):
        checkpoint.read_checkpoint(tmp_path / "sealed")
    assert [c.path.name for c in checkpoint.list_checkpoints(tmp_path)] == ["sealed"]
    checkpoint.delete_checkpoint(tmp_path / "sealed")
    assert not (tmp_path / "sealed").exists()


# --- tinker-cookbook's weights tools --------------------------------------------------------------------


def test_cookbook_merge_and_adapter_on_an_untied_base(server, trained, bases, tmp_path) -> None:
    from peft import PeftModel

    client, _, served = trained["untied"]
    export = client.save_weights_external("cookbook").result().path
    adapter = Path(weights.download(tinker_path=export, output_dir=str(tmp_path / "a"), base_url=server))
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.unembed_tokens.lora_A.weight" in keys  # the head as Tinker names it
    assert not any(".lm_head." in k for k in keys)
    base = str(bases["untied"])
    assert (hf_logprobs(load_hf(bases["untied"])) - served).abs().max() > 1e-2  # not vacuous

    weights.build_hf_model(base_model=base, adapter_path=str(adapter), output_path=str(tmp_path / "merged"))
    torch.testing.assert_close(hf_logprobs(load_hf(tmp_path / "merged")), served, atol=ATOL, rtol=0)

    weights.build_lora_adapter(base_model=base, adapter_path=str(adapter), output_path=str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(load_hf(bases["untied"]), str(tmp_path / "peft"))
    torch.testing.assert_close(hf_logprobs(peft_model), served, atol=ATOL, rtol=0)


def test_cookbook_merge_on_a_tied_base(server, trained, bases, tmp_path) -> None:
    """The cookbook maps Tinker's unembedding onto the tied embedding (no WeightsMergeError) and merges
    exactly the head's delta there; on an untied copy of the base its merge reproduces the server."""
    from peft import PeftModel

    client, _, served = trained["tied"]
    export = client.save_weights_external("cookbook").result().path
    adapter = Path(weights.download(tinker_path=export, output_dir=str(tmp_path / "a"), base_url=server))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.unembed_tokens.lora_A.weight"]
    b = tensors["base_model.model.model.unembed_tokens.lora_B.weight"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    delta = b @ a * (config["lora_alpha"] / config["r"])
    assert delta.abs().max() > 1e-3

    weights.build_hf_model(
        base_model=str(bases["tied"]), adapter_path=str(adapter), output_path=str(tmp_path / "shared")
    )
    shared = load_hf(tmp_path / "shared")
    head = load_hf(bases["tied"]).lm_head.weight
    torch.testing.assert_close(shared.lm_head.weight, head + delta, atol=1e-5, rtol=0)
    weights.build_lora_adapter(
        base_model=str(bases["tied"]), adapter_path=str(adapter), output_path=str(tmp_path / "tied-peft")
    )

    untied = untied_copy(bases["tied"], tmp_path / "untied-base")
    weights.build_hf_model(base_model=str(untied), adapter_path=str(adapter), output_path=str(tmp_path / "m"))
    torch.testing.assert_close(hf_logprobs(load_hf(tmp_path / "m")), served, atol=ATOL, rtol=0)
    weights.build_lora_adapter(
        base_model=str(untied), adapter_path=str(adapter), output_path=str(tmp_path / "p")
    )
    peft_model = PeftModel.from_pretrained(load_hf(bases["tied"]), str(tmp_path / "p"))  # onto the tied base
    torch.testing.assert_close(hf_logprobs(peft_model), served, atol=ATOL, rtol=0)


# --- our own checkpoint directories and the CLI --------------------------------------------------------


runner = CliRunner()


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_peft_loads_our_checkpoint_directories(server, trained, bases, tie, tmp_path) -> None:
    from peft import PeftModel

    client, _, served = trained[tie]
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["checkpoints", "export", client.model_id, "ckpt", str(out), "--url", server])
    assert result.exit_code == 0, result.output
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.lora_A.weight" in keys  # the head by its module path, as PEFT names it
    peft_model = PeftModel.from_pretrained(load_hf(bases[tie]), str(out))
    torch.testing.assert_close(hf_logprobs(peft_model), served, atol=ATOL, rtol=0)


def test_cli_merge_unties_a_tied_head(server, trained, bases, tmp_path) -> None:
    client, _, served = trained["tied"]
    out = tmp_path / "merged"
    args = ["checkpoints", "export", client.model_id, "ckpt", str(out), "--merge", "--url", server]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = load_hf(out)
    base = load_hf(bases["tied"])
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    torch.testing.assert_close(
        merged.model.embed_tokens.weight, base.model.embed_tokens.weight, atol=0, rtol=0
    )
    torch.testing.assert_close(hf_logprobs(merged), served, atol=ATOL, rtol=0)


def test_a_tinker_named_export_loads_back_into_a_run(bases, tmp_path) -> None:
    """Reading accepts Tinker's name for the head: a new run from the export, and a load into a run."""
    engine = Engine(EngineConfig(device="cpu", dtype=torch.float32))
    lora = {"r": 4, "lora_alpha": 8, "seed": 0, "target_modules": ["q_proj", "down_proj", "lm_head"]}
    run_id = engine.create_run(str(bases["tied"]), lora).run_id
    for _ in range(2):
        engine.forward_backward(run_id, [Datum.from_labels(TOKENS)])
        engine.optim_step(run_id, AdamParams(learning_rate=5e-2))
    engine.save_weights(run_id, tmp_path / "export", module_names="tinker")
    keys = load_file(str(tmp_path / "export/adapter_model.safetensors"))
    assert "base_model.model.model.unembed_tokens.lora_B.weight" in keys
    assert not any(".lm_head." in k for k in keys)
    config = json.loads((tmp_path / "export/adapter_config.json").read_text())
    assert "unembed_tokens" in config["target_modules"] and "lm_head" not in config["target_modules"]

    def logits(run: str) -> torch.Tensor:
        base = engine._run(run).base
        ids = torch.tensor([PROMPT])
        with torch.no_grad(), base.lock, routed(base.routing, [Segment(run, 0, 1)]):
            return base.model(input_ids=ids).logits

    copy = engine.create_run(str(bases["tied"]), adapter_path=tmp_path / "export").run_id
    torch.testing.assert_close(logits(copy), logits(run_id), atol=0, rtol=0)
    fresh = engine.create_run(str(bases["tied"]), {**lora, "seed": 1}).run_id
    engine.load_state(fresh, tmp_path / "export")
    torch.testing.assert_close(logits(fresh), logits(run_id), atol=0, rtol=0)
    # And our merge takes the Tinker naming too, untying the tied head.
    checkpoint.merge_into_base(tmp_path / "export", str(bases["tied"]), tmp_path / "merged")
    merged = load_hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=torch.tensor([PROMPT])).logits, logits(run_id), atol=ATOL, rtol=0
        )
