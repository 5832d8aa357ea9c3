"""`Engine`: the in-process heart of EZTinker. Typed inputs in, typed outputs out.

It owns the loaded base models (each loaded once, frozen, on first use), the training runs on them (a
LoRA adapter + its optimizer's state each: AdamW or Dimuon), and the sampler snapshots (frozen copies of an adapter). It knows
nothing about HTTP, JSON, request ids or scheduling: the server's scheduler calls these methods from a
worker thread, and every method is safe to call from several threads (ops on one base model take turns).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from eztinker.engine import checkpoint, families, sampler
from eztinker.engine.base_models import BaseModels
from eztinker.engine.errors import ConflictError, EngineError, InvalidInputError, NotFoundError
from eztinker.engine.lora import copy_adapter, init_adapter, remove_adapter
from eztinker.engine.losses import get_loss_spec
from eztinker.engine.model import BaseModel
from eztinker.engine.optimizers import OptimizerName, check_optimizer_name, make_optimizer
from eztinker.engine.paging import Pager, PagingConfig
from eztinker.engine.run import (
    PassOptions,
    TrainingRun,
    TrainRequest,
    check_request,
    forward_backward_many,
    optim_step_many,
)
from eztinker.engine.run import forward_backward as _forward_backward
from eztinker.engine.run import optim_step as _optim_step
from eztinker.engine.types import (
    AdamParams,
    Datum,
    DimuonParams,
    ForwardBackwardResult,
    ImageChunk,
    OptimStepResult,
    SampleResult,
    SamplingParams,
    TokenLoss,
)
from eztinker.models import LoRAConfig, LossFunctionConfig


@dataclass(frozen=True)
class EngineConfig:
    """How the engine places and batches work. Defaults suit one GPU, or a CPU for tests."""

    device: str | None = None  # None: CUDA if available, else CPU
    dtype: torch.dtype | None = None  # None: bf16 on CUDA, fp32 on CPU
    token_budget: int = 8192  # padded tokens per forward chunk
    # Logits elements per chunk (1 GiB in fp32) for losses that take full (B, T, V) logits (a registered
    # native loss without `token_terms`); the built-ins and Tinker's losses never make them.
    logits_budget: int = 2**28
    # Long context (`eztinker.engine.memory`): gradient checkpointing of the decoder layers for backward
    # passes of more padded tokens than this (0: always); shorter passes keep their full speed.
    checkpoint_tokens: int = 1024
    logits_chunk: int = 2**25  # logits elements per head chunk of the chunked losses (128 MiB in fp32)
    # Bytes one pass may use; a longer sequence is refused up front. None: 90 % of the free memory.
    memory_limit: int | None = None
    # Adapter paging (`eztinker.engine.paging`): bytes of run state kept on the device (None: all of it),
    # in host memory before disk (GPU only; None: no bound), and where disk pages go.
    adapter_memory: int | None = None
    adapter_host_memory: int | None = None
    page_dir: Path | None = None

    def paging(self) -> PagingConfig:
        return PagingConfig(self.adapter_memory, self.adapter_host_memory, self.page_dir)

    def pass_options(self) -> PassOptions:
        """The `PassOptions` of this config: its fields of the same names."""
        return PassOptions(**{f.name: getattr(self, f.name) for f in fields(PassOptions)})


@dataclass(frozen=True)
class TrainOp:
    """One run's `forward_backward` (or `forward`, with `backward=False`), for `Engine.forward_backward_many`."""

    run_id: str
    data: Sequence[Datum]
    loss: LossFunctionConfig | TokenLoss | str | None = None
    backward: bool = True


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    base_model: str
    lora_config: LoRAConfig
    loss_config: LossFunctionConfig
    step: int
    num_parameters: int
    target_modules: list[str]
    created_at: float
    optimizer: OptimizerName = "adamw"  # fixed for the run's life


@dataclass(frozen=True)
class SamplerInfo:
    sampler_id: str
    base_model: str
    run_id: str | None  # the run it was snapshotted from
    step: int | None


class Engine(BaseModels):
    """Base models (`BaseModels`), runs and sampler snapshots, and the ops on them.

    With `EngineConfig.adapter_memory` the runs' state beyond it pages out (`eztinker.engine.paging`):
    every op that touches a run's tensors runs inside `self.paging.using(runs)`."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._models: dict[str, BaseModel] = {}
        self._runs: dict[str, TrainingRun] = {}
        self._samplers: dict[str, SamplerInfo] = {}
        self._registry_lock = threading.RLock()  # guards the three dicts, not compute
        self.paging = Pager(self.config.paging())

    def tinker_lora_flags(self, run_id: str) -> dict[str, bool]:
        """Tinker's `train_attn` / `train_mlp` / `train_unembed` for what run `run_id` adapts."""
        run = self._run(run_id)
        return families.tinker_flags(run.base.layer_kinds(sorted(run.slots)).values())

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per base model (its weights) and by the runs' adapters with their gradients and
        optimizer moments (four copies of each trainable parameter with AdamW, three with Dimuon): what
        placing a run elsewhere would free."""
        with self._registry_lock:
            held = self.model_bytes()
            held["adapters"] = sum(
                (4 if run.optimizer_name == "adamw" else 3) * run.num_parameters * 4
                for run in self._runs.values()
            )
        return held

    # --- runs ----------------------------------------------------------------------------------------

    def create_run(
        self,
        base_model: str,
        lora_config: LoRAConfig | dict[str, Any] | None = None,
        loss_config: LossFunctionConfig | dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        adapter_path: str | Path | None = None,
        optimizer: OptimizerName | None = None,
        with_optimizer: bool = True,
    ) -> RunInfo:
        """Start a run: a fresh adapter, or one loaded from a PEFT adapter directory (`adapter_path`).

        With `adapter_path` the LoRA config is read from the directory, and if it is an EZTinker
        training checkpoint its step and (unless `loss_config` is given) loss come too, and its
        optimizer state unless `with_optimizer=False` (then only the weights load: the optimizer
        starts afresh, as Tinker's `create_training_client_from_state`).

        `optimizer` ("adamw" or "dimuon") is fixed for the run's life. None: the family of the restored
        optimizer state, else the one the checkpoint records, else AdamW. Restored state of another
        family than `optimizer` is refused (`InvalidInputError`, field "optimizer").
        """
        if optimizer is not None:
            check_optimizer_name(optimizer, "optimizer")
        loaded = checkpoint.read_checkpoint(adapter_path) if adapter_path is not None else None
        if loaded is not None:  # its layers by this model's paths (a Tinker export names the head its way)
            loaded = checkpoint.with_model_names(loaded, self.output_head_name(base_model))
            lora_config = loaded.lora_config
            if loss_config is None and loaded.loss_config is not None:
                loss_config = loaded.loss_config
            if with_optimizer and loaded.optimizer is not None:
                if optimizer is not None and optimizer != loaded.optimizer_name:
                    raise InvalidInputError(
                        "optimizer",
                        f"checkpoint {str(loaded.path)!r} holds {loaded.optimizer_name} optimizer state, so a "
                        f"run restored with it is a {loaded.optimizer_name} run, not {optimizer}",
                    )
                optimizer = loaded.optimizer_name
            elif optimizer is None:
                optimizer = loaded.optimizer_name
        loss_config = LossFunctionConfig.model_validate(loss_config or {})
        get_loss_spec(loss_config.loss_type, "native")  # an unknown loss is refused here, not mid-training
        lora_config = LoRAConfig.model_validate(lora_config or {})
        base = self.base_model(base_model)
        with self._registry_lock:
            run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
            if run_id in self._runs or run_id in self._samplers:
                raise ConflictError(f"run id {run_id!r} is already in use")
            with base.lock:
                layers = base.lora_targets(lora_config.target_modules)
                slots = init_adapter(
                    layers,
                    run_id,
                    lora_config.r,
                    lora_config.lora_alpha,
                    lora_config.lora_dropout,
                    lora_config.seed,
                )
            params = [p for path in sorted(slots) for p in (slots[path].lora_A, slots[path].lora_B)]
            run = TrainingRun(
                run_id=run_id,
                base=base,
                lora_config=lora_config,
                loss_config=loss_config,
                slots=slots,
                optimizer=make_optimizer(params, optimizer or "adamw", rank=lora_config.r),
                target_modules=sorted({path.rsplit(".", 1)[-1] for path in slots}),
            )
            if loaded is not None:
                try:
                    checkpoint.restore_into_run(run, loaded, with_optimizer=with_optimizer)
                except Exception:
                    remove_adapter(base.lora_layers, run_id)
                    raise
            self._runs[run_id] = run
        self.paging.add(run)
        return self.run_info(run_id)

    def _run(self, run_id: str) -> TrainingRun:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}")
        return run

    def run_info(self, run_id: str) -> RunInfo:
        run = self._run(run_id)
        return RunInfo(
            run_id=run.run_id,
            base_model=run.base.name,
            lora_config=run.lora_config,
            loss_config=run.loss_config,
            step=run.step,
            num_parameters=run.num_parameters,
            target_modules=run.target_modules,
            created_at=run.created_at,
            optimizer=run.optimizer_name,
        )

    def list_runs(self) -> list[RunInfo]:
        return [self.run_info(run_id) for run_id in list(self._runs)]

    def delete_run(self, run_id: str) -> None:
        """Forget a run and free its adapter, gradients and optimizer state (its snapshots stay)."""
        with self._registry_lock:
            run = self._run(run_id)
            with run.base.lock:
                remove_adapter(run.base.lora_layers, run_id)
            del self._runs[run_id]
        self.paging.forget(run_id)

    # --- training ------------------------------------------------------------------------------------

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss: LossFunctionConfig | TokenLoss | str | None = None,
    ) -> ForwardBackwardResult:
        """Compute the loss and add its gradients to the run's (until `optim_step`).

        `loss`: None for the run's own loss; a `LossFunctionConfig` for a native loss; a token-loss
        name (`"ppo"`) or `TokenLoss` for Tinker's token-level losses.
        """
        run = self._run(run_id)
        with self.paging.using([run]):
            return _forward_backward(run, data, loss, options=self.config.pass_options())

    def forward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss: LossFunctionConfig | TokenLoss | str | None = None,
    ) -> ForwardBackwardResult:
        """Like `forward_backward`, without gradients: the run is untouched."""
        run = self._run(run_id)
        with self.paging.using([run]):
            return _forward_backward(run, data, loss, options=self.config.pass_options(), backward=False)

    def forward_backward_many(self, ops: Sequence[TrainOp]) -> list[ForwardBackwardResult | EngineError]:
        """Several runs' `forward_backward`/`forward` executed together; one outcome per op, in order.

        Rows of every run on one base model share forward and backward passes, each row routed to its
        own run's adapter, so many small ops use the hardware like one big one. Each outcome equals
        running that op alone (an error is returned, not raised, and leaves only its own run unchanged).
        """
        outcomes: list[ForwardBackwardResult | EngineError | None] = [None] * len(ops)
        by_base: dict[str, list[tuple[int, TrainRequest]]] = {}
        for i, op in enumerate(ops):
            run = self._runs.get(op.run_id)
            if run is None:
                outcomes[i] = NotFoundError(f"no run {op.run_id!r}")
                continue
            request = TrainRequest(run, op.data, op.loss, op.backward)
            by_base.setdefault(run.base.name, []).append((i, request))
        for items in by_base.values():
            with self.paging.using([request.run for _, request in items]):
                results = forward_backward_many([r for _, r in items], self.config.pass_options())
            for (i, _), result in zip(items, results, strict=True):
                outcomes[i] = result
        return [o for o in outcomes if o is not None]

    def forward_backward_from_grads(
        self, run_id: str, data: Sequence[Datum], dloss_dlogprobs: Sequence[Sequence[float] | torch.Tensor]
    ) -> ForwardBackwardResult:
        """Backpropagate a loss computed by the client: d loss / d logprob for each target token.

        `data` carries `target_tokens`; the gradient of the client's loss C flows back as the gradient
        of Σ (dC/dlp)·lp, i.e. the `cross_entropy` token loss with weights −dC/dlp.
        """
        if len(dloss_dlogprobs) != len(data):
            raise InvalidInputError(
                "dloss_dlogprobs", f"has {len(dloss_dlogprobs)} entries for {len(data)} datums"
            )
        weighted = [
            Datum(
                d.tokens,
                {"target_tokens": d.loss_inputs.get("target_tokens", []), "weights": -torch.as_tensor(g)},
            )
            for d, g in zip(data, dloss_dlogprobs, strict=True)
        ]
        return self.forward_backward(run_id, weighted, TokenLoss("cross_entropy"))

    def optim_step(
        self, run_id: str, adam_params: AdamParams | DimuonParams | None = None
    ) -> OptimStepResult:
        """Apply the accumulated gradients with the run's optimizer, zero them, and count the step.

        The params must be of the run's optimizer (`AdamParams` for AdamW, the default; `DimuonParams`
        for Dimuon), else `InvalidInputError` and the run is unchanged.
        """
        run = self._run(run_id)
        with self.paging.using([run]):
            return _optim_step(run, adam_params or AdamParams())

    def optim_step_many(
        self, steps: Sequence[tuple[str, AdamParams | DimuonParams | None]]
    ) -> list[OptimStepResult | EngineError]:
        """Several runs' `optim_step`, AdamW runs with equal hyperparameters in one multi-tensor update.

        One outcome per step, in order; each equals stepping that run alone, and a failed one is returned
        (not raised) and leaves only its own run unchanged.
        """
        outcomes: list[OptimStepResult | EngineError | None] = [None] * len(steps)
        found: list[tuple[int, TrainingRun, AdamParams | DimuonParams]] = []
        for i, (run_id, adam) in enumerate(steps):
            run = self._runs.get(run_id)
            if run is None:
                outcomes[i] = NotFoundError(f"no run {run_id!r}")
            else:
                found.append((i, run, adam or AdamParams()))
        with self.paging.using([run for _, run, _ in found]):
            results = optim_step_many([(run, adam) for _, run, adam in found])
        for (i, _, _), result in zip(found, results, strict=True):
            outcomes[i] = result
        return [o for o in outcomes if o is not None]

    def check_data(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss: LossFunctionConfig | TokenLoss | str | None = None,
        *,
        backward: bool = True,
    ) -> None:
        """Raise `InvalidInputError` now (no compute) if `forward_backward(run_id, data, loss)` would refuse it
        (with `backward=False`: if `forward` would) — bad data, or a sequence longer than memory allows.

        Lets a server answer a bad request at once instead of as a failed job later.
        """
        check_request(self._run(run_id), data, loss, options=self.config.pass_options(), backward=backward)

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_state(self, run_id: str, path: str | Path) -> checkpoint.CheckpointInfo:
        """Save adapter + optimizer state + step + configs to directory `path` (atomically)."""
        run = self._run(run_id)
        with self.paging.using([run]), run.base.lock:  # copy the tensors out under the lock, write without
            prepared = checkpoint.prepare_checkpoint(run, kind="state")
        return checkpoint.write_checkpoint(path, prepared)

    def save_weights(
        self,
        run_id: str,
        path: str | Path,
        *,
        module_names: checkpoint.ModuleNames = "peft",
        age_recipients: Sequence[str] | None = None,
    ) -> checkpoint.CheckpointInfo:
        """Save the adapter alone, as a PEFT directory, to `path` (atomically).

        `module_names="tinker"` names the output head as Tinker's exports do; `age_recipients` encrypts
        every file to them (see `eztinker.engine.checkpoint`).
        """
        run = self._run(run_id)
        if age_recipients is not None:
            checkpoint.parse_age_recipients(age_recipients)  # refused before the run's lock is taken
        with self.paging.using([run]), run.base.lock:
            prepared = checkpoint.prepare_checkpoint(run, kind="weights", module_names=module_names)
        return checkpoint.write_checkpoint(path, prepared, age_recipients=age_recipients)

    def load_state(self, run_id: str, path: str | Path, *, with_optimizer: bool = True) -> RunInfo:
        """Restore the run's adapter (and optimizer state and step, if saved and asked for) from `path`."""
        run = self._run(run_id)
        loaded = checkpoint.read_checkpoint(path)
        with self.paging.using([run]), run.base.lock:
            checkpoint.restore_into_run(run, loaded, with_optimizer=with_optimizer)
        return self.run_info(run_id)

    # --- sampling ------------------------------------------------------------------------------------

    def save_sampler(self, run_id: str, sampler_id: str | None = None) -> SamplerInfo:
        """Freeze the run's current adapter as a sampler snapshot: later training never changes it."""
        run = self._run(run_id)
        with self._registry_lock:
            sampler_id = sampler_id or f"sampler-{uuid.uuid4().hex[:12]}"
            if sampler_id in self._samplers or sampler_id in self._runs:
                raise ConflictError(f"sampler id {sampler_id!r} is already in use")
            with self.paging.using([run]), run.base.lock:
                copy_adapter(run.base.lora_layers, run_id, sampler_id)
            info = SamplerInfo(sampler_id=sampler_id, base_model=run.base.name, run_id=run_id, step=run.step)
            self._samplers[sampler_id] = info
        return info

    def list_samplers(self) -> list[SamplerInfo]:
        return list(self._samplers.values())

    def delete_sampler(self, sampler_id: str) -> None:
        with self._registry_lock:
            info = self._samplers.pop(sampler_id, None)
            if info is None:
                raise NotFoundError(f"no sampler {sampler_id!r}")
            base = self._models[info.base_model]
            with base.lock:
                remove_adapter(base.lora_layers, sampler_id)

    def _sample_target(
        self, run_id: str | None, sampler_id: str | None, base_model: str | None
    ) -> tuple[BaseModel, str | None]:
        """(base model, adapter name or None) for exactly one of run, sampler or bare base model."""
        given = [x for x in (run_id, sampler_id, base_model) if x is not None]
        if len(given) != 1:
            raise InvalidInputError("model", "name exactly one of run_id, sampler_id or base_model")
        if run_id is not None:
            run = self._run(run_id)
            return run.base, run_id
        if sampler_id is not None:
            info = self._samplers.get(sampler_id)
            if info is None:
                raise NotFoundError(f"no sampler {sampler_id!r}")
            return self._models[info.base_model], sampler_id
        assert base_model is not None
        return self.base_model(base_model), None

    def sample(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        run_id: str | None = None,
        sampler_id: str | None = None,
        base_model: str | None = None,
        prompt_logprobs: bool = False,
        images: Sequence[ImageChunk] = (),
    ) -> SampleResult:
        """Sample `num_samples` continuations of `prompt` from a run's live adapter, a snapshot, or a base.

        `images`: the prompt's images (vision-language models; `prompt` holds their placeholder runs, as
        `expand_chunks` makes them)."""
        base, adapter = self._sample_target(run_id, sampler_id, base_model)
        request = sampler.SampleRequest(
            prompt=list(prompt),
            params=params or SamplingParams(),
            num_samples=num_samples,
            adapter=adapter,
            prompt_logprobs=prompt_logprobs,
            images=tuple(images),
        )
        with self.paging.using([adapter]):
            return sampler.sample_batch(base, [request])[0]

    def sample_many(self, base_model: str, requests: Sequence[sampler.SampleRequest]) -> list[SampleResult]:
        """Several requests on one base model (any mix of adapters) in one batched generation."""
        base = self.base_model(base_model)
        for i, request in enumerate(requests):
            if request.adapter is not None and request.adapter not in self._runs | self._samplers:
                raise NotFoundError(f"requests[{i}].adapter: no run or sampler {request.adapter!r}")
        with self.paging.using([r.adapter for r in requests]):
            return sampler.sample_batch(base, list(requests))

    def compute_logprobs(
        self,
        tokens: Sequence[int],
        *,
        run_id: str | None = None,
        sampler_id: str | None = None,
        base_model: str | None = None,
    ) -> list[float | None]:
        """log p(tokens[i] | tokens[:i]) for each position; None at position 0 (nothing predicts it)."""
        base, adapter = self._sample_target(run_id, sampler_id, base_model)
        with self.paging.using([adapter]):
            return sampler.prompt_logprobs(base, list(tokens), adapter)
