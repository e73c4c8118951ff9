"""What privacy costs FedPT on the real pair: the share of the large model's gap closed (test NLL, alpha = 1) and the
seconds per round with no protection, with SecAgg+, and with client-level DP at a few noise levels; the epsilon
each spent; and, by DP-FedAvg's noise-to-signal ratio, how many clients per round would give epsilon <= 8.

    python benchmarks/privacy.py --out runs/privacy [--rounds 2] [--local-steps 5] [--test-examples 48]
                                 [--noise 0.5 2.0] [--json docs/results/benchmarks/privacy.json]

Stages (each federation is reused if its folder already holds a final model, so a rerun continues):
1. the unprotected FedPT federation; its clients' median update norm in round 1 becomes the DP clip norm C
   (unless --clip), so that clipping binds for about half of the updates;
2. SecAgg+, then central DP (server-side clipping) at each noise multiplier z, same recipe and seed;
3. the large model directly federated with the same recipe (the gap's other end), scored alone;
4. every FedPT adapter scored as the proxy with the large model, on the same test pairs.

Extrapolation: DP-FedAvg adds noise of std z*C/m to the mean of m clipped updates, so the same noise on the
mean (the same utility, to first order) with m' clients per round takes z' = z * m'/m. For a population of N
clients (delta = 1/N) and the run's rounds, the smallest m' whose epsilon is <= 8 is found with fedpt's
accountant (sampling m' of N without replacement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedpt import config as cfg
from fedpt.files import write_atomic
from fedpt.runtime import quiet_transformers, setup_process


def recipe_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options of the cut-down experiment recipe this benchmark and benchmarks/clients.py share."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiment-chatterbot.toml")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4, help="simulated clients, all trained every round")
    parser.add_argument("--test-examples", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def recipe(args: argparse.Namespace, name: str) -> tuple[cfg.RunConfig, dict, Callable[[], None]]:
    """(the recipe's config, the results so far in OUT/NAME.json, save()): a rerun continues from what is saved."""
    setup_process()
    quiet_transformers()
    base = cfg.load(args.config, [f"federation.rounds={args.rounds}", f"tuning.local_steps={args.local_steps}",
                                  f"federation.clients={args.clients}", "federation.fraction=1.0",
                                  "distill.every=0"])
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / f"{name}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"benchmark": name, "config": args.config, "rounds": args.rounds,
                    "local_steps": args.local_steps, "clients_per_round": args.clients,
                    "test_examples": args.test_examples, "variants": results.get("variants", {})})

    def save() -> None:
        write_atomic(results_file, json.dumps(results, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.json, json.dumps(results, indent=2))

    return base, results, save


def main() -> None:
    parser = recipe_parser(__doc__, "runs/privacy")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 2.0], help="DP noise multipliers z")
    parser.add_argument("--clip", type=float, default=0.0, help="DP clip norm (0: the plain run's median)")
    args = parser.parse_args()
    base, results, save = recipe(args, "privacy")

    # 1-2: the FedPT federations
    plain = train(base, args.out / "none")
    norms = [c["update_norm"] for c in read_rows(plain)[1]["clients"]]
    clip = args.clip or statistics.median(norms)
    results["clip_norm"], results["round1_update_norms"] = clip, norms
    variants = {"none": base, "secagg": cfg.replace(base, privacy={"secagg": True})}
    for z in args.noise:
        variants[f"dp-z{z:g}"] = cfg.replace(base, privacy={"dp": "central", "clip_norm": clip,
                                                             "noise_multiplier": z})
    for name, config in variants.items():
        folder = train(config, args.out / name)
        rows = read_rows(folder)
        results["variants"].setdefault(name, {}).update({
            "seconds_per_round": statistics.mean(r["seconds"] for r in rows[1:]),
            "bytes_up_per_client_round": statistics.mean(c["bytes_up"] for r in rows[1:] for c in r["clients"]),
            "small_heldout_nll": rows[-1]["global"]["nll"],
            **({"privacy": rows[-1]["privacy"]} if "privacy" in rows[-1] else {}),
        })
        save()
    # the same clients and seeds with and without SecAgg+: what its quantisation changed in the global model
    plain_state = dict(np.load(args.out / "none" / "round-1" / "state.npz"))
    secure_state = dict(np.load(args.out / "secagg" / "round-1" / "state.npz"))
    results["secagg_round1_max_abs_difference"] = max(
        float(np.abs(secure_state[k].astype(np.float64) - plain_state[k]).max()) for k in plain_state)
    results["round1_max_abs_lora_b"] = max(float(np.abs(v).max()) for k, v in plain_state.items() if "lora_B" in k)
    save()
    # 3: the gap's ends
    direct = train(cfg.replace(base, model={"small": base.model.large}), args.out / "direct")
    results["direct_seconds_per_round"] = statistics.mean(r["seconds"] for r in read_rows(direct)[1:])
    score(base, args, results, variants, save)
    # the noisiest DP level whose gap closed is within 5 points of the unprotected run's: "the measured utility"
    kept = [k for k, v in results["variants"].items() if "privacy" in v
            and v["gap_closed"] >= results["variants"]["none"]["gap_closed"] - 0.05]
    if kept:
        chosen = max(kept, key=lambda k: results["variants"][k]["privacy"]["noise_multiplier"])
        results["extrapolation"] = extrapolate({**results, "variants": {chosen: results["variants"][chosen]}},
                                               args.rounds)
    save()
    print(json.dumps(results, indent=2))


def train(config: cfg.RunConfig, folder: Path) -> Path:
    from fedpt.experiment.run import federate

    started = time.time()
    federate(config, folder)
    print(f"{folder.name}: {time.time() - started:.0f} s", flush=True)
    return folder


def read_rows(folder: Path) -> list[dict]:
    from fedpt.federation.run_folder import read_metrics

    return read_metrics(folder)


def score(base: cfg.RunConfig, args: argparse.Namespace, results: dict, variants: dict, save) -> None:
    """Test NLL of the large model alone, directly tuned, and proxy-tuned by each variant's adapter (alpha = 1)."""
    from fedpt.data import load_splits
    from fedpt.experiment.results import gap_closed
    from fedpt.proxy import Fusion, ProxyTunedLM, load_expert, load_tuned
    from fedpt.proxy.spec import ModelSpec
    from fedpt.scoring import nll

    test = load_splits(base.data)["test"][: args.test_examples]
    length = base.score_max_length
    if "large_direct_nll" not in results:
        results["large_direct_nll"] = nll(load_tuned(base.model.large, args.out / "direct" / "final"), test,
                                          max_length=length)["nll"]
        save()
    large = ModelSpec.from_config(base.model).open_large()
    if "large_base_nll" not in results:
        results["large_base_nll"] = nll(large, test, max_length=length)["nll"]
        save()
    for name in variants:
        entry = results["variants"][name]
        if "proxy_nll" not in entry:
            expert = load_expert(base.model.small, args.out / name / "final")
            entry["proxy_nll"] = nll(ProxyTunedLM(large, expert, fusion=Fusion(alpha=1.0)), test,
                                     max_length=length)["nll"]
            save()
        entry["gap_closed"] = gap_closed(entry["proxy_nll"], results["large_base_nll"], results["large_direct_nll"])


def extrapolate(results: dict, rounds: int, target: float = 8.0) -> dict:
    """Clients per round m' that keep each DP level's noise on the mean (z*C/m) and spend epsilon <= target, over
    the run's rounds and over 100 rounds (a longer deployment), for populations of 10^4..10^6 clients."""
    from fedpt.federation.privacy import Accountant

    m = results["clients_per_round"]
    candidates = sorted({max(1, round(10 ** (k / 40))) for k in range(0, 241)})
    out: dict = {}
    for name, entry in results["variants"].items():
        if "privacy" not in entry:
            continue
        z = entry["privacy"]["noise_multiplier"]
        for schedule in sorted({rounds, 100}):
            for population in (10_000, 100_000, 1_000_000):
                found = None
                for clients in candidates:
                    if clients > population:
                        break
                    multiplier = z * clients / m
                    federation = cfg.FederationConfig(clients=population, fraction=clients / population,
                                                      rounds=schedule)
                    accountant = Accountant(cfg.PrivacyConfig(dp="central", noise_multiplier=multiplier),
                                            federation, multiplier)
                    accountant.spend(schedule)
                    if accountant.epsilon() <= target:
                        found = {"clients_per_round": clients, "noise_multiplier": multiplier,
                                 "epsilon": accountant.epsilon(), "delta": accountant.delta}
                        break
                out.setdefault(name, {}).setdefault(f"{schedule} rounds", {})[str(population)] = found
    return out


if __name__ == "__main__":
    main()
