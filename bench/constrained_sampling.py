"""What constrained decoding costs: the continuous batcher's tokens/s with every row within a grammar vs
the same rows free, side by side in the same process, interleaved in rounds (medians reported).

Two grammars, each with the same rows unconstrained as its baseline:

* **regex** `[A-Za-z ,.]*` with no stop: every row samples exactly `--new-tokens` tokens on both sides, so
  the ratio is the per-token cost of the mask (llguidance's bitmask over the whole vocabulary, the host to
  device copy, the masking) and nothing else.
* **JSON schema** (four {name, age} objects, as a structured-output request would send it): what a user
  sees; a constrained row ends when its JSON is complete (about as long as the free rows), so tokens/s
  is what is compared.

Reproduce:

    OMP_NUM_THREADS=1 uv run python bench/constrained_sampling.py                 # SmolLM2-135M (V 49152)
    OMP_NUM_THREADS=1 uv run python bench/constrained_sampling.py --model tiny --rounds 5
    python bench/constrained_sampling.py --model <dir> --device cuda     # a GPU (needs llguidance)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pick_device, pick_dtype, resolve_model, write_results
from eztinker.api.structured import json_answer, regex_answer
from eztinker.engine import SamplingParams
from eztinker.engine import grammar as constrained
from eztinker.engine.engine import Engine, EngineConfig
from eztinker.engine.sampler import SampleRequest, sample_batch

console = Console()
# Four people, bounded: a row's answer is about as long as the free rows' 64 tokens, so the two sides do
# comparable work (an unbounded `[]`-able schema lets a row stop after two tokens, and prefill dominates).
PEOPLE = {
    "type": "array",
    "minItems": 4,
    "maxItems": 4,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 4, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}


def one_round(
    base, prompts: list[list[int]], new_tokens: int, grammar: str | None, seed: int
) -> tuple[float, int]:
    """(seconds, tokens generated) for every prompt at once, within `grammar` (None: free)."""
    requests = [
        SampleRequest(
            p, SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed + i, stop=[], grammar=grammar)
        )
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    results = sample_batch(base, requests)
    seconds = time.perf_counter() - start
    return seconds, sum(len(s.tokens) for r in results for s in r.sequences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model directory")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA)")
    args = parser.parse_args()
    device = pick_device(args.device)

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, tag = resolve_model(args.model, Path(workdir))
        config = EngineConfig(device=str(device), dtype=pick_dtype(args.dtype, device))
        base = Engine(config).base_model(str(model_dir))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 1000, (16,), generator=g).tolist() for _ in range(args.requests)]
        grammars = {
            "regex": regex_answer("[A-Za-z ,.]*", "bench").grammar(None),
            "json_schema": json_answer(PEOPLE, "bench").grammar(None),
        }
        compile_s = []  # the first includes building llguidance's view of the vocabulary (once per model)
        for _ in range(3):
            start = time.perf_counter()
            constrained.compile_grammar(
                base.tokenizer, base.vocab_size, base.eos_token_ids, grammars["json_schema"], "bench"
            )
            compile_s.append(time.perf_counter() - start)
        one_round(base, prompts[:2], 4, grammars["json_schema"], 0)  # warm-up: kernels
        rates: dict[str, list[float]] = {
            f"{k}_{side}": [] for k in grammars for side in ("free", "constrained")
        }
        ratios: dict[str, list[float]] = {k: [] for k in grammars}
        tokens: dict[str, list[int]] = {k: [] for k in rates}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=args.rounds * len(grammars))
            for r in range(args.rounds):
                for kind, grammar in grammars.items():
                    sides = [("free", None), ("constrained", grammar)]
                    if r % 2:
                        sides.reverse()  # neither side always runs first
                    rate = {}
                    for side, g_ in sides:
                        seconds, n = one_round(base, prompts, args.new_tokens, g_, seed=100 * r)
                        rate[side] = n / seconds
                        rates[f"{kind}_{side}"].append(rate[side])
                        tokens[f"{kind}_{side}"].append(n)
                    ratios[kind].append(rate["constrained"] / rate["free"])
                    progress.advance(task)

    table = Table(
        title=f"constrained ÷ free tokens/s, {args.requests} rows × {args.new_tokens} tokens, {tag}"
    )
    for column in ("grammar", "median ratio", "per round", "tokens/s free", "tokens/s constrained", "tokens"):
        table.add_column(column)
    payload: dict = {"model": tag, "requests": args.requests, "new_tokens": args.new_tokens, "results": {}}
    for kind in grammars:
        median = statistics.median(ratios[kind])
        free, bound = (
            statistics.median(rates[f"{kind}_free"]),
            statistics.median(rates[f"{kind}_constrained"]),
        )
        table.add_row(
            kind,
            f"{median:.2f}×",
            ", ".join(f"{x:.2f}" for x in ratios[kind]),
            f"{free:.0f}",
            f"{bound:.0f}",
            f"{tokens[f'{kind}_free'][0]} / {tokens[f'{kind}_constrained'][0]}",
        )
        payload["results"][kind] = {
            "ratio_median": median,
            "ratios": ratios[kind],
            "tokens_per_s_free": free,
            "tokens_per_s_constrained": bound,
            "tokens_free_constrained_round0": [tokens[f"{kind}_free"][0], tokens[f"{kind}_constrained"][0]],
        }
    console.print(table)
    console.print(
        f"JSON schema grammar compile: first {compile_s[0] * 1e3:.0f} ms, then {compile_s[-1] * 1e3:.1f} ms"
    )
    payload["json_schema_compile_s"] = compile_s
    payload["machine"] = machine_info(device)
    console.print(f"results: {write_results(f'constrained_sampling-{tag}-{device.type}', payload)}")


if __name__ == "__main__":
    main()
