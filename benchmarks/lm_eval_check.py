"""lm-evaluation-harness against `fedpt serve` and against its own `hf` model on the same weights, on tasks written
here (no hub): a multiple-choice task raw and in the model's chat template (`local-completions`: echo
log-likelihoods over HTTP; the raw run takes its tokenizer from the server's /tokenizer_info and /tokenize, so
lm-eval needs no local copy), and a raw exact-match generation task whose answers must stop at `<|endoftext|>`,
also asked through `local-chat-completions`.

    pip install 'lm-eval[api,hf]==0.4.*'        # not a fedpt dependency
    python benchmarks/lm_eval_check.py [--model qwen2.5-coder-0.5b-instruct] [--out runs/benchmarks/lm_eval.json]

Targets (issues 22, 24): the same accuracy and exact match, per-item log-likelihoods within 1e-3 (float32).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedpt.models.store import resolve
from fedpt.runtime import setup_process

QUESTIONS = [
    ("What is 2 + 3?", ["5", "6", "23"], 0), ("What is the capital of France?", ["Berlin", "Paris", "Rome"], 1),
    ("Which Python keyword defines a function?", ["class", "def", "lambda"], 1),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("What colour is the sky on a clear day?", ["green", "blue", "red"], 1),
    ("Which is a prime number?", ["9", "15", "7"], 2), ("What is 10 times 10?", ["100", "1000", "20"], 0),
    ("Which language is used for styling web pages?", ["CSS", "SQL", "C"], 0),
    ("What does CPU stand for?", ["central processing unit", "computer power unit", "core program unit"], 0),
    ("Which planet is closest to the sun?", ["Venus", "Mercury", "Mars"], 1),
    ("Which data structure is last in, first out?", ["queue", "stack", "heap"], 1),
    ("What is the boiling point of water in Celsius?", ["90", "100", "120"], 1),
    ("Which keyword leaves a loop in Python?", ["break", "return", "pass"], 0),
    ("How many days are in a week?", ["five", "seven", "ten"], 1),
    ("What is the opposite of hot?", ["cold", "warm", "big"], 0),
    ("Which animal says 'meow'?", ["dog", "cow", "cat"], 2),
    ("What is 9 minus 4?", ["5", "13", "4"], 0), ("Which is a version control system?", ["git", "gcc", "grep"], 0),
    ("What is the largest ocean?", ["Atlantic", "Pacific", "Indian"], 1),
    ("Which symbol starts a comment in Python?", ["//", "#", "--"], 1),
]
HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
CHOICE = """output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
"""
TASKS = {  # name: (data file, the rest of its YAML)
    "fedpt_check": ("data.jsonl", CHOICE.format(text="Question: {{question}}\\nAnswer:", delimiter=" ")),
    "fedpt_chat": ("chat.jsonl", CHOICE.format(text="{{context}}", delimiter="")),
    "fedpt_exact": ("sums.jsonl", """output_type: generate_until
doc_to_text: "Question: {{question}} Answer with the number only.\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    regexes_to_ignore: [" ", "\\n", '\\.']
"""),
}
SUMS = [(2, 3), (7, 8), (12, 30), (9, 9), (41, 17), (6, 70), (15, 15), (88, 11), (3, 4), (25, 50)]


def per_item(result: dict, task: str) -> list:
    """Per item, lm-eval's filtered answers: each choice's log-likelihood, or the generated text."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    if task != "fedpt_exact":
        return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return [s["filtered_resps"][0] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--exact-model", default="qwen2.5-coder-1.5b-instruct",
                        help="the model of the exact-match runs (the 1.5B ends a raw answer with <|endoftext|>)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/lm_eval.json"))
    args = parser.parse_args()
    setup_process()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fedpt.models import HFCausalLM
    from fedpt.serving import running

    folder, exact_folder = resolve(args.model), resolve(args.exact_model)
    work = Path(tempfile.mkdtemp())
    (work / "data.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in QUESTIONS))
    (work / "sums.jsonl").write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)})
                                             + "\n" for a, b in SUMS))
    # the questions in the model's chat template, answered right after `<|im_start|>assistant\n` (lm-eval 0.4.13
    # cannot apply a chat template to log-likelihood requests of an API model, so the task carries it)
    from transformers import AutoTokenizer

    words = AutoTokenizer.from_pretrained(folder)
    (work / "chat.jsonl").write_text("".join(json.dumps({"context": words.apply_chat_template(
        [{"role": "user", "content": f"{q} Answer in a word."}], tokenize=False, add_generation_prompt=True),
        "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    for name, (data, rest) in TASKS.items():
        (work / f"{name}.yaml").write_text(HEAD.format(name=name, data=work / data) + rest)
    tasks = TaskManager(include_path=str(work))
    runs = {  # name: (model folder, lm-eval model, its arguments, task, chat template)
        "raw_choice": (folder, "local-completions", "tokenizer_backend=remote,tokenized_requests=True", "fedpt_check",
                       False),
        "chat_choice": (folder, "local-completions", f"tokenizer={folder},tokenized_requests=True", "fedpt_chat",
                        False),
        "raw_exact": (exact_folder, "local-completions", f"tokenizer={exact_folder},tokenized_requests=False",
                      "fedpt_exact", False),
        "chat_exact": (exact_folder, "local-chat-completions", "tokenizer_backend=remote,tokenized_requests=False",
                       "fedpt_exact", True),
    }
    found: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for served in (folder, exact_folder):
        with running(HFCausalLM.load(served, dtype="float32"), max_batch=8) as url:
            for name, (model_folder, model, model_args, task, chat) in runs.items():
                if model_folder != served:
                    continue
                route = "chat/completions" if model == "local-chat-completions" else "completions"
                started = time.perf_counter()
                found[f"{name}/fedpt_serve"] = lm_eval.simple_evaluate(
                    model=model, model_args=f"model=fedpt,base_url={url}/{route},{model_args},num_concurrent=1",
                    tasks=[task], task_manager=tasks, log_samples=True, apply_chat_template=chat)
                seconds[f"{name}/fedpt_serve"] = time.perf_counter() - started
    for name, (model_folder, _, _, task, chat) in runs.items():
        started = time.perf_counter()
        found[f"{name}/hf"] = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_folder},dtype=float32,device=cpu", tasks=[task],
            task_manager=tasks, log_samples=True, batch_size=1, apply_chat_template=chat)
        seconds[f"{name}/hf"] = time.perf_counter() - started
    result = {"benchmark": "lm_eval_check", "model": args.model, "dtype": "float32", "seconds": seconds,
              "lm_eval": getattr(lm_eval, "__version__", "0.4"), "runs": {}, "targets": {}}
    for name, (model_folder, _, _, task, _) in runs.items():
        ours, theirs = per_item(found[f"{name}/fedpt_serve"], task), per_item(found[f"{name}/hf"], task)
        metric = "exact_match,none" if task == "fedpt_exact" else "acc,none"
        score = {k: float(found[f"{name}/{k}"]["results"][task][metric]) for k in ("fedpt_serve", "hf")}
        run = {"model": model_folder.name, "task": task, "metric": metric.split(",")[0], "score": score,
               "items": len(ours)}
        result["targets"][f"{name}: same {run['metric']}"] = bool(score["fedpt_serve"] == score["hf"])
        if task != "fedpt_exact":
            gap = float(max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y)))
            run["max_abs_loglikelihood_difference"] = gap
            result["targets"][f"{name}: log-likelihoods within 1e-3"] = gap <= 1e-3
        else:
            run["answers_that_differ"] = int(sum(a != b for a, b in zip(ours, theirs)))
            run["answers"] = {"fedpt_serve": ours, "hf": theirs}
        result["runs"][name] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
