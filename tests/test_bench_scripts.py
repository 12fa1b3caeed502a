"""benchmarks/recovery.py and benchmarks/zeroshot_retention.py: configuration parsing, the functions they
call exist, and the zero-shot merge recomputes the seven-task average and its standard error."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recovery():
    return load("recovery")


@pytest.fixture(scope="module")
def retention():
    return load("zeroshot_retention")


def test_recovery_configs_name_only_what_differs_from_the_mode(recovery):
    assert recovery.parse_config("kd-full") == ("kd-full", recovery.MODES["kd-full"])
    name, options = recovery.parse_config("kdlm-full:lr=3e-4;hidden_loss=cosine")
    assert name == "kdlm-full-hidden_losscosine-lr0.0003"
    assert options["lr"] == 3e-4 and options["hidden_loss"] == "cosine" and options["loss"] == "kd+lm"
    with pytest.raises(SystemExit, match="unknown mode"):
        recovery.parse_config("distil")


def test_recovery_builds_its_student_with_the_public_search(recovery):
    import adapruner

    assert recovery.search is adapruner.search  # not an attribute api lacks (a 50% run failed on it)


def half(tasks: dict[str, tuple[float, float, str]], model: str = "m") -> dict:
    entries = {
        task: {metric: acc, f"{metric}_stderr": se, "metric": metric} for task, (acc, se, metric) in tasks.items()
    }
    return {
        "model": model,
        "params": 10,
        "seconds": 5.0,
        "zero_shot": {
            "tasks": entries,
            "average_metric": {task: metric for task, (_, _, metric) in tasks.items()},
            "settings": {"source": "offline", "limit": 500},
        },
    }


def test_merge_averages_all_seven_tasks_with_their_error(retention):
    first = half({"boolq": (0.6, 0.02, "acc"), "piqa": (0.7, 0.02, "acc_norm")})
    second = half({"arc_challenge": (0.3, 0.01, "acc_norm")})
    merged = retention.merge("dense", [first, second], 500)
    zs = merged["zero_shot"]
    assert zs["average"] == pytest.approx((0.6 + 0.7 + 0.3) / 3)
    assert zs["average_stderr"] == pytest.approx(math.sqrt(0.02**2 + 0.02**2 + 0.01**2) / 3)
    assert set(zs["tasks"]) == {"boolq", "piqa", "arc_challenge"} and merged["seconds"] == 10.0
    assert "arc_challenge" in zs["settings"]["limit"]


def test_summary_separates_a_difference_from_noise(retention, tmp_path):
    paths = []
    for label, acc in (("dense", 0.50), ("close", 0.49), ("far", 0.30)):
        merged = retention.merge(label, [half({"boolq": (acc, 0.01, "acc")})], 500)
        paths.append(tmp_path / f"{label}.json")
        paths[-1].write_text(json.dumps(merged))
    lines = "\n".join(retention.summary(paths, "1:0,2:0"))
    assert "close − dense: -1.00 ± 2.77 points (within the 95% interval" in lines
    assert "far − dense: -20.00 ± 2.77 points (outside the 95% interval)" in lines
    assert "far: 30.00 ± 1.96 points; retention 60.00 ±" in lines
    assert "- dense: 50.00 ± 1.96 points\n" in lines  # the reference row has no retention of itself


def test_an_average_without_a_task_leaves_only_that_task_out(retention):
    zs = retention.merge("m", [half({"boolq": (0.9, 0.03, "acc"), "piqa": (0.6, 0.02, "acc_norm")})], 500)["zero_shot"]
    assert retention.without(zs, {"boolq"}) == {"average": 0.6, "average_stderr": pytest.approx(0.02)}
