"""Fast tests of text sources, splits and calibration sampling on a tiny fake data cache."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import torch

from adapruner.data import available_sources, load_documents, sample_calibration, sources, split_documents, token_stream
from adapruner.errors import AdaPrunerError, OfflineError

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
DOC_WORDS = 40
DOC_COUNT = 50


def fake_document(index: int, words: int = DOC_WORDS) -> str:
    """``words`` whitespace tokens; the first names the document so tests can tell documents apart."""
    body = " ".join(WORDS[(index + k) % len(WORDS)] for k in range(words - 1))
    return f"doc{index:03d} {body}"


@pytest.fixture
def documents() -> list[str]:
    return [fake_document(i) for i in range(DOC_COUNT)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, documents: list[str]) -> Path:
    """A data cache with every offline source holding the same 50 equal-length documents."""
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    for name in sources.OFFLINE_SOURCES:
        sources.write_jsonl(data / f"{name}.jsonl", documents)
    return tmp_path


@pytest.fixture
def tokenizer(documents: list[str]):
    """A word-level tokenizer trained on the fly: one token per word, no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(documents, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- splits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", sources.OFFLINE_SOURCES)
def test_offline_splits_partition_the_documents_in_order(cache: Path, documents: list[str], source: str) -> None:
    parts = [load_documents(source, split) for split in sources.SPLITS]
    assert all(parts)
    assert [doc for part in parts for doc in part] == documents
    assert not set(parts[0]) & set(parts[1]) | set(parts[1]) & set(parts[2]) | set(parts[0]) & set(parts[2])


def test_splits_follow_documented_proportions(cache: Path, documents: list[str]) -> None:
    total = sum(map(len, documents))
    fractions = [sum(map(len, load_documents("wiki", split))) / total for split in sources.SPLITS]
    assert fractions == pytest.approx([0.7, 0.1, 0.2], abs=1 / DOC_COUNT)


def test_splits_are_deterministic(cache: Path) -> None:
    assert load_documents("books", "test") == load_documents("books", "test")


def test_split_cuts_at_nearest_document_boundary() -> None:
    docs = ["a" * 10] * 7 + ["b" * 10] + ["c" * 10] * 2
    assert split_documents(docs, "calibration") == docs[:7]
    assert split_documents(docs, "validation") == ["b" * 10]
    assert split_documents(docs, "test") == docs[8:]


def test_split_keeps_every_part_non_empty_with_uneven_documents() -> None:
    docs = ["x" * 1000, "y", "z"]
    assert [split_documents(docs, split) for split in sources.SPLITS] == [["x" * 1000], ["y"], ["z"]]


def test_split_needs_three_documents() -> None:
    with pytest.raises(AdaPrunerError, match="at least 3"):
        split_documents(["one", "two"], "test")


def test_unknown_split(cache: Path) -> None:
    with pytest.raises(AdaPrunerError, match="unknown split 'train'"):
        load_documents("wiki", "train")


# --- local files -------------------------------------------------------------------------------


def test_local_txt_uses_blank_lines_between_documents(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("one\nstill one\n\n  \ntwo\n\n\nthree\n\nfour\n", encoding="utf-8")
    parts = [load_documents(str(path), split) for split in sources.SPLITS]
    assert [doc for part in parts for doc in part] == ["one\nstill one", "two", "three", "four"]
    assert all(parts)


def test_local_jsonl_reads_text_field(tmp_path: Path, documents: list[str]) -> None:
    path = write_lines(tmp_path / "corpus.jsonl", [json.dumps({"text": d, "id": i}) for i, d in enumerate(documents)])
    assert load_documents(str(path), "calibration") == split_documents(documents, "calibration")


def test_local_jsonl_bad_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"body": "no text"}'])
    with pytest.raises(AdaPrunerError, match=r"bad.jsonl:2 .*'text'"):
        load_documents(str(path), "test")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl"])
def test_missing_local_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(AdaPrunerError, match="does not exist"):
        load_documents(str(tmp_path / name), "calibration")


def test_local_file_of_other_type(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(AdaPrunerError, match=r"not a \.txt or \.jsonl"):
        load_documents(str(path), "calibration")


# --- errors for named sources ------------------------------------------------------------------


def test_unknown_source_lists_the_sources(cache: Path) -> None:
    with pytest.raises(AdaPrunerError, match="unknown source 'wikipedia'") as caught:
        load_documents("wikipedia", "test")
    assert all(name in str(caught.value) for name in available_sources())


def test_offline_source_not_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path))
    with pytest.raises(AdaPrunerError, match="`adapruner assets fetch data`"):
        load_documents("squad", "calibration")


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize("source", ["wikitext2", "ptb", "c4"])
def test_hub_source_offline(monkeypatch: pytest.MonkeyPatch, flag: str, source: str) -> None:
    monkeypatch.setenv(flag, "1")
    with pytest.raises(OfflineError) as caught:
        load_documents(source, "test")
    message = str(caught.value)
    assert f"source '{source}' needs the Hugging Face hub" in message
    assert "offline sources: wiki, news, books, squad, or a local .txt/.jsonl path" in message


def test_bookcorpus_is_calibration_only() -> None:
    with pytest.raises(AdaPrunerError, match="no test split"):
        load_documents("bookcorpus", "test")


def test_connection_errors_are_recognised_through_the_cause_chain() -> None:
    try:
        try:
            raise ConnectionError("no route")
        except ConnectionError as inner:
            raise RuntimeError("load failed") from inner
    except RuntimeError as outer:
        assert sources.is_connection_error(outer)
    assert not sources.is_connection_error(ValueError("bad config"))


def test_available_sources_are_documented() -> None:
    assert available_sources()[:4] == ["wiki", "news", "books", "squad"]
    assert set(available_sources()) <= set(sources.SOURCES)


# --- calibration windows -----------------------------------------------------------------------


def test_sample_calibration_shape_and_windows(cache: Path, tokenizer, documents: list[str]) -> None:
    batch = sample_calibration(tokenizer, "wiki", num_samples=12, seq_len=8, seed=0)
    assert batch.shape == (12, 8) and batch.dtype == torch.long
    calibration = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in load_documents("wiki", "calibration")]
    slots = {tuple(ids[s : s + 8]) for ids in calibration for s in range(0, len(ids) - 7, 8)}
    rows = [tuple(row) for row in batch.tolist()]
    assert set(rows) <= slots  # aligned windows inside one calibration document
    assert tokenizer.bos_token_id not in batch  # no special tokens


def test_sample_calibration_is_deterministic_per_seed(cache: Path, tokenizer) -> None:
    first = sample_calibration(tokenizer, "news", 6, 16, seed=0)
    assert torch.equal(first, sample_calibration(tokenizer, "news", 6, 16, seed=0))
    assert not torch.equal(first, sample_calibration(tokenizer, "news", 6, 16, seed=1))


def test_sample_calibration_draws_without_replacement(cache: Path, tokenizer) -> None:
    calibration = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in load_documents("books", "calibration")]
    every_slot = sorted(ids[s : s + 10] for ids in calibration for s in range(0, len(ids) - 9, 10))
    batch = sample_calibration(tokenizer, "books", len(every_slot), 10)
    assert sorted(batch.tolist()) == every_slot  # asking for all slots returns each exactly once


def test_sample_calibration_too_few_windows(cache: Path, tokenizer) -> None:
    with pytest.raises(AdaPrunerError) as caught:
        sample_calibration(tokenizer, "squad", 36, 40)
    assert str(caught.value) == (
        "source 'squad' has only 35 windows of 40 tokens in its calibration split; "
        "ask for fewer samples or shorter --seq-len"
    )


@pytest.mark.parametrize(("num_samples", "seq_len"), [(0, 8), (4, 0), (-1, 8)])
def test_sample_calibration_rejects_non_positive_sizes(cache: Path, tokenizer, num_samples: int, seq_len: int) -> None:
    with pytest.raises(AdaPrunerError, match="at least 1"):
        sample_calibration(tokenizer, "wiki", num_samples, seq_len)


# --- token streams -----------------------------------------------------------------------------


def test_token_stream_joins_split_documents(cache: Path, tokenizer) -> None:
    text = "\n\n".join(load_documents("wiki", "validation"))
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = token_stream(tokenizer, "wiki", "validation", None)
    assert stream.dim() == 1 and stream.dtype == torch.long
    assert stream.tolist() == expected
    assert token_stream(tokenizer, "wiki", "validation", 17).tolist() == expected[:17]


def test_token_stream_of_local_file(tmp_path: Path, tokenizer, documents: list[str]) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    assert len(token_stream(tokenizer, str(path), "test", None)) == 10 * DOC_WORDS


def test_token_stream_rejects_empty_text(cache: Path, tokenizer) -> None:
    sources.write_jsonl(cache / "data" / "wiki.jsonl", [" ", "\n", "  "])
    with pytest.raises(AdaPrunerError, match="no text"):
        token_stream(tokenizer, "wiki", "test", None)


def test_token_stream_rejects_bad_max_tokens(cache: Path, tokenizer) -> None:
    with pytest.raises(AdaPrunerError, match="max_tokens"):
        token_stream(tokenizer, "wiki", "test", 0)


# --- parsers of the offline sources ------------------------------------------------------------


def test_detokenize_brown_tokens() -> None:
    words = ["``", "Only", "a", "handful", "''", ",", "the", "jury", "said", "(", "today", ")", "."]
    assert sources.detokenize(words) == '"Only a handful", the jury said (today).'


def test_parse_brown_strips_tags_and_keeps_headlines_apart() -> None:
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ./.\n\n\n"
        "Merger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, it/pps agreed/vbd ./.\n"
        "It/pps left/vbd ./.\n"
    )
    assert sources.parse_brown(tagged) == "The jury said.\n\nMerger proposed\n\nHowever, it agreed. It left."


def gz_jsonl(rows: list[dict]) -> io.BytesIO:
    return io.BytesIO(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))


def test_parse_lambada_rebuilds_and_deduplicates_passages() -> None:
    rows = [{"request": {"context": c, "continuation": " end"}} for c in ["First passage", "Second", "First passage"]]
    assert sources.parse_lambada(gz_jsonl(rows)) == ["First passage end", "Second end"]


def test_parse_squad_takes_background_paragraphs() -> None:
    def row(paragraph: str, question: str) -> dict:
        return {"doc": {"query": f"Title: T\nBackground: {paragraph}\nQuestion: {question}\nAnswer:"}}

    rows = [row("Para one.", "Q1?"), row("Para one.", "Q2?"), row("Para two.", "Q3?")]
    assert sources.parse_squad(gz_jsonl(rows)) == ["Para one.", "Para two."]


def test_clean_wiki_markup() -> None:
    pytest.importorskip("gensim")
    markup = (
        "'''Achilles''' (; Akhilleus, ) was a [[Greece|Greek]] hero.<ref>Homer</ref>\n\n\n\n"
        "== Life ==\nHe fought at [[Troy]].\n\n== References ==\n* Some book\n"
    )
    assert sources.clean_wiki_markup(markup) == "Achilles (Akhilleus) was a Greek hero.\n\nLife\nHe fought at Troy."


def test_parse_lines() -> None:
    assert sources.parse_lines("one doc\n\n  two doc  \n") == ["one doc", "two doc"]
