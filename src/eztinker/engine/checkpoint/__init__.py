"""Checkpoints: PEFT adapter directories, plus the optimizer state and step of a training run.

A checkpoint is a directory that `peft.PeftModel.from_pretrained(base_model, path)` loads unchanged:

```
adapter_config.json          peft.LoraConfig(...), serialised as PEFT serialises it
adapter_model.safetensors    base_model.model.<module path>.lora_A.weight (r, in) / .lora_B.weight (out, r)
eztinker.json                format version, kind, step, base model, lora and loss configs, optimizer
                             (`optimizer_config`; `optimizer`: whose state optimizer.safetensors holds),
                             creation time
optimizer.safetensors        kind "state" only: <module path>.lora_A.<stat> / .lora_B.<stat> for each
                             statistic of the run's optimizer (`optimizers.STATE_STATS`): AdamW's step,
                             exp_avg, exp_avg_sq exactly as torch keeps them, or Dimuon's momentum_buffer
```

Only safetensors and JSON are written and read (an old-style `adapter_model.bin` is read with
`torch.load(weights_only=True)`, which unpickles tensors only), so loading a checkpoint never runs code.

Saving is atomic: every file is written into a hidden temporary directory beside the target, each
file and the directory are fsynced, and the directory is renamed to its final name (then the parent is
fsynced). A crash mid-save leaves at most a hidden `.<name>.eztinker-tmp-<hex>` directory, which
`list_checkpoints` ignores and `remove_stale_temp_dirs` deletes; never a half checkpoint under the
final name. Deleting renames the directory to a hidden name first, then removes it.

`read_checkpoint` accepts any plain-LoRA PEFT adapter directory, e.g. one that PEFT itself saved
(`get_peft_model(...).save_pretrained(path)`): without `eztinker.json` it has step 0 and no optimizer
state. LoRA variants whose maths differ from plain LoRA (DoRA, per-layer ranks or alphas, biases,
extra trainable modules, ...) are refused with a message that names the feature. Rank-stabilised LoRA
(`use_rslora`) is converted: scaling alpha/sqrt(r) is the plain scaling of alpha' = alpha·sqrt(r).

`restore_into_run` is all-or-nothing: everything is checked, and every tensor converted to the run's
device and dtype, before the first weight is overwritten.

Module names. A checkpoint names every adapted layer by its module path in the Hugging Face model
(`model.layers.0.self_attn.q_proj`, `lm_head`), which is what PEFT loads. Tinker's exports name the
output head (unembedding) `model.unembed_tokens` whatever the model calls it, and tinker-cookbook's
`weights.build_hf_model` / `build_lora_adapter` rely on that name: they map it to `lm_head`, or to the
input embedding when the base ties the two (a tied base has no `lm_head.weight` on disk, so an adapter
on `lm_head` cannot be merged by them). So the Tinker export (`module_names="tinker"`) writes Tinker's
name for the head and the model's paths for everything else; reading accepts both namings, and
`model_module_path` / `with_model_names` translate Tinker's name back once the model (hence its head's
path) is known.

Encryption. `write_checkpoint(..., age_recipients=[...])` encrypts every file to the age recipients
(`age1...` X25519 keys or SSH public keys) and stores it as `<file>.age` (binary age format, what
`age -d` and `pyrage.decrypt_file` read). Files are encrypted in memory: no plaintext byte of an
encrypted checkpoint is ever written to disk. The server cannot read such a checkpoint back.

The package, one step per module: `format` (file names, the records, module-name translation), `save`
(a run's content copied out), `disk` (the atomic write, encryption, deletion, leftovers), `read` (reading and
validating, listing), `restore` (into a run), `export` (merging into the base weights).
"""

from eztinker.engine.checkpoint import format
from eztinker.engine.checkpoint.disk import (
    MAX_AGE_RECIPIENTS,
    check_checkpoint_path,
    delete_checkpoint,
    is_encrypted,
    is_temp_name,
    parse_age_recipients,
    remove_stale_temp_dirs,
    write_checkpoint,
)
from eztinker.engine.checkpoint.disk import (
    _dir_size as _dir_size,
)
from eztinker.engine.checkpoint.disk import (
    _fsync as _fsync,
)
from eztinker.engine.checkpoint.disk import (
    _write_safetensors as _write_safetensors,
)
from eztinker.engine.checkpoint.disk import (
    _write_text as _write_text,
)
from eztinker.engine.checkpoint.export import (
    merge_into_base,
)
from eztinker.engine.checkpoint.format import *  # noqa: F403 (file names, records, naming: `format.__all__`)
from eztinker.engine.checkpoint.read import (
    _read_json as _read_json,
)
from eztinker.engine.checkpoint.read import (
    checkpoint_info,
    list_checkpoints,
    read_checkpoint,
)
from eztinker.engine.checkpoint.restore import (
    restore_into_run,
)
from eztinker.engine.checkpoint.save import (
    _adapter_tensors as _adapter_tensors,
)
from eztinker.engine.checkpoint.save import (
    _named_params as _named_params,
)
from eztinker.engine.checkpoint.save import (
    _optimizer_tensors as _optimizer_tensors,
)
from eztinker.engine.checkpoint.save import (
    prepare_checkpoint,
    save_checkpoint,
    with_layer_paths,
)

__all__ = [
    "MAX_AGE_RECIPIENTS",
    "check_checkpoint_path",
    "checkpoint_info",
    "delete_checkpoint",
    "is_encrypted",
    "is_temp_name",
    "list_checkpoints",
    "merge_into_base",
    "parse_age_recipients",
    "prepare_checkpoint",
    "read_checkpoint",
    "remove_stale_temp_dirs",
    "restore_into_run",
    "save_checkpoint",
    "with_layer_paths",
    "write_checkpoint",
]
__all__ += format.__all__
