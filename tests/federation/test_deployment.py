"""Flower's deployment engine on loopback: a SuperLink and 2 SuperNodes (separate processes, gRPC/HTTP), the
project's thin app folder submitted with `flwr run`, one round on tiny models, judged by the run's final status."""

import json
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from flower_processes import BIN, flwr_json, free_ports, start, stop, wait_for_run

from fedpt import config as cfg
from fedpt.federation.run_folder import read_metrics

APP = Path(__file__).parents[2] / "flower"


def test_app_folder_defaults_are_fedpts():
    flat = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert flat.pop("resume") is False
    assert cfg.from_flat(flat) == cfg.RunConfig()


@pytest.mark.slow
@pytest.mark.parametrize("protection", ["", 'privacy.secagg=true privacy.dp="central" privacy.clipping="client" '
                                            'privacy.clip_norm=0.1 privacy.noise_multiplier=0.5'],
                         ids=["plain", "secagg-and-dp"])
def test_superlink_and_two_supernodes_complete_a_round(tiny, tmp_path, protection):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is your name {i}", "response": f"my name is fedpt {i}"})
                            + "\n" for i in range(24)))
    link_port, *node_ports = free_ports(3)
    processes = []
    try:
        link = start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                      "--host", "127.0.0.1", "--port", str(link_port)], tmp_path / "link", tmp_path / "link.log")
        processes.append(link)
        for i, port in enumerate(node_ports):
            processes.append(start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(port),
                                    "--node-config", f"partition-id={i} num-partitions=2"],
                                   tmp_path / f"node{i}", tmp_path / f"node{i}.log"))
        deadline = time.time() + 60
        while True:
            assert link.poll() is None, (tmp_path / "link.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{link_port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the SuperLink never became healthy"
            time.sleep(0.3)
        cli = tmp_path / "cli"
        cli.mkdir()
        (cli / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                         f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        out = tmp_path / "run"
        overrides = (f'out="{out}" model.small="{tiny["small"]}" data.source="{data}" federation.clients=2 '
                     'federation.rounds=1 federation.partition="iid" federation.eval_examples=2 '
                     'tuning.dtype="float32" tuning.local_steps=2 tuning.batch_size=2 tuning.max_length=32 '
                     f'data.test_percent=20 {protection}')
        submitted = flwr_json(["run", str(APP), "local", "--run-config", overrides], cli)
        assert submitted.get("success"), submitted
        status, run = wait_for_run(submitted["run-id"], "local", cli, processes)
        assert status == "finished:completed", run.get("status-details")
        rows = read_metrics(out)
        assert [r["round"] for r in rows] == [0, 1]
        assert [c["partition-id"] for c in rows[1]["clients"]] == [0, 1]
        assert (out / "final" / "adapter_config.json").is_file()
        if protection:  # SecAgg+ and DP ran over the network too: masked vectors sent, epsilon accounted
            assert "failed" not in rows[1] and rows[1]["privacy"]["epsilon"] > 0
            assert all(c["bytes_up"] > c["bytes_down"] for c in rows[1]["clients"])  # int64 masked, not float32
    finally:
        stop(processes)
