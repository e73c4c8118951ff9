"""The end-to-end FedPT demo: federate the small model on chatterbot clients, then proxy-tune the large one.

1. Four clients (chatterbot categories) LoRA-tune Qwen2.5-Coder-0.5B in Flower's simulation engine.
2. The server steers Qwen2.5-Coder-1.5B with the federated adapter and answers held-out questions,
   next to the 1.5B alone, and scores both on the held-out reference answers.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedpt.config import RunConfig, load, replace
from fedpt.data import load_splits
from fedpt.decoding import Sampling, generate
from fedpt.federation.simulation import simulate
from fedpt.proxy import Fusion, ProxyTunedLM
from fedpt.proxy.spec import ModelSpec
from fedpt.scoring import nll


def run_demo(config: RunConfig, n_questions: int = 6) -> None:
    console = Console()
    started = time.time()
    fed = config.federation
    console.print(f"[bold]1. federated LoRA tuning[/] of {config.model.small}: {fed.clients} clients "
                  f"({', '.join(config.data.categories)}), {fed.rounds} rounds of {config.tuning.local_steps} "
                  f"local steps, {fed.strategy}; output in {config.out}")
    final = simulate(config)
    console.print(f"   federated adapter: {final} ({time.time() - started:.0f} s)")

    console.print(f"[bold]2. proxy-tuning[/] {config.model.large} with it ({config.model.backend})")
    spec = ModelSpec.from_config(config.model, adapter=final, fusion=Fusion(alpha=1.0), dtype=config.tuning.dtype)
    large = spec.open_large()
    proxy = ProxyTunedLM(large, spec.open_expert(), fusion=spec.fusion)
    heldout = load_splits(config.data)["test"]
    questions = list({q.prompt: q for q in reversed(heldout)}.values())[::-1][:n_questions]  # one per prompt
    with Progress(console=console, transient=True) as progress:
        answers = {name: generate(lm, [q.prompt for q in questions], Sampling(max_tokens=40),
                                  progress=progress) for name, lm in [("large", large), ("proxy", proxy)]}
        scores = {name: nll(lm, heldout, progress=progress) for name, lm in [("large", large), ("proxy", proxy)]}

    table = Table(title=f"held-out questions (never trained on): {config.model.large} alone and proxy-tuned",
                  show_lines=True)
    for column in ("question", "reference answer", "large alone", "proxy-tuned large"):
        table.add_column(column, overflow="fold")
    for i, q in enumerate(questions):
        table.add_row(q.prompt, q.response, answers["large"][i], answers["proxy"][i])
    console.print(table)
    for name, label in [("large", "large alone"), ("proxy", "proxy-tuned")]:
        s = scores[name]
        console.print(f"held-out NLL per answer token, {label:12s}: {s['nll']:.3f} "
                      f"(perplexity {s['perplexity']:.1f}, {s['tokens']} tokens, {len(heldout)} pairs)")
    console.print(f"[bold]demo finished in {time.time() - started:.0f} s[/]")


def demo_config(out: Path | None = None) -> RunConfig:
    """The embedded defaults, writing to a fresh folder under runs/demo/; the proxy runs in llama.cpp from the
    pair's GGUF files where llama-cpp-python is installed (its fastest path; training stays in transformers)."""
    config = load(None, [], out=str(out or Path("runs/demo") / time.strftime("%Y%m%d-%H%M%S")))
    if importlib.util.find_spec("llama_cpp") is not None:
        config = replace(config, model={"backend": "llama.cpp"})
    return config
