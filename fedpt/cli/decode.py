"""`fedpt generate` and `fedpt serve`: the large model, proxy-tuned when a small pair is given, answering
prompts from the command line or over HTTP. Both describe the model with one ModelSpec."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from fedpt.cli.app import app
from fedpt.config import BACKENDS, DTYPE_NAMES
from fedpt.errors import FedptError
from fedpt.runtime import check_free, quiet_transformers

DTYPE_CHOICES = click.Choice(list(DTYPE_NAMES))

MODEL, FUSION, REMOTE = "Model", "Fusion (with a small pair)", "Remote or GGUF large model"


def option(panel: str, help: str, *names: str, **kwargs: Any) -> Any:
    """A typer option shown under `panel` in --help."""
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def model_spec(
    large: Annotated[str | None, option(MODEL, "large model: a registered name, a local HF folder, a GGUF file, or a "
                                               "server URL (http://HOST:PORT/v1) answering /v1/completions with "
                                               "logprobs")] = None,
    small: Annotated[str | None, option(MODEL, "small base model (with --adapter): proxy-tune the large")] = None,
    adapter: Annotated[Path | None, option(MODEL, "tuned small: LoRA adapter folder or full model folder (without "
                                                  "--small: --large's own tuning, run alone)")] = None,
    experiment: Annotated[Path | None, option(MODEL, "an experiment folder: its models, its FedPT adapter and the "
                                                     "fusion it chose on validation (results.json)")] = None,
    backend: Annotated[str, option(MODEL, "what runs local models: transformers, or llama.cpp from their GGUF files "
                                          "(the adapter converted to GGUF once)",
                                   click_type=click.Choice(list(BACKENDS)))] = "transformers",
    dtype: Annotated[str, option(MODEL, "weights' number format (auto: bfloat16 where the hardware computes it "
                                        "natively, else float32)", click_type=DTYPE_CHOICES)] = "auto",
    device: Annotated[str, option(MODEL, "where the models run: auto (a CUDA GPU if torch sees one, else the CPU), "
                                         "cpu, cuda, cuda:N, mps")] = "auto",
    spread_large: Annotated[bool, option(MODEL, "spread the large model over every GPU (one too big for one)",
                                         "--spread-large")] = False,
    small_int8: Annotated[bool, option(MODEL, "int8 weights for the small pair: faster, a bit different",
                                       "--small-int8")] = False,
    alpha: Annotated[float | None, option(FUSION, "strength of the steering (default 1)")] = None,
    weight: Annotated[float | None, option(FUSION, "share of the tuned small model in a geometric mixture with the "
                                                   "proxy (0: the proxy alone)")] = None,
    dynamic: Annotated[bool, option(FUSION, "choose alpha per token (dynamic logit fusion)", "--dynamic")] = False,
    force: Annotated[bool, option(FUSION, "allow alpha outside [0, 4] and an adapter on another base than the one "
                                          "it was trained on", "--force")] = False,
    tokenizer: Annotated[str | None, option(REMOTE, "the model whose tokenizer it shares (default: --small)")] = None,
    served_name: Annotated[str, option(REMOTE, "with a URL: the served model's name (default: the first)")] = "",
    api_key_env: Annotated[str, option(REMOTE, "with a URL: the NAME of the environment variable that holds the "
                                               "large server's API key (never the key itself)")] = "",
    top_k: Annotated[int, option(REMOTE, "with a URL: log-probabilities asked per position")] = 20,
):
    """The ModelSpec that `generate`'s and `serve`'s model options describe (checked in the options' words)."""
    from fedpt.proxy import Fusion
    from fedpt.proxy.spec import ModelSpec

    steering = alpha is not None or weight is not None or dynamic
    common = {"force": force, "dtype": dtype, "device": device, "large_device_map": "auto" if spread_large else "",
              "small_int8": small_int8, "tokenizer": tokenizer, "served_name": served_name,
              "api_key_env": api_key_env, "top_k": top_k, "backend": backend}
    if experiment is not None:
        from fedpt.llm import spec_from_experiment

        if steering:
            raise FedptError("--experiment brings the fusion it chose; drop --alpha, --weight and --dynamic")
        return spec_from_experiment(experiment, large=large, small=small, adapter=adapter, **common)
    if large is None:
        raise FedptError("give --large (or --experiment)")
    if small is not None and adapter is None:
        raise FedptError("--small proxy-tunes the large with its tuned version: give --adapter too")
    if small is None and steering:
        raise FedptError("--alpha, --weight and --dynamic steer with a small pair: give --small and --adapter")
    fusion = Fusion(alpha=1.0 if alpha is None else alpha, weight=weight or 0.0, dynamic=dynamic) if small else None
    return ModelSpec(large=large, small=small, adapter=adapter, fusion=fusion, **common)


MODEL_OPTIONS = list(inspect.signature(model_spec, eval_str=True).parameters.values())


def with_model_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command(spec, ...)` as a command that takes the model options too (typer reads the signature) and passes
    the ModelSpec they describe as `spec`."""
    @functools.wraps(command)
    def run(**options: Any) -> None:
        spec = model_spec(**{p.name: options.pop(p.name) for p in MODEL_OPTIONS})
        command(spec, **options)

    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]  # all but `spec`
    run.__signature__ = inspect.Signature(own + MODEL_OPTIONS, return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "spec"}
    del run.__wrapped__  # typer must read the signature above, not the command's own
    return run


def _to_stderr(message: str) -> None:
    """What loads, and how long it took: on stderr, so stdout holds only the answers."""
    print(message, file=sys.stderr, flush=True)


@app.command()
@with_model_options
def generate(
    spec: Any,
    prompt: Annotated[str | None, option("Input", "one prompt")] = None,
    prompts_file: Annotated[Path | None, option("Input", "a prompt per line, or .jsonl with 'prompt'")] = None,
    max_new_tokens: Annotated[int, option("Decoding", "tokens to generate at most per prompt")] = 64,
    temperature: Annotated[float, option("Decoding", "0 decodes greedily")] = 0.0,
    top_p: Annotated[float, option("Decoding", "sample from the smallest set of tokens holding this much "
                                              "probability (with --temperature > 0)")] = 1.0,
    seed: Annotated[int, option("Decoding", "random seed of sampling")] = 0,
    stop: Annotated[list[str] | None, option("Decoding", "stop at this text (repeatable)")] = None,
    raw: Annotated[bool, option("Input", "do not apply the chat template", "--raw")] = False,
    batch_size: Annotated[int, option("Decoding", "prompts decoded together")] = 8,
    json_schema: Annotated[str | None, option("Decoding", "answer JSON valid under this schema: a .json file, or "
                                                          "the schema itself ('{}': any JSON object)")] = None,
) -> None:
    """Continue prompts with the large model, proxy-tuned when --small and --adapter (or --experiment) are given."""
    from rich.progress import Progress

    from fedpt.data import read_prompts
    from fedpt.decoding import Sampling, generate_each

    if (prompt is None) == (prompts_file is None):
        raise FedptError("give exactly one of --prompt or --prompts-file")
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
    for option, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise FedptError(f"{option} must be at least 1, got {value}")
    if json_schema is not None and not json_schema.lstrip().startswith("{"):
        if not Path(json_schema).is_file():
            raise FedptError(f"JSON schema file {json_schema} does not exist (or give the schema itself: '{{...}}')")
        json_schema = Path(json_schema).read_text(encoding="utf-8", errors="replace")
    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop=tuple(stop or ()), json_schema=json_schema)
    quiet_transformers()
    lm = spec.open(say=_to_stderr)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        for p, completion in zip(prompts, generate_each(lm, prompts, sampling, chat=not raw,
                                                           max_batch=batch_size, progress=progress)):
            # each answer is written as soon as it is done: a failure later loses none of them
            print(completion if prompts_file is None else json.dumps({"prompt": p, "completion": completion},
                                                                     ensure_ascii=False), flush=True)


@app.command()
@with_model_options
def serve(
    spec: Any,
    host: Annotated[str, option("Server", "address to listen on (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, option("Server", "port to listen on")] = 8000,
    name: Annotated[str, option("Server", "the model name clients ask for")] = "fedpt",
    require_key_env: Annotated[str, option("Server", "the NAME of an environment variable holding the API key "
                                                      "clients must send as a bearer token")] = "",
    max_batch: Annotated[int, option("Limits", "requests decoded together")] = 8,
    max_queue: Annotated[int, option("Limits", "requests that may wait; more are answered 429")] = 64,
    max_prompt_tokens: Annotated[int, option("Limits", "longer prompts are answered 400")] = 2048,
    max_tokens: Annotated[int, option("Limits", "most new tokens a request may ask for")] = 1024,
    timeout: Annotated[float, option("Limits", "seconds a request may take, waiting included")] = 600.0,
) -> None:
    """Serve the large model, proxy-tuned when --small and --adapter (or --experiment) are given, over an
    OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions."""
    from fedpt.serving import Limits
    from fedpt.serving import serve as run_server

    if not 0 < port < 65536:
        raise FedptError(f"--port must lie in 1..65535, got {port}")
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, timeout=timeout)
    check_free(host, port)
    quiet_transformers()
    lm = spec.open(say=_to_stderr)
    print(f"serving {lm.name} as '{name}' at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    run_server(lm, host, port, name=name, limits=limits, api_key_env=require_key_env, max_batch=max_batch,
               max_queue=max_queue)


@app.command()
@with_model_options
def evaluate(
    spec: Any,
    task: Annotated[str, option("Task", "humaneval (164 functions), codeio (held-out CodeI/O tasks) or gsm "
                                        "(GSM-style math, exact final number)")] = "humaneval",
    out: Annotated[Path, option("Task", "folder for samples.jsonl (an interrupted run resumes) and results.json")
                   ] = Path("runs/evaluate"),
    limit: Annotated[int | None, option("Task", "the first N problems only")] = None,
    split: Annotated[str, option("Task", "test, or validation (codeio, gsm): choose a recipe there, never on test")
                     ] = "test",
    n: Annotated[int, option("Task", "samples per problem (pass@k needs n >= k and a temperature)")] = 1,
    timeout: Annotated[float, option("Task", "seconds a sample's program may run")] = 10.0,
    max_new_tokens: Annotated[int, option("Decoding", "tokens to generate at most per answer")] = 384,
    temperature: Annotated[float, option("Decoding", "0 decodes greedily")] = 0.0,
    top_p: Annotated[float, option("Decoding", "nucleus of sampling (with --temperature > 0)")] = 1.0,
    seed: Annotated[int, option("Decoding", "random seed of sampling; sample i uses seed + i")] = 0,
    raw: Annotated[bool, option("Decoding", "continue the problem's text instead of asking in the chat template",
                                "--raw")] = False,
    batch_size: Annotated[int, option("Decoding", "answers decoded together")] = 8,
) -> None:
    """Judge a model (the large alone, a URL, the proxy, --experiment DIR) on a real task, by running its code or
    comparing its final number: greedy pass@1 by default, with a bootstrap 95% interval; samples are written as
    they are judged."""
    from rich.progress import Progress

    from fedpt.decoding import Sampling
    from fedpt.tasks.evaluate import evaluate as run

    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    quiet_transformers()
    lm = spec.open(say=_to_stderr)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        results = run(lm, task, out, sampling=sampling, n=n, limit=limit, chat=not raw, max_batch=batch_size,
                      timeout=timeout, progress=progress, split=split)
    for name, score in results["scores"].items():
        value, interval = score["value"], score.get("interval_95")
        line = f"{task} {name}: " + (f"{value:.3f}" if isinstance(value, float) else f"{value}")
        if interval:
            line += f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})"
        if name.startswith("pass@"):  # a part (seen templates) says its own count
            line += f", {score.get('problems', results['problems'])} problems"
        elif "samples" in score:
            line += f" ({score['samples']} samples)"
        print(line)
    print(out / "results.json")
