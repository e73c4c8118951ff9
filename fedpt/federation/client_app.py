"""The Flower ClientApp: a device that fine-tunes the small model on its own data, round after round.

A thin layer: the data comes from fedpt.data (and fedpt.federation.partition in simulation), the training
from fedpt.tuning.local. Which data a node owns is set by its node config: `partition-id` / `num-partitions`
(a share of the run's data source, as in simulation), or `data` (a local .jsonl/.csv file of this device).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpt.config import RunConfig, TuneConfig, from_dict, from_flat, replace
from fedpt.data import Example, load_splits
from fedpt.errors import FedptError
from fedpt.federation.compression import compress
from fedpt.federation.partition import round_seed
from fedpt.federation.privacy import clipped, local_noise
from fedpt.federation.secagg import secagg_mod
from fedpt.runtime import setup_process

app = ClientApp(mods=[secagg_mod])


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
def trainable_model(small: str, tuning_key: str, device: str) -> tuple[Any, Any]:
    """The small model with a fresh adapter, loaded once per process (every client a worker runs shares it: later
    rounds and other clients only overwrite the trained weights)."""
    from fedpt.tuning.local import load_trainable

    return load_trainable(small, TuneConfig(**json.loads(tuning_key)), device)


def _model_of(config: RunConfig) -> tuple[Any, Any]:
    return trainable_model(config.model.small, json.dumps(config.to_dict()["tuning"], sort_keys=True),
                           config.model.device)


def _config(message: Message) -> RunConfig:
    return _config_of(dict(message.content["config"]))


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds and how many examples it has."""
    setup_process()
    pid, examples = client_examples(_config(message), dict(context.node_config))
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-examples": len(examples)})}),
                   reply_to=message)


@app.train()
def train_round(message: Message, context: Context) -> Message:
    """Train on this node's data from the weights sent; reply with the new weights, or with the update in SecAgg+
    rounds (which arrive in Flower's legacy FitIns form, through `secagg_mod`)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    setup_process()
    if "fitins.config" not in message.content.config_records:
        flat = dict(message.content["config"])
        sent = {k: a.numpy() for k, a in message.content["arrays"].items()}
        config = _config_of(flat)
        weights, metrics = _train(config, flat, sent, context)
        arrays = ArrayRecord({k: Array(v) for k, v in _encoded(config, weights, sent, context).items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    flat = dict(fitins.config)
    config = _config_of(flat)
    keys = _trainable_keys(config)
    sent = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    weights, metrics = _train(config, flat, sent, context)
    update = [weights[k] - sent[k] for k in keys]
    # the protocol weighs the mean by this count: 1 each when the mean must be unweighted (central DP)
    cap = float(flat.get("max-examples") or 0) or float("inf")  # the server's cap on one node's weight
    weight = 1 if config.privacy.dp == "central" else int(min(metrics["num-examples"], cap))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def _encoded(config: RunConfig, weights: dict[str, Any], sent: dict[str, Any], context: Context) -> dict[str, Any]:
    """What goes on the wire (federation.update_format): the weights as they are, or the update compressed, with
    the rounding this node lost before carried in its node state (error feedback)."""
    fed = config.federation
    if fed.update_format == "float32":
        return weights
    state = context.state
    residual = {k: a.numpy() for k, a in state["residual"].items()} \
        if fed.error_feedback and "residual" in state.array_records else None
    if residual is not None and residual.keys() != weights.keys():
        residual = None  # another model's leftovers (a changed config): nothing to carry
    encoded, left = compress({k: weights[k] - sent[k] for k in weights}, fed.update_format, residual)
    if fed.error_feedback:
        state["residual"] = ArrayRecord({k: Array(v) for k, v in left.items()})
    return encoded


def _config_of(flat: dict[str, Any]) -> RunConfig:
    return from_flat({k: v for k, v in flat.items() if "." in k or k in ("seed", "out")})


def _trainable_keys(config: RunConfig) -> list[str]:
    from fedpt.tuning.local import trainable_state

    return list(trainable_state(_model_of(config)[0]))


def _train(config: RunConfig, flat: dict[str, Any], sent: dict[str, Any],
           context: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights to send, metrics): local training from `sent`, then the privacy the config asks of the client.
    `flat` is the message's config, for what Flower's strategies add to it (the round, FedProx's mu)."""
    from fedpt.tuning.local import set_trainable_state, train, trainable_state

    server_round = int(flat["server-round"])
    mu = float(flat.get("proximal-mu", config.federation.proximal_mu))  # Flower's FedProx sends it
    tuning = replace(config, tuning={"proximal_mu": mu}).tuning
    pid, examples = client_examples(config, dict(context.node_config))
    model, tokenizer = _model_of(config)
    set_trainable_state(model, sent)
    seed = round_seed(config.seed, server_round, pid)
    stats = train(model, tokenizer, examples, tuning, seed=seed)
    metrics = {"partition-id": pid, "num-examples": len(examples),
               **{k: float(v) for k, v in stats.items() if k != "examples"},
               **({"round-nonce": flat["round-nonce"]} if "round-nonce" in flat else {})}
    weights = trainable_state(model)
    if config.privacy.dp == "local":
        weights = local_noise(weights, sent, config.privacy, seed)
    elif config.privacy.dp == "central" and config.privacy.clipping == "client":
        weights = clipped(weights, sent, config.privacy.clip_norm)
    return weights, metrics
