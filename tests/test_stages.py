"""The resumable stage runner shared by `adapruner run` and the benchmarks."""

from __future__ import annotations

import json

import pytest

from adapruner.stages import Stages, StageTimes


def test_a_stage_runs_once_and_its_time_is_kept(tmp_path):
    stages = Stages.in_dir(tmp_path)
    output = tmp_path / "out.txt"
    calls = []

    def make() -> None:
        calls.append(1)
        output.write_text("done")

    assert stages.run("make", output, make) and stages.run("make", output, make)
    assert calls == [1] and stages.ran == 1
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"make"}
    assert Stages.in_dir(tmp_path).run("make", output, make) and calls == [1]  # a rerun skips it too


def test_without_keep_going_a_failure_ends_the_run(tmp_path):
    def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        Stages.in_dir(tmp_path).run("broken", tmp_path / "x", broken)
    assert not (tmp_path / "stages.json").exists()  # no time for a stage that did not finish


def test_keep_going_lists_failures_and_missing_inputs_and_runs_the_rest(tmp_path):
    stages = Stages(keep_going=True)
    times = StageTimes(tmp_path / "times.json")

    def broken() -> None:
        raise ValueError("boom")

    assert not stages.run("broken", False, broken)
    assert not stages.run("needs", False, lambda: None, [tmp_path / "missing"])
    assert stages.run("fine", False, lambda: None, times=times, key="fine.json")
    assert stages.failures[0] == "broken: ValueError: boom"
    assert "missing" in stages.failures[1] and stages.ran == 1
    assert StageTimes(tmp_path / "times.json").get("fine.json") is not None


def test_dry_run_lists_what_would_run(tmp_path):
    (tmp_path / "done").write_text("")
    stages = Stages(dry_run=True)
    stages.run("done", tmp_path / "done", lambda: pytest.fail("a done stage ran"))
    stages.run("todo", tmp_path / "todo", lambda: pytest.fail("a dry run ran a stage"))
    assert stages.pending == ["todo"] and stages.ran == 0


def test_unreadable_times_are_an_empty_record(tmp_path):
    (tmp_path / "stages.json").write_text("{not json")
    assert StageTimes(tmp_path / "stages.json").data == {}
