"""``adapruner run``: search -> prune -> recovery -> evaluation, one command, resumable by stage.

Every stage writes its result atomically into the run directory, so a finished stage is recognised by
its output alone and a rerun skips it (the search stage is itself an Optuna study that continues).
``stages.json`` keeps the wall time of each stage. With ``baseline`` on (the default) LLM-Pruner's
recipe is pruned and evaluated the same way and recovered with LLM-Pruner's own LoRA (``baseline_finetune``
over ``finetune``), so the final table compares the two pipelines end to end.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import api
from .data.pool import DEFAULT_POOL_PER_SOURCE
from .data.sources import ALL_OFFLINE, OFFLINE_SOURCES
from .data.tasks import TASKS
from .errors import AdaPrunerError
from .evaluation.zeroshot import check_request
from .export import check_export_request, default_gguf_name
from .files import write_json_atomic, write_text_atomic
from .methods import LLM_PRUNER_RECIPE
from .pruning.io import read_record
from .pruning.plan import Budget
from .recovery import finetune
from .recovery.config import FinetuneConfig
from .search import search
from .search.objective import SCORES
from .search.space import SearchSpace
from .stages import Stages
from .util import log, read_options_file

SEVEN_TASKS = tuple(TASKS)  # boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa
# RunConfig fields that `adapruner search` takes under the same name (``study`` is its ``study_name``)
SEARCH_OPTIONS = (
    "trials", "sampler", "seed", "pool_per_source", "pool_seq_len", "layers", "head_mode", "storage",
    "objective_data", "objective_tokens", "objective", "pruner", "dtype",
)  # fmt: skip
BASELINE_RECOVERY = {"loss": "lm", "full": False, "lr": 1e-4}  # LLM-Pruner's: LM loss, LoRA, its learning rate


@dataclass
class RunConfig:
    """Every option of ``adapruner run``; a YAML file may hold any of them (flags win)."""

    model: str
    ratio: float
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    search_space: dict[str, Any] = field(default_factory=dict)  # SearchSpace fields
    uniform: bool = False  # every layer pruned alike: stock-architecture outputs (search and baseline)
    pool_per_source: int = DEFAULT_POOL_PER_SOURCE
    pool_seq_len: int | None = None  # tokens per pool sample; None: the longest searched length
    objective_data: str = ALL_OFFLINE  # validation text of the objective (sources or files)
    objective_tokens: int = 1024  # per objective source
    objective: str = "ppl"  # ppl | kl (KL divergence from the dense model)
    pruner: str = "percentile"
    layers: str | None = None  # the search's layer range START:END; None: searched (or LLM-Pruner's)
    head_mode: str = "auto"
    storage: str | None = None  # the search's Optuna storage URL; None: sqlite in the run directory
    study: str = "adapruner"  # the study's name inside the storage
    baseline: bool = True  # also prune/recover/evaluate LLM-Pruner's recipe
    baseline_calibration: str = "books"  # LLM-Pruner's calibration text
    finetune_data: str | None = ALL_OFFLINE  # recovery text; None: no recovery stage
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields, e.g. tokens
    baseline_finetune: dict[str, Any] = field(default_factory=lambda: dict(BASELINE_RECOVERY))  # over `finetune`
    ppl: list[str] = field(default_factory=lambda: list(OFFLINE_SOURCES))
    seq_len: list[int] = field(default_factory=lambda: [128])
    eval_tokens: int | None = 40_960
    tasks: list[str] = field(default_factory=lambda: list(SEVEN_TASKS))
    limit: int | None = None
    dtype: str = "float32"
    align: int = 1  # kept MLP channels multiples of this (search and baseline): 64/256 for kernels and K-quants
    export: str | None = None  # gguf: the final AdaPruner model also as a llama.cpp file
    export_quant: str = "f16"

    def validate(self) -> None:
        Budget(self.ratio)
        if self.trials < 1:
            raise AdaPrunerError(f"--trials {self.trials}: give at least 1")
        self.space()
        if self.objective not in SCORES:
            raise AdaPrunerError(f"unknown objective '{self.objective}': choose one of {', '.join(SCORES)}")
        try:
            FinetuneConfig(**self.finetune).validate()
            FinetuneConfig(**self.recovery_options(baseline=True)).validate()
        except TypeError as exc:
            raise AdaPrunerError(f"unknown fine-tuning option in the run config: {exc}") from None
        if self.export is not None:
            check_export_request(self.export, self.export_quant)
        if self.tasks:
            check_request(self.tasks, self.limit)

    def recovery_options(self, baseline: bool) -> dict[str, Any]:
        """FinetuneConfig options of a model's recovery: the baseline's own over the shared ones."""
        return self.finetune | (self.baseline_finetune if baseline else {})

    def space(self) -> SearchSpace:
        """The SearchSpace: ``search_space`` fields, with ``uniform`` on if the run is uniform."""
        fixed = ({"uniform": True} if self.uniform else {}) | ({"align": self.align} if self.align != 1 else {})
        return SearchSpace(**(self.search_space | fixed))


def load_run_config(path: str | Path | None, **overrides: Any) -> RunConfig:
    """A RunConfig from a YAML file (keys = RunConfig fields); ``overrides`` that are not None win (a
    mapping, such as ``search_space``, key by key)."""
    data = read_options_file(path, RunConfig, "run config") if path is not None else {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = dict(data.get(key) or {}) | value
        elif value is not None:
            data[key] = value
    for key in ("model", "ratio"):
        if key not in data:
            raise AdaPrunerError(f"the run needs a {key}: give it on the command line or in the config file")
    cfg = RunConfig(**data)
    cfg.validate()
    return cfg


def run(cfg: RunConfig, output: str | Path) -> dict[str, Any]:
    """The whole AdaPruner pipeline into ``output``; returns the paths of the evaluation files."""
    run_dir = Path(output)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    stages = Stages.in_dir(run_dir)
    search_dir = run_dir / "search"
    models = {"dense": cfg.model}

    def do_search() -> None:
        options = {name: getattr(cfg, name) for name in SEARCH_OPTIONS}
        search(cfg.model, cfg.ratio, output=search_dir, space=cfg.space(), study_name=cfg.study, **options)

    _search_stage(stages, search_dir, cfg, do_search)
    if cfg.baseline:
        target = run_dir / "llm-pruner"
        stages.run(
            "prune llm-pruner",
            target,
            lambda: api.prune(
                cfg.model,
                cfg.ratio,
                output=target,
                dtype=cfg.dtype,
                seed=cfg.seed,
                method=LLM_PRUNER_RECIPE,
                calibration=cfg.baseline_calibration,
                uniform=cfg.uniform,
                align=cfg.align,
            ),
        )
        models["LLM-Pruner recipe"] = str(target)
    target = run_dir / "adapruner"
    stages.run("prune adapruner", target, lambda: api.prune(cfg.model, from_run=search_dir, output=target))
    models["AdaPruner"] = str(target)
    final = target  # the AdaPruner model a user keeps: the recovered one when there is a recovery
    if cfg.finetune_data:
        for label in [k for k in models if k != "dense"]:
            source = Path(models[label])
            options = cfg.recovery_options(baseline=label != "AdaPruner")
            name = recovery_label(options)
            target = source.with_name(f"{source.name}-{_slug(name)}")
            stages.run(
                f"finetune {source.name}",
                target,
                lambda s=source, t=target, o=options: finetune(s, cfg.finetune_data, t, **o),
            )
            models[f"{label} + {name}"] = str(target)
            final = target if label == "AdaPruner" else final
    if cfg.export is not None:
        gguf = final / default_gguf_name(cfg.export_quant)
        stages.run("export", gguf, lambda: api.export(final, gguf, format=cfg.export, quant=cfg.export_quant))
    evaluations = {}
    for label, location in models.items():
        path = run_dir / "eval" / f"{_slug(label)}.json"
        stages.run(f"evaluate {label}", path, lambda loc=location, p=path, lb=label: _evaluate(cfg, loc, p, lb))
        evaluations[label] = str(path)
    write_report(run_dir, cfg, evaluations, stages.times.data, models)
    return evaluations


def recovery_label(options: dict[str, Any]) -> str:
    """How a recovered model is named in the report: LoRA (LM loss, LLM-Pruner's), KD, KD-LoRA, KD+LM..."""
    cfg = FinetuneConfig(**options)
    if cfg.loss == "lm" or cfg.teacher == "none":
        return "full LM" if cfg.full else "LoRA"
    name = {"kd": "KD", "kd+lm": "KD+LM"}[cfg.loss]
    return name if cfg.full else f"{name}-LoRA"


def _search_stage(stages: Stages, search_dir: Path, cfg: RunConfig, action) -> None:
    """The study continues until it holds ``cfg.trials`` trials; best.json alone does not mean done."""
    best = search_dir / "best.json"
    if best.is_file():
        if json.loads(best.read_text()).get("finished", 0) >= cfg.trials:
            log(f"stage search: done already ({search_dir})")
            return
        best.unlink()  # rewritten by the continued study
    stages.run("search", best, action)


def _evaluate(cfg: RunConfig, location: str, path: Path, label: str) -> None:
    results = api.evaluate(
        location,
        ppl=cfg.ppl,
        seq_len=cfg.seq_len,
        max_tokens=cfg.eval_tokens,
        tasks=cfg.tasks or None,
        limit=cfg.limit if cfg.tasks else None,
        dtype=cfg.dtype,
    )
    results["label"] = label
    write_json_atomic(path, results)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def write_report(
    run_dir: Path, cfg: RunConfig, evaluations: dict[str, str], times: dict[str, float], models: dict[str, str]
) -> None:
    """``report.md`` and a self-contained ``report.html``: comparison, stage times, search plots."""
    table = api.compare(list(evaluations.values()))
    search_dir = run_dir / "search"
    lines = [
        f"# AdaPruner run: {cfg.model} at ratio {cfg.ratio}",
        "",
        f"Search: {cfg.trials} trials ({cfg.sampler}, seed {cfg.seed}); recovery: "
        + (_recovery_text(cfg) if cfg.finetune_data else "none")
        + f"; zero-shot limit: {cfg.limit or 'all documents'}.",
        "",
        "## Results (retention in % of the dense model)",
        "",
        table,
        "",
        "## Parameters",
        "",
    ]
    for label in evaluations:
        if label == "dense":
            continue
        record = _record(Path(models[label]))
        if record:
            params = record["params"]
            lines.append(
                f"- {label}: {params['pruned']:,} of {params['dense']:,} ({record['achieved_ratio']:.1%} removed)"
            )
    lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in times.items()]
    lines += ["", "## Search", "", "See `search/report.md`.", ""]
    lines += [f"![{name}](search/{name}.png)" for name in ("history", "importances", "kept")]
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(run_dir / "report.md", markdown)
    write_text_atomic(run_dir / "report.html", _html(markdown, search_dir))


def _recovery_text(cfg: RunConfig) -> str:
    adapruner = cfg.recovery_options(baseline=False)
    text = f"on `{cfg.finetune_data}`, AdaPruner: {recovery_label(adapruner)} {adapruner or '(defaults)'}"
    if cfg.baseline:
        baseline = cfg.recovery_options(baseline=True)
        text += f", LLM-Pruner recipe: {recovery_label(baseline)} {baseline}"
    return text


def _record(directory: Path) -> dict | None:
    try:
        return read_record(directory)
    except AdaPrunerError:
        return None


def _html(markdown: str, search_dir: Path) -> str:
    """A dependency-free rendering: tables become <table>, plots are embedded as data URIs."""
    body: list[str] = []
    rows: list[list[str]] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
            continue
        if rows:
            head, *rest = rows
            body.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
                + "</table>"
            )
            rows = []
        if line.startswith("!["):
            name = line[2 : line.index("]")]
            png = search_dir / f"{name}.png"
            if png.is_file():
                data = base64.b64encode(png.read_bytes()).decode()
                body.append(f'<img alt="{name}" src="data:image/png;base64,{data}" style="max-width:100%">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{line.lstrip('#').strip()}</h{level}>")
        elif line.strip():
            body.append(f"<p>{line}</p>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;padding:3px 6px}"
    head = f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head>"
    return f"{head}<body>{''.join(body)}</body></html>"
