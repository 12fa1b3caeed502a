"""Plots and a short report of a search: history (baseline marked), parameter importances, kept sizes.

PNG files via matplotlib (for the README and terminals), HTML via plotly (interactive), both written
next to ``study.db`` so ``optuna-dashboard sqlite:///RUN_DIR/study.db`` shows the same study.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from ..files import write_text_atomic


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.value is not None]


def _history(study: optuna.Study, baseline: float, run_dir: Path, warm: dict[str, dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    trials = _completed(study)
    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    best = [min(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(numbers, values, s=14, label="trial")
    ax.step(numbers, best, where="post", color="tab:green", label="best so far")
    ax.axhline(baseline, color="tab:red", linestyle="--", label="LLM-Pruner recipe (trial 0)")
    for name, start in (warm or {}).items():
        label = f"{name} recipe (trial {start['trial']}, warm start)"
        ax.axhline(start["value"], color="tab:purple", linestyle=":", label=label)
    ax.set(xlabel="trial", ylabel="validation perplexity", yscale="log", title="AdaPruner search")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "history.png", dpi=120)
    plt.close(fig)
    html = go.Figure(
        [
            go.Scatter(x=numbers, y=values, mode="markers", name="trial"),
            go.Scatter(x=numbers, y=best, mode="lines", line_shape="hv", name="best so far"),
        ]
    )
    html.add_hline(y=baseline, line_dash="dash", annotation_text="LLM-Pruner recipe")
    for name, start in (warm or {}).items():
        html.add_hline(y=start["value"], line_dash="dot", annotation_text=f"{name} recipe (warm start)")
    html.update_layout(xaxis_title="trial", yaxis_title="validation perplexity", yaxis_type="log")
    html.write_html(run_dir / "history.html", include_plotlyjs="cdn")


def _importances(study: optuna.Study, run_dir: Path) -> dict[str, float]:
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():  # "too few trials" notes: the report says how many there were
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few completed trials or a constant objective
        return {}
    names, values = list(importances)[::-1], list(importances.values())[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    ax.barh(names, values)
    ax.set(xlabel="importance (Optuna's default evaluator)", title="What mattered")
    fig.tight_layout()
    fig.savefig(run_dir / "importances.png", dpi=120)
    plt.close(fig)
    optuna.visualization.plot_param_importances(study).write_html(run_dir / "importances.html", include_plotlyjs="cdn")
    return importances


def _kept(kept: list[list[int]] | None, run_dir: Path) -> None:
    if not kept:
        return
    import matplotlib.pyplot as plt

    layers = range(len(kept))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.bar(layers, [k[0] for k in kept])
    top.set(ylabel="query heads kept")
    bottom.bar(layers, [k[2] for k in kept], color="tab:orange")
    bottom.set(ylabel="MLP channels kept", xlabel="layer")
    fig.suptitle("Best trial: per-layer sizes")
    fig.tight_layout()
    fig.savefig(run_dir / "kept.png", dpi=120)
    plt.close(fig)


def write_report(study: optuna.Study, result: dict[str, Any], run_dir: Path) -> None:
    """history/importances/kept as PNG + HTML, and ``report.md`` that links them."""
    baseline = result["baseline"]["value"]
    _history(study, baseline, run_dir, result.get("warm_starts"))
    importances = _importances(study, run_dir)
    _kept(result["best"].get("kept"), run_dir)
    best = result["best"]
    lines = [
        f"# AdaPruner search: {result['model']} at ratio {result['ratio']}",
        "",
        f"- trials completed: {result['trials']} (sampler {result['sampler']}, space {result['space']['space']})",
        f"- LLM-Pruner recipe (trial 0): validation perplexity **{baseline:.2f}**",
        *(
            f"- {name} recipe (trial {start['trial']}, warm start): validation perplexity {start['value']:.2f}"
            for name, start in result.get("warm_starts", {}).items()
        ),
        f"- best (trial {best['trial']}): **{best['value']:.2f}** ({(1 - best['value'] / baseline) * 100:.0f}% lower)",
        f"- best configuration: `{best['config']}`",
        "",
        "![history](history.png)",
    ]
    if importances:
        lines += ["", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
        lines += ["", "![importances](importances.png)"]
    if best.get("kept"):
        lines += ["", "![kept](kept.png)"]
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
