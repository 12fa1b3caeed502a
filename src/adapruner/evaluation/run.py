"""``adapruner evaluate``: perplexity on the sources' test splits and zero-shot accuracy, as one record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import token_stream
from ..data.sources import OFFLINE_SOURCES
from ..errors import AdaPrunerError
from ..files import write_json_atomic
from ..models.loading import load_model
from ..pruning.plan import count_params
from ..util import log, versions
from . import zeroshot
from .perplexity import GEOMEAN, geometric_mean, perplexity


def evaluate(
    model: str | torch.nn.Module,
    *,
    ppl: tuple[str, ...] | list[str] = OFFLINE_SOURCES,
    seq_len: tuple[int, ...] | list[int] = (128,),
    max_tokens: int | None = 40_960,
    batch_size: int = 8,
    tokenizer: Any = None,
    output: str | Path | None = None,
    dtype: str = "float32",
    tasks: str | list[str] | tuple[str, ...] | None = None,
    limit: int | None = None,
    seed: int = 0,
    task_source: str = "offline",
) -> dict:
    """Perplexity on the test split of each source at each window length, and zero-shot accuracy.

    With several sources, ``perplexity["geomean@L"]`` is their geometric mean at window length ``L``
    (each source weighted equally: a model that gains on one text and loses on another shows it).

    ``tasks`` (e.g. ``["boolq", "piqa"]`` or ``"boolq,piqa"``) are run with lm-evaluation-harness (see
    :mod:`adapruner.evaluation.zeroshot`) on the first ``limit`` documents of each (None: all), offline
    from the fetched task data unless ``task_source="hub"``. ``batch_size`` is used for both.
    """
    names = None
    if tasks:
        names = zeroshot.check_request(tasks, limit, task_source)  # before loading any model
    elif limit is not None:
        raise AdaPrunerError("--limit applies to zero-shot tasks: give --tasks too")
    if isinstance(model, str | Path):
        name = str(model)
        model, tokenizer = load_model(name, dtype)
    else:
        name = getattr(model.config, "_name_or_path", "in-memory model")
        if tokenizer is None:
            raise AdaPrunerError("evaluate() on an in-memory model needs its tokenizer")
    results: dict[str, Any] = {"model": name, "params": count_params(model), "perplexity": {}}
    for source in ppl:
        tokens = token_stream(tokenizer, source, "test", max_tokens)
        for length in seq_len:
            value = perplexity(model, tokens, length, batch_size)
            results["perplexity"][f"{source}@{length}"] = value
            log(f"{name}: {source} perplexity @{length} = {value:.2f}")
    if len(ppl) > 1:
        for length in seq_len:
            values = [results["perplexity"][f"{source}@{length}"] for source in ppl]
            results["perplexity"][f"{GEOMEAN}@{length}"] = geometric_mean(values)
    library_versions = versions()
    if names:
        zs = zeroshot.zero_shot(
            model, tokenizer, names, limit=limit, batch_size=batch_size, seed=seed, source=task_source
        )
        results["zero_shot"] = zs
        library_versions["lm_eval"] = zs["settings"]["lm_eval"]
        for task, entry in zs["tasks"].items():
            log(f"{name}: {task} {entry['metric']} = {entry[entry['metric']]:.4f} ({entry['documents']} documents)")
        log(f"{name}: zero-shot average = {zs['average']:.4f}")
    results["settings"] = {"split": "test", "max_tokens": max_tokens, "dtype": dtype, "versions": library_versions}
    if output is not None:
        write_json_atomic(Path(output), results)
    return results
