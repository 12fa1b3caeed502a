"""Asset registry tests: fast ones on a fake cache, and ``real`` ones on the fetched SmolLM2 and data.

The ``real`` tests skip unless ``adapruner assets fetch smollm2-135m data`` has filled the cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapruner import assets
from adapruner.data import load_documents, sources
from adapruner.errors import AdaPrunerError
from adapruner.paths import data_dir, models_dir

SMOLLM2 = "smollm2-135m"


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path))
    return tmp_path


# --- fast: registry, resolution, staging -------------------------------------------------------


def test_registry_records_hub_ids_and_packages() -> None:
    assert assets.MODELS[SMOLLM2].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.MODELS["qwen2.5-0.5b"].hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert assets.MODELS["qwen2.5-0.5b"].members == tuple(f"part0{i}.bin" for i in range(1, 7))


@pytest.mark.parametrize("names", [["bogus"], [], ["data", "smollm"]])
def test_fetch_rejects_unknown_names(empty_cache: Path, names: list[str]) -> None:
    with pytest.raises(AdaPrunerError, match=re.escape("smollm2-135m, qwen2.5-0.5b, data, all")):
        assets.fetch(names)


def test_fetch_skips_what_is_present(empty_cache: Path) -> None:
    for name in assets.MODELS:
        (models_dir() / name).mkdir(parents=True)
        (models_dir() / name / "config.json").write_text("{}")
        (models_dir() / name / assets.TOKENIZER_GGUF).write_text("")
    data_dir().mkdir()
    (data_dir() / assets.MANIFEST_FILE).write_text("{}")
    expected = [models_dir() / name for name in assets.MODELS] + [data_dir()]
    assert assets.fetch(["all"]) == expected  # no download: everything is already there


def test_fetch_adds_the_tokenizer_gguf_to_a_model_converted_without_it(empty_cache: Path, monkeypatch) -> None:
    (models_dir() / SMOLLM2).mkdir(parents=True)
    (models_dir() / SMOLLM2 / "config.json").write_text("{}")
    added = []
    monkeypatch.setattr(assets, "_add_tokenizer_gguf", lambda asset, target: added.append((asset.name, target)))
    assert assets.fetch([SMOLLM2]) == [models_dir() / SMOLLM2]
    assert added == [(SMOLLM2, models_dir() / SMOLLM2)]  # kept for `adapruner export`, model not reconverted


def test_resolve_model_not_fetched(empty_cache: Path) -> None:
    with pytest.raises(AdaPrunerError) as caught:
        assets.resolve_model(SMOLLM2)
    assert str(caught.value) == f"model '{SMOLLM2}' is not fetched yet: run `adapruner assets fetch {SMOLLM2}`"


def test_resolve_model_paths_and_hub_ids(empty_cache: Path) -> None:
    target = models_dir() / SMOLLM2
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert assets.resolve_model(SMOLLM2) == str(target)
    assert assets.resolve_model(str(empty_cache)) == str(empty_cache)
    assert assets.resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_staged_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), assets.staged_dir(target) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-conversion")
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_replaces_old_target(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with assets.staged_dir(target) as staging:
        (staging / "new.bin").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in target.iterdir()] == ["new.bin"]


def test_publish_keeps_other_files_and_replaces_the_manifest(tmp_path: Path) -> None:
    staging, target = tmp_path / "staging", tmp_path / "data"
    staging.mkdir()
    target.mkdir()
    (target / "other-tool.json").write_text("kept")
    (target / "manifest.json").write_text("old")
    for name in ("manifest.json", "wiki.jsonl"):
        (staging / name).write_text("new")
    assets.publish(staging, target, "manifest.json")
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "other-tool.json", "wiki.jsonl"]
    assert (target / "manifest.json").read_text() == "new" and not list(staging.iterdir())


# --- real: the fetched assets ------------------------------------------------------------------


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} not in the asset cache: run `adapruner assets fetch {what}`")


@pytest.mark.real
def test_smollm2_loads_with_plain_from_pretrained() -> None:
    _require(models_dir() / SMOLLM2 / "config.json", SMOLLM2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_model(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tokenizer("The jury said.", add_special_tokens=False)["input_ids"]) > 2


@pytest.mark.real
@pytest.mark.parametrize("source", sources.OFFLINE_SOURCES)
def test_offline_sources_have_text_in_every_split(source: str) -> None:
    _require(data_dir() / assets.MANIFEST_FILE, "data")
    manifest = json.loads((data_dir() / assets.MANIFEST_FILE).read_text())["sources"][source]
    for split in sources.SPLITS:
        documents = load_documents(source, split)
        characters = sum(map(len, documents))
        assert len(documents) >= 3 and characters >= 20_000, (source, split, len(documents), characters)
        assert manifest["splits"][split] == {"documents": len(documents), "characters": characters}
