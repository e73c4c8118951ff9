"""What a request's own constraints cost per token, on the real pair: stop strings (0 against the most a request may
give, MAX_STOPS of MAX_STOP_CHARS characters that never match) in process, and structured output through
`fedpt serve` as LangChain asks for it (`with_structured_output`, a JSON schema from a pydantic model) against the
same chat decoded freely for as many tokens.

    pip install 'langchain-openai>=1,<2'        # not a fedpt dependency
    python benchmarks/constraints.py [--small qwen2.5-coder-0.5b-instruct --adapter RUN/fedpt/round-1] \
        [--out runs/benchmarks/constraints.json]

Targets (issue 24): the most stop strings cost at most 1.2x none per token; LangChain gets a valid object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from fedpt.runtime import setup_process

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a hash table works.",
           "Describe your favourite city and why you like it.", "Give advice to someone learning Python."]
ASKS = ["Invent a pet for a child's story.", "Describe a pet that lives in a flat in Paris.",
        "Make up a pet that could live on a farm."]


class Pet(BaseModel):
    """A pet, as LangChain's user would ask for one."""

    kind: Literal["cat", "dog", "bird", "fish"]
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=30)
    friendly: bool


def stop_strings(count: int, seed: int = 0) -> tuple[str, ...]:
    """`count` stop strings of the most characters allowed, each starting as common text does (so the engine's
    check for a partial match at the answer's end runs deep) and never matching."""
    from fedpt.serving.protocol import MAX_STOP_CHARS

    rng = random.Random(seed)
    starts = [" the", "e ", ", ", "in", ". ", "a ", "s ", "th"]
    return tuple((starts[i % len(starts)] + "".join(rng.choice("qxzjkvw") for _ in range(MAX_STOP_CHARS)))
                 [:MAX_STOP_CHARS] for i in range(count))


def time_stops(lm, repeats: int, tokens: int) -> dict:
    from fedpt.decoding import Sampling, generate
    from fedpt.serving.protocol import MAX_STOPS

    per_token: dict[str, list[float]] = {"0": [], str(MAX_STOPS): []}
    generate(lm, PROMPTS, Sampling(max_tokens=4), max_batch=len(PROMPTS))  # warm-up
    for _ in range(repeats):
        for count in (0, MAX_STOPS):  # side by side, alternating
            sampling = Sampling(max_tokens=tokens, ignore_eos=True, stop=stop_strings(count))
            started = time.perf_counter()
            generate(lm, PROMPTS, sampling, max_batch=len(PROMPTS))
            per_token[str(count)].append((time.perf_counter() - started) / (tokens * len(PROMPTS)))
    medians = {k: statistics.median(v) for k, v in per_token.items()}
    return {"prompts": len(PROMPTS), "tokens": tokens, "repeats": repeats, "stop_chars": len(stop_strings(1)[0]),
            "seconds_per_token": medians, "ratio_max_to_none": medians[str(MAX_STOPS)] / medians["0"]}


def time_structured(lm, repeats: int) -> dict:
    from langchain_openai import ChatOpenAI

    from fedpt.serving import Limits, running

    rows = []
    with running(lm, name="fedpt", limits=Limits(max_tokens=256), max_batch=1) as url:
        chat = ChatOpenAI(base_url=url, api_key="none", model="fedpt", temperature=0, max_tokens=128)
        structured = chat.with_structured_output(Pet, include_raw=True)  # method json_schema by default
        for _ in range(repeats):
            for ask in ASKS:
                started = time.perf_counter()
                answer = structured.invoke(ask)
                constrained_s = time.perf_counter() - started
                tokens = answer["raw"].usage_metadata["output_tokens"]
                free = chat.bind(max_tokens=tokens, extra_body={"ignore_eos": True})
                started = time.perf_counter()
                free.invoke(ask)
                free_s = time.perf_counter() - started
                rows.append({"ask": ask, "valid": isinstance(answer["parsed"], Pet), "tokens": tokens,
                             "object": answer["parsed"].model_dump() if answer["parsed"] else None,
                             "error": str(answer["parsing_error"]) if answer["parsing_error"] else None,
                             "constrained_s_per_token": constrained_s / tokens, "free_s_per_token": free_s / tokens})
    ratio = statistics.median(r["constrained_s_per_token"] / r["free_s_per_token"] for r in rows)
    return {"schema": Pet.model_json_schema(), "answers": rows, "valid": sum(r["valid"] for r in rows),
            "requests": len(rows), "ratio_constrained_to_free_per_token": ratio,
            "note": "each time includes the request's prompt reading; the free answer decodes as many tokens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--small", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--backend", default="llama.cpp")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/constraints.json"))
    args = parser.parse_args()
    setup_process()
    from fedpt.proxy.spec import ModelSpec

    spec = ModelSpec(large=args.large, small=args.small, adapter=args.adapter, backend=args.backend)
    lm = spec.open(say=print)
    result = {"benchmark": "constraints", "model": lm.name, "backend": args.backend,
              "stops": time_stops(lm, args.repeats, args.tokens), "structured": time_structured(lm, 1)}
    result["targets"] = {"stops_max_at_most_1.2x_none": result["stops"]["ratio_max_to_none"] <= 1.2,
                         "langchain_valid_objects": result["structured"]["valid"] == result["structured"]["requests"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "structured"} | {
        "structured": {k: v for k, v in result["structured"].items() if k not in ("schema", "answers")}}, indent=2))


if __name__ == "__main__":
    main()
