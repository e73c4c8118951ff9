"""results.json's own logic: the gap formula, gaps per model, costs from metrics.jsonl, the targets."""

import json

import numpy as np
import pytest

from fedpt.experiment import results as res


def test_gap_closed_by_hand():
    assert res.gap_closed(proxy=1.9, large_base=2.15, large_tuned=1.48) == pytest.approx(0.25 / 0.67)
    assert np.isnan(res.gap_closed(1.0, 2.0, 2.0))
    models = {"large_base": {"nll": 2.0}, "large_direct": {"nll": 1.0}, "fedpt_best": {"nll": 1.25},
              "small_base": {"accuracy": 0.5}}
    assert res.gaps(models, "nll") == {"large_base": 0.0, "large_direct": 1.0, "fedpt_best": 0.75}
    assert res.gaps(models, "accuracy") == {}  # the large models were not scored on it


def test_costs_and_targets_from_metrics(tmp_path):
    def client(pid, scale):
        return {"partition-id": pid, "flops": 10.0 * scale, "seconds": 2.0 * scale, "seconds_per_step": 0.5 * scale,
                "peak_memory_bytes": 1e9 * scale + pid, "bytes_down": 100 * scale, "bytes_up": 100 * scale,
                "train_loss": 1.0}

    for name, scale in (("fedpt", 1), ("direct", 4)):
        (tmp_path / name).mkdir()
        rows = [{"round": 0, "global": {"nll": 3.0}, "clients": []}] + [
            {"round": r, "seconds": 5.0, "global": {"nll": 3.0 - r}, "clients": [client(0, scale), client(1, scale)]}
            for r in (1, 2)]
        if name == "direct":  # a round whose every client was rejected: the model stayed
            rows.append({"round": 3, "seconds": 5.0, "global": {"nll": 1.0}, "clients": [], "failed": "0 accepted"})
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fedpt, direct = res.costs_of(tmp_path / "fedpt"), res.costs_of(tmp_path / "direct")
    assert fedpt["failed_rounds"] == [] and direct["failed_rounds"] == [3]
    assert np.isnan(direct["train_loss_per_round"][2])
    assert fedpt["client_rounds"] == 4 and fedpt["bytes_total"] == 800 and fedpt["heldout_nll_per_round"] == [3, 2, 1]
    assert fedpt["peak_memory_bytes"] == 1e9 + 1
    ratio = res.cost_ratios(fedpt, direct)
    assert ratio["seconds_per_step"] == pytest.approx(0.25) and set(ratio) == set(res.COST_KEYS)
    targets = res.targets({res.HEADLINE: 0.79}, ratio)
    assert not targets[res.GAP_TARGET]["met"] and targets[res.STEP_TARGET]["met"]
    assert targets[res.MEMORY_TARGET]["value"] == pytest.approx((1e9 + 1) / (4e9 + 1))
    assert set(targets) == {res.GAP_TARGET, *res.COST_TARGETS}


def test_task_targets_judge_the_chosen_fusion_and_the_premise_that_direct_tuning_helped():
    def row(passed):
        return {"tasks": {"gsm": {"passed": {f"p{i}": bool(v) for i, v in enumerate(passed)}}}}

    base, direct = [0] * 20 + [1] * 20, [0] * 4 + [1] * 36  # direct solves 16 more of 40
    models = {"large_base": row(base), "large_direct": row(direct), "fedpt_best": row([0] * 8 + [1] * 32)}
    found = res.task_targets(models, {"gsm": res.task_gaps(models, "gsm")})
    premise, gap = found["gsm_direct_beats_large_base"], found["gsm_gap_closed_at_least_0.8"]
    assert premise["value"] == pytest.approx(0.4) and premise["met"] and premise["interval_95"][0] > 0
    assert gap["value"] == pytest.approx(12 / 16) and not gap["met"] and gap["model"] == res.HEADLINE
    # a direct model no better than its base: the premise fails, whatever the proxy does
    models["large_direct"] = row(base[1:] + [1])
    assert not res.task_targets(models, {"gsm": res.task_gaps(models, "gsm")})["gsm_direct_beats_large_base"]["met"]
