"""The run folder: one run per folder, resume points, metrics.jsonl, and final/ without bookkeeping."""

import json

import numpy as np
import pytest

from fedpt import config as cfg
from fedpt.errors import FedptError
from fedpt.federation.run_folder import DONE, METRICS, SERVER_STATE, STATE, RunFolder, read_metrics


def begin(folder: RunFolder, config, resume: bool) -> int:
    """What the server does at the start of a run: check the folder, then claim it."""
    start = folder.check(resume)
    folder.claim(config, start)
    return start


class Saved:
    """Stands in for a model and a tokenizer: save_pretrained writes one file."""

    def __init__(self, name):
        self.name = name

    def save_pretrained(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.name}.json").write_text("{}")


def save(folder, server_round, done=True):
    folder.save_round(server_round, Saved("model"), Saved("tokenizer"), {"w": np.full(2, server_round, np.float32)},
                      {"m_t/w": np.zeros(2)})
    row = {"round": server_round, "global": {"nll": 1.0 / server_round}}
    folder.append_metrics(row)
    if done:
        folder.mark_done(server_round, row)


def test_a_run_resumes_after_its_last_completed_round(tmp_path):
    run = cfg.load(None, [], out=str(tmp_path))
    folder = RunFolder(tmp_path)
    assert begin(folder, run, resume=False) == 0
    folder.append_metrics({"round": 0, "global": {"nll": 2.0}})
    save(folder, 1)
    save(folder, 2, done=False)  # the server died before marking round 2 done
    with pytest.raises(FedptError, match="already holds a run"):
        begin(RunFolder(tmp_path), run, resume=False)
    again = RunFolder(tmp_path)
    assert begin(again, run, resume=True) == 1
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]  # round 2's row is dropped
    state, strategy = again.load_round(1)
    np.testing.assert_array_equal(state["w"], [1, 1])
    np.testing.assert_array_equal(strategy["m_t/w"], [0, 0])
    final = again.write_final(1)
    assert sorted(p.name for p in final.iterdir()) == [".fedpt-final", "README.md", "model.json", "tokenizer.json"]
    assert {STATE, SERVER_STATE, DONE} <= {p.name for p in (tmp_path / "round-1").iterdir()}
    assert json.loads((tmp_path / "config.json").read_text()) == run.to_dict()


def test_a_run_killed_before_its_first_round_resumes_without_a_second_round_0(tmp_path):
    run = cfg.load(None, [], out=str(tmp_path))
    folder = RunFolder(tmp_path)
    begin(folder, run, resume=False)
    folder.append_metrics({"round": 0, "global": {"nll": 2.0}})  # then killed during round 1
    assert begin(RunFolder(tmp_path), run, resume=True) == 0
    assert read_metrics(tmp_path) == []  # the server scores round 0 again: one row, not two


def test_resume_needs_a_run_and_metrics_need_a_folder(tmp_path):
    with pytest.raises(FedptError, match="nothing to resume"):
        begin(RunFolder(tmp_path), cfg.RunConfig(), resume=True)
    with pytest.raises(FedptError, match="has no metrics.jsonl"):
        read_metrics(tmp_path)


def three_rounds(tmp_path):
    run = cfg.load(None, [], out=str(tmp_path))
    folder = RunFolder(tmp_path)
    begin(folder, run, resume=False)
    folder.append_metrics({"round": 0, "global": {"nll": 2.0}})
    for r in (1, 2, 3):
        save(folder, r)
    return run


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.json").write_text("{"), "model.json does not match its checksum"),  # truncated
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda d: (d / SERVER_STATE).write_bytes(b"garbage"), "server-state.npz does not match"),
    (lambda d: (d / DONE).write_text('{"round": 3, "sha'), "round.json is unreadable"),
])
def test_resume_falls_back_to_the_last_intact_round_and_says_so(tmp_path, damage, words):
    run = three_rounds(tmp_path)
    damage(tmp_path / "round-3")
    folder = RunFolder(tmp_path)
    assert begin(folder, run, resume=True) == 2
    assert words in folder.note and "continuing after round 2" in folder.note
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_a_torn_metrics_line_is_repaired_by_resume_and_named_otherwise(tmp_path):
    run = three_rounds(tmp_path)
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"round": 4, "glo')  # the server died while writing
    assert [r["round"] for r in read_metrics(tmp_path, drop_torn_tail=True)] == [0, 1, 2, 3]
    with pytest.raises(FedptError, match="line 5 is not a metrics row"):
        read_metrics(tmp_path)
    assert begin(RunFolder(tmp_path), run, resume=True) == 3
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_a_torn_row_of_a_completed_round_is_restored_not_lost(tmp_path):
    """The crash tore round 3's own row after round-3/ was marked done: before, the resume dropped the row, trained
    nothing and wrote final/ from round 2."""
    run = three_rounds(tmp_path)
    text = (tmp_path / METRICS).read_text()
    (tmp_path / METRICS).write_text(text[: text.rindex('{"round": 3') + 12])
    folder = RunFolder(tmp_path)
    assert begin(folder, run, resume=True) == 3
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[3]["global"]["nll"] == pytest.approx(1 / 3)
    assert "round 3's metrics row was torn: restored" in folder.note


def test_files_fedpt_did_not_create_are_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = cfg.load(None, [], out=str(tmp_path))
    folder = RunFolder(tmp_path)
    begin(folder, run, resume=False)  # a folder with other files is fine
    save(folder, 1)
    folder.write_final(1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    for name in ("metrics.jsonl", "final"):  # a folder holding one of fedpt's names is refused
        other = tmp_path / f"other-{name}"
        other.mkdir()
        (other / name).mkdir() if name == "final" else (other / name).write_text("user data")
        with pytest.raises(FedptError, match=f"already holds a run \\({name}"):
            begin(RunFolder(other), run, resume=False)
    (tmp_path / "final" / ".fedpt-final").unlink()  # a final/ fedpt cannot prove it wrote: not replaced
    with pytest.raises(FedptError, match="was not written by fedpt"):
        folder.write_final(1)


def test_final_is_a_model_card_that_names_its_base_as_the_run_did(tmp_path):
    run = cfg.load(None, [], out=str(tmp_path))
    folder = RunFolder(tmp_path)
    begin(folder, run, resume=False)
    folder.append_metrics({"round": 0, "global": {"nll": 2.0}})
    save(folder, 1)
    (tmp_path / "round-1" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/home/x/cache"}))
    final = folder.write_final(1)
    card = (final / "README.md").read_text()
    # before: peft's empty template ("More Information Needed") and this machine's cache path
    assert f"base_model: {run.model.small}" in card and "round 1: 1.0000" in card and run.model.large in card
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == run.model.small
