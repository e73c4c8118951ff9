"""The end-to-end demo: tune the small model, then steer the large one with it on held-out questions."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedpt.data import DataConfig, load_examples, splits
from fedpt.decoding import GenerationConfig, generate
from fedpt.evaluate import nll
from fedpt.lm import HFCausalLM, load_model
from fedpt.proxy import AdapterPair, ProxyTunedLM
from fedpt.train import TuneConfig, make_trainable, train

CATEGORIES = ("ai", "emotion", "psychology", "humor")


def run_demo(large: str, small: str, out: Path, n_questions: int = 6, seed: int = 0, steps: int = 30) -> None:
    console = Console()
    started = time.time()
    data = DataConfig(source="chatterbot", categories=CATEGORIES)
    parts = splits(load_examples(data), data)
    console.print(f"[bold]data[/] chatterbot {', '.join(CATEGORIES)}: {len(parts['train'])} train, "
                  f"{len(parts['test'])} held-out pairs")

    model, tokenizer, _ = load_model(small)
    model = make_trainable(model, TuneConfig())
    with Progress(console=console, transient=True) as progress:
        stats = train(model, tokenizer, parts["train"], TuneConfig(local_steps=steps), seed=seed, progress=progress)
    model.save_pretrained(out / "adapter")
    console.print(f"[bold]tuned[/] {small} with LoRA for {steps} steps in {stats['seconds']:.0f} s "
                  f"(mean train loss {stats['train_loss']:.2f}); adapter in {out / 'adapter'}")

    large_lm = HFCausalLM.load(large)
    proxy = ProxyTunedLM(large_lm, AdapterPair(model, tokenizer, name=f"{small}+lora"), alpha=1.0)
    questions = parts["test"][:n_questions]
    config = GenerationConfig(max_new_tokens=40)
    with Progress(console=console, transient=True) as progress:
        alone = generate(large_lm, [q.prompt for q in questions], config, progress=progress)
        steered = generate(proxy, [q.prompt for q in questions], config, progress=progress)
        scores = {name: nll(lm, parts["test"], progress=progress) for name, lm in
                  [("large alone", large_lm), ("proxy-tuned", proxy)]}

    table = Table(title="held-out questions", show_lines=True)
    for column in ("question", "reference", "large alone", "proxy-tuned large"):
        table.add_column(column, overflow="fold")
    for q, a, s in zip(questions, alone, steered):
        table.add_row(q.prompt, q.response, a, s)
    console.print(table)
    for name, score in scores.items():
        console.print(f"held-out NLL per token, {name}: {score['nll']:.3f} (perplexity {score['perplexity']:.1f}, "
                      f"{score['tokens']} tokens)")
    console.print(f"demo finished in {time.time() - started:.0f} s")
