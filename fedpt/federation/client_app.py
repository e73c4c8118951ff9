"""The Flower ClientApp: a device that fine-tunes the small model on its own data, round after round.

A thin layer: the data comes from fedpt.data (and fedpt.federation.partition in simulation), the training
from fedpt.tuning.local. Which data a node owns is set by its node config: `partition-id` / `num-partitions`
(a share of the run's data source, as in simulation), or `data` (a local .jsonl/.csv file of this device).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpt.config import RunConfig, TuneConfig, from_dict, from_flat, replace
from fedpt.data import Example, load_splits
from fedpt.errors import FedptError
from fedpt.federation.privacy import clipped, local_noise
from fedpt.runtime import setup_process

app = ClientApp()


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed per (run, round, client): the same on a resumed run as on an uninterrupted one."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{server_round}/{partition_id}".encode()).digest()[:4], "little")


def client_examples(config: RunConfig, node_config: dict[str, Any]) -> tuple[int, list[Example]]:
    """(partition id, training examples) of this node."""
    if "data" in node_config:
        data = replace(config, data={"source": str(node_config["data"])}).data
        return int(node_config.get("partition-id", 0)), load_splits(data)["train"]
    if "partition-id" not in node_config:
        raise FedptError("this SuperNode has neither 'partition-id' nor 'data' in its --node-config")
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", config.federation.clients))
    if n != config.federation.clients or not 0 <= pid < n:
        raise FedptError(f"node partition {pid} of {n} does not fit federation.clients = {config.federation.clients}")
    tree = config.to_dict()
    key = json.dumps({"seed": tree["seed"], "data": tree["data"], "federation": tree["federation"]}, sort_keys=True)
    return pid, _partitions(key)[pid]


@lru_cache(maxsize=4)
def _partitions(key: str) -> list[list[Example]]:
    """Every client's examples for one (seed, data, federation) setting, computed once per process."""
    from fedpt.federation.partition import partition

    config = from_dict(json.loads(key))
    return partition(load_splits(config.data)["train"], config.federation, config.seed)


@lru_cache(maxsize=1)
def trainable_model(small: str, tuning_key: str) -> tuple[Any, Any]:
    """The small model with a fresh adapter, loaded once per process: later rounds only overwrite the weights."""
    from fedpt.models import load_model
    from fedpt.tuning.local import make_trainable

    tuning = TuneConfig(**json.loads(tuning_key))
    model, tokenizer, _ = load_model(small, dtype=tuning.dtype)
    return make_trainable(model, tuning), tokenizer


def _config(message: Message) -> RunConfig:
    return from_flat({k: v for k, v in message.content["config"].items() if "." in k or k in ("seed", "out")})


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds and how many examples it has."""
    setup_process()
    pid, examples = client_examples(_config(message), dict(context.node_config))
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-examples": len(examples)})}),
                   reply_to=message)


@app.train()
def train_round(message: Message, context: Context) -> Message:
    from fedpt.tuning.local import set_trainable_state, train, trainable_state

    setup_process()
    config = _config(message)
    server_round = int(message.content["config"]["server-round"])
    mu = float(message.content["config"].get("proximal-mu", 0.0))  # sent by Flower's FedProx
    tuning = replace(config, tuning={"proximal_mu": mu}).tuning
    pid, examples = client_examples(config, dict(context.node_config))
    model, tokenizer = trainable_model(config.model.small, json.dumps(config.to_dict()["tuning"], sort_keys=True))
    sent = {k: a.numpy() for k, a in message.content["arrays"].items()}
    set_trainable_state(model, sent)
    seed = round_seed(config.seed, server_round, pid)
    stats = train(model, tokenizer, examples, tuning, seed=seed)
    metrics = {"partition-id": pid, "num-examples": len(examples),
               **{k: float(v) for k, v in stats.items() if k != "examples"}}
    weights = trainable_state(model)
    if config.privacy.dp == "local":
        weights = local_noise(weights, sent, config.privacy, seed)
    elif config.privacy.dp == "central" and config.privacy.clipping == "client":
        weights = clipped(weights, sent, config.privacy.clip_norm)
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)
