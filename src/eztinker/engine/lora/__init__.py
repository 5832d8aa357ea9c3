"""Many LoRA adapters on one frozen base model: base output + a routed low-rank delta.

Every targeted linear layer of the base model is wrapped once in a `LoRALinear`; every MoE experts module
with a targeted fused weight is wrapped once in a `LoRAExperts`, which holds one `ExpertWeight` per
adapted 3-D weight (`gate_up_proj`, `down_proj`). A layer holds one `LoRAWeights` slot per adapter (a
run's live adapter, or a frozen sampler snapshot) and a reference to the base model's shared `Routing`,
which says — for the forward pass under way — which adapter serves which rows of the batch. So one pass
can serve several runs at once, and a run costs only its own A and B.

The maths is PEFT's, so a saved adapter loads into `peft.PeftModel` unchanged:

    linear:  y = base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r       A: (r, in), B: (out, r)
    experts: W_e' = W_e + (lora_alpha / r) · B_e · A_e  for every expert e, as PEFT's `target_parameters`
             stores it: A (E·r, in) with expert e's rows at [e·r, (e+1)·r), B (out, r·E) with expert e's
             rank k at column k·E + e (`peft.tuners.lora.ParamWrapper`); no dropout (PEFT has none there)

Adapters are kept in float32 whatever the base dtype (as PEFT does): their gradients and the optimizer's
state are float32, a linear layer's low-rank products run in float32, and the delta is added to the base
output in float32 and rounded once to the base dtype (PEFT's order). With a bf16 base the layer input is
kept for backward in bf16, not as a float32 copy (`_lowrank`). A co-batched pass computes every row's
delta with a fixed number of kernels per layer whatever the number of adapters, from index tensors built
once per row layout, so no layer reads from or waits for the host (see "the co-batched dense delta").

Expert LoRA in a co-batched pass: the experts module's own router picks each token's top-k experts (so
routing is per row: a run's attention LoRA changes its own tokens' routing only); the (token, expert)
pairs are sorted by (expert, the token's adapter) and each projection computes x·(W_e + ΔW_e)ᵀ with the
pair's own adapter's ΔW_e, before the expert's activation — so a run's result equals running it alone.
Two equal ways, chosen per projection by cost (`_expert_projection`): one grouped matmul computes every
pair's base projection (groups by expert) and two more its low-rank delta (groups by expert × adapter,
each with its adapter's factors, ranks zero-padded to the largest) — the way for large experts, which
never copies them; or, when the pass has more rows than the experts have weights, the delta weights are
formed per (expert, adapter) and one grouped matmul runs with W_e + ΔW_e, as PEFT does. On CUDA the
low-rank products run in bf16 (`_expert_factors_dtype`: the one dtype of torch's fast grouped matmul);
group offsets come from `searchsorted` on the sorted keys, never read back to the host.

The package: `layer` (the linear layer, its routing and the co-batched dense delta; its knobs
`DENSE_PATH` and `SAVE_INPUT_IN_BASE_DTYPE` are read there), `experts` (fused MoE expert weights; knobs
`MERGE_EXPERTS_BELOW`, `EXPERT_FACTORS_DTYPE`), `slots` (targets, wrapping, the slot life cycle, PEFT names).
"""

from __future__ import annotations

from eztinker.engine.lora.experts import (
    EXPERT_FACTORS_DTYPE,
    MERGE_EXPERTS_BELOW,
    AdaptedLayer,
    ExpertWeight,
    LoRAExperts,
)
from eztinker.engine.lora.experts import (
    _run_ends as _run_ends,
)
from eztinker.engine.lora.layer import (
    ADAPTABLE_TYPES,
    DENSE_PATH,
    SAVE_INPUT_IN_BASE_DTYPE,
    LoRALinear,
    LoRAWeights,
    Routing,
    Segment,
)
from eztinker.engine.lora.layer import (
    _dense_path as _dense_path,
)
from eztinker.engine.lora.layer import (
    _LowRankSavingInput as _LowRankSavingInput,
)
from eztinker.engine.lora.layer import (
    _routed_delta as _routed_delta,
)
from eztinker.engine.lora.layer import (
    _row_plan as _row_plan,
)
from eztinker.engine.lora.layer import (
    _RowPlan as _RowPlan,
)
from eztinker.engine.lora.layer import (
    _to_device as _to_device,
)
from eztinker.engine.lora.slots import (
    adaptable_layers,
    copy_adapter,
    expert_peft_names,
    init_adapter,
    output_head_path,
    peft_module_names,
    remove_adapter,
    resolve_targets,
    routed,
    wrap_layers,
)

__all__ = [
    "ADAPTABLE_TYPES",
    "DENSE_PATH",
    "EXPERT_FACTORS_DTYPE",
    "MERGE_EXPERTS_BELOW",
    "SAVE_INPUT_IN_BASE_DTYPE",
    "AdaptedLayer",
    "ExpertWeight",
    "LoRAExperts",
    "LoRALinear",
    "LoRAWeights",
    "Routing",
    "Segment",
    "adaptable_layers",
    "copy_adapter",
    "expert_peft_names",
    "init_adapter",
    "output_head_path",
    "peft_module_names",
    "remove_adapter",
    "resolve_targets",
    "routed",
    "wrap_layers",
]
