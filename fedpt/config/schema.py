"""The run configuration's schema: every section, each key typed by its annotation with one default, each
section checking its own values; torch-free. (Reading it from TOML, `--set` overrides or Flower's flat run
config: reading.py.)

Sections: `[model]`, `[data]`, `[federation]`, `[privacy]`, `[tuning]`, `[distill]`, `[experiment]` (every key is in
configs/chatterbot.toml). Flower's run config is the same tree flattened with dots ("tuning.lora_r"), with
lists written as comma-separated text. Each section checks its own values and says what is wrong in one line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedpt.config.federation import (  # noqa: F401 (re-exported: the schema is one namespace)
    DP_MODES,
    PARTITIONS,
    STRATEGIES,
    UPDATE_FORMATS,
    FederationConfig,
    PrivacyConfig,
)
from fedpt.errors import FedptError

TASKS = ("humaneval", "codeio", "gsm")  # fedpt.tasks.evaluate.TASKS
QUANTIZE = ("none", "int8", "nf4")
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def valid_device(name: str) -> bool:
    """Whether `name` is a device fedpt knows how to place models on (whether it is there is for torch to say)."""
    return name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name) is not None
DTYPE_NAMES = ("auto", "bfloat16", "float32", "float16")
BACKENDS = ("transformers", "llama.cpp")


@dataclass
class ModelConfig:
    small: str = "qwen2.5-coder-0.5b-instruct"
    large: str = "qwen2.5-coder-1.5b-instruct"  # a name, a local folder, or a server URL (http://HOST:PORT/v1)
    large_served_name: str = ""  # a URL's model name ("" takes the server's first)
    large_api_key_env: str = ""  # a URL's API key: the NAME of the environment variable holding it
    large_top_k: int = 20  # a URL's log-probabilities per position
    large_weights: str = ""  # when `large` is a URL: local weights for what needs them (the direct baseline)
    device: str = "auto"  # where models run and train: "auto" (a CUDA GPU if torch sees one, else the CPU), "cpu",
    #                       "cuda", "cuda:N", "mps"
    large_device_map: str = ""  # "auto": spread the large model over every GPU (too big for one); "": on `device`
    backend: str = "transformers"  # what runs the proxy's models where they are evaluated, generate and teach:
    #                                "llama.cpp" runs them from their GGUF files (training stays in transformers)

    def __post_init__(self) -> None:
        if not valid_device(self.device):
            raise FedptError(f"model.device must be {DEVICES}, got '{self.device}'")
        if self.backend not in BACKENDS:
            raise FedptError(f"model.backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if self.large_device_map not in ("", "auto"):
            raise FedptError(f"model.large_device_map must be '' or 'auto', got '{self.large_device_map}'")


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from: "chatterbot", "polarity", a .jsonl/.csv path, or "hf:NAME[:CONFIG]"."""

    source: str = "chatterbot"
    prompt_field: str = "prompt"
    response_field: str = "response"
    group_field: str = ""  # column for natural partitions; chatterbot uses its category
    split: str = "train"  # split of a Hugging Face dataset
    categories: list[str] = field(default_factory=list)  # chatterbot only: restrict to these category files
    test_percent: int = 10
    validation_percent: int = 10

    def __post_init__(self) -> None:
        if not (1 <= self.test_percent and 0 <= self.validation_percent
                and self.test_percent + self.validation_percent < 100):
            raise FedptError(f"data.test_percent must be >= 1 (the held-out loss needs pairs), validation_percent >= "
                             f"0, and together under 100 (training needs the rest), got {self.test_percent} and "
                             f"{self.validation_percent}")


@dataclass
class TuneConfig:
    """Local fine-tuning: what one device does in a round."""

    mode: str = "lora"  # "lora" or "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    micro_batch_size: int = 0  # rows per forward and backward, gradients summed over the batch (the same step in
    #                            less memory); 0: the whole batch at once
    max_length: int = 96
    pad_multiple: int = 16  # batch widths padded to a multiple: few shapes, so CPU kernel caches stop growing
    local_steps: int = 8
    local_epochs: float = 0.0  # when > 0, train this many passes over the client's data instead of local_steps
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the loss
    dtype: str = "auto"  # of the frozen weights (auto: bfloat16 where computed natively, else float32); trained
    #                      weights are kept in float32
    quantize: str = "none"  # the frozen weights of a LoRA client: "int8" (CPU or GPU), "nf4" (QLoRA: CUDA and
    #                         bitsandbytes); the server keeps full precision
    chat: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise FedptError(f"tuning mode must be 'lora' or 'full', got '{self.mode}'")
        if self.quantize not in QUANTIZE:
            raise FedptError(f"tuning.quantize must be one of {', '.join(QUANTIZE)}, got '{self.quantize}'")
        if self.quantize != "none" and self.mode != "lora":
            raise FedptError("tuning.quantize freezes the base weights in int8/nf4: it needs tuning.mode = 'lora'")
        for name in ("lora_r", "batch_size", "max_length", "pad_multiple"):
            if getattr(self, name) < 1:
                raise FedptError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.micro_batch_size <= self.batch_size:
            raise FedptError(f"tuning.micro_batch_size must lie in [0, batch_size = {self.batch_size}] (0: the whole "
                             f"batch at once), got {self.micro_batch_size}")
        if self.local_steps < 1 and self.local_epochs <= 0:
            raise FedptError("set local_steps >= 1 or local_epochs > 0")
        if not 0 < self.learning_rate < math.inf:
            raise FedptError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise FedptError(f"tuning.lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.dtype not in DTYPE_NAMES:
            raise FedptError(f"unknown tuning.dtype '{self.dtype}'; choose one of: {', '.join(DTYPE_NAMES)}")
        self.target_modules = list(self.target_modules)


@dataclass
class DistillConfig:
    """The iterative loop: the server distils the proxy-tuned large model into the small one between rounds."""

    every: int = 0  # distil after every this many rounds; 0 turns distillation off
    texts: str = "prompts"  # "prompts": the training prompts without answers; "wikipedia": gensim's test dump
    n_texts: int = 48
    max_new_tokens: int = 32  # length of the teacher's answers
    top_k: int = 64
    steps: int = 12
    batch_size: int = 4
    learning_rate: float = 5e-4
    alpha: float = 1.0  # the teacher: the proxy with this alpha,
    weight: float = 0.0  # mixed with the tuned small model by this share (fedpt/proxy/fusion.py)

    def __post_init__(self) -> None:
        if self.every < 0 or self.n_texts < 1 or self.top_k < 1 or self.steps < 1:
            raise FedptError("distill.every must be >= 0; n_texts, top_k and steps >= 1")
        if self.texts not in ("prompts", "wikipedia"):
            raise FedptError(f"distill.texts must be 'prompts' or 'wikipedia', got '{self.texts}'")


@dataclass
class ExperimentConfig:
    """What `fedpt experiment` compares and sweeps (the run's other sections are the shared recipe)."""

    alpha: float = 1.0  # the proxy's alpha as configured (FedPT as published)
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5])  # swept, chosen on validation
    fusion_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # geometric mixtures, on validation
    dynamic: bool = True  # also the per-token (dynamic logit fusion) alpha
    metric: str = "rouge"  # "rouge": ROUGE-L and exact match of greedy answers; "choice": accuracy over the answers
    test_examples: int = 0  # 0: the whole test split
    validation_examples: int = 0
    generate_examples: int = 32  # test pairs answered greedily for ROUGE-L / exact match and timing
    max_new_tokens: int = 32
    central_small: bool = True  # also tune the small model centrally, as an upper bound for step 1
    distill_variant: bool = True  # also run FedPT with [distill] every > 0 (the iterative loop)
    tasks: list[str] = field(default_factory=list)  # real tasks every model is judged on: humaneval, codeio, gsm
    task_problems: int = 0  # the first N problems of each task (gsm: a fixed sample); 0: all
    task_max_tokens: int = 384  # new tokens per answer on the tasks
    choose_on: str = "nll"  # what picks FedPT's fusion on validation: "nll", or one of `tasks` (its pass@1)
    choose_problems: int = 100  # validation problems each fusion answers when choose_on is a task

    def __post_init__(self) -> None:
        if self.metric not in ("rouge", "choice"):
            raise FedptError(f"experiment.metric must be 'rouge' or 'choice', got '{self.metric}'")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise FedptError(f"experiment.tasks: unknown task '{unknown[0]}'; known: {', '.join(TASKS)}")
        if self.choose_on != "nll" and self.choose_on not in self.tasks:
            raise FedptError(f"experiment.choose_on must be 'nll' or one of experiment.tasks {self.tasks}, "
                             f"got '{self.choose_on}'")
        if self.choose_problems < 1:
            raise FedptError("experiment.choose_problems must be at least 1")
        if self.task_problems < 0 or self.task_max_tokens < 1:
            raise FedptError("experiment.task_problems must be >= 0 and experiment.task_max_tokens >= 1")
        self.alphas = [float(a) for a in self.alphas]
        self.fusion_weights = [float(w) for w in self.fusion_weights]
        if any(not 0 < w <= 1 for w in self.fusion_weights):
            raise FedptError("experiment.fusion_weights must lie in (0, 1]")


def default_data() -> DataConfig:
    """Four chatterbot categories: one client each, a natural non-IID split."""
    return DataConfig(source="chatterbot", categories=["ai", "emotion", "psychology", "humor"])


@dataclass
class RunConfig:
    """The embedded defaults are configs/chatterbot.toml (a test keeps the two equal)."""

    seed: int = 0
    out: str = "runs/chatterbot"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=default_data)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tuning: TuneConfig = field(default_factory=TuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    def __post_init__(self) -> None:
        privacy, fed = self.privacy, self.federation
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise FedptError(f"seed must be a whole number in [0, 2^32), got {self.seed!r}")
        if privacy.dp != "off" and fed.strategy not in ("fedavg", "fedprox"):
            raise FedptError(f"differential privacy needs federation.strategy 'fedavg' or 'fedprox', not "
                             f"'{fed.strategy}': its noise is calibrated to a mean of clipped updates")
        if privacy.secagg:
            if fed.strategy not in ("fedavg", "fedprox", "fedadam", "fedyogi"):
                raise FedptError(f"secure aggregation gives the server only the mean update; strategy "
                                 f"'{fed.strategy}' needs each client's update")
            if privacy.dp == "central" and privacy.clipping != "client":
                raise FedptError("with privacy.secagg the server cannot clip updates it cannot see: set "
                                 "privacy.clipping = 'client'")
            if fed.clients_per_round() < 2:
                raise FedptError("secure aggregation needs at least 2 clients per round")
            if fed.update_format != "float32":
                raise FedptError("privacy.secagg quantises updates itself: keep federation.update_format = 'float32'")
        if privacy.dp != "off" and privacy.delta * fed.clients >= 1 and not privacy.allow_large_delta:
            raise FedptError(f"privacy.delta {privacy.delta:g} is at least 1/{fed.clients} (1 / federation.clients): "
                             "publishing one client's data in full meets it, so epsilon would mean nothing; leave it "
                             "0 (min(1e-5, 0.1 / clients)) or set privacy.allow_large_delta = true")
        if fed.update_format != "float32" and fed.error_feedback and privacy.dp == "central" \
                and privacy.clipping == "client":
            raise FedptError("a client-clipped update plus carried rounding error can exceed privacy.clip_norm: set "
                             "federation.error_feedback = false or privacy.clipping = 'server'")

    @property
    def score_max_length(self) -> int:
        """Tokens of prompt + reference answer read when scoring: training sequences are cut to half of it."""
        return self.tuning.max_length * 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self, sections: Sequence[str] | None = None) -> dict[str, Any]:
        """Flower's run-config form: dotted keys, scalar values, lists as comma-separated text; only `sections`
        (and the top-level keys) when given."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if sections is not None and key in SECTIONS and key not in sections:
                continue
            if isinstance(value, dict):
                for inner, v in value.items():
                    out[f"{key}.{inner}"] = ",".join(map(str, v)) if isinstance(v, list | tuple) else v
            else:
                out[key] = value
        return out


# what a client reads of the run config: the server sends these sections only
CLIENT_SECTIONS = ("model", "data", "federation", "privacy", "tuning")
SECTIONS = {"model": ModelConfig, "data": DataConfig, "federation": FederationConfig, "privacy": PrivacyConfig,
            "tuning": TuneConfig,
            "distill": DistillConfig, "experiment": ExperimentConfig}
