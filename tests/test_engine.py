"""Exported GGUFs inside llama.cpp itself (llama-cpp-python, which `make test` installs): the logits of
an F32 export equal transformers' on the same tokens, for tiny random LLaMA / Mistral / Qwen2 models with
per-layer widths (GQA and not, with compensation biases) and for SmolLM2 pruned at 0.2 and 0.5; quantised
exports (gguf's Q8_0, llama.cpp's Q4_K_M) load and generate; llama.cpp tokenizes the four sources' test
text exactly as transformers does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adapruner
from adapruner.errors import AdaPrunerError
from adapruner.export import engine
from adapruner.export.gguf import layer_shapes
from adapruner.models.loading import load_causal_lm
from conftest import name_tokenizer_for_llama_cpp, save_tiny, write_corpus

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")


def transformers_logits(model_dir, ids: list[int]) -> np.ndarray:
    model = load_causal_lm(str(model_dir), "float32")  # pruned (any widths) or plain
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def assert_same_logits(gguf_path, model_dir, ids: list[int], atol: float) -> None:
    """llama.cpp's logits (F32 KV cache) equal transformers' on ``ids``, and so does every argmax."""
    llm = engine.load(gguf_path, n_ctx=len(ids), kv_f32=True)
    ours, theirs = engine.logits(llm, ids), transformers_logits(model_dir, ids)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


def tiny_family(root, family: str, monkeypatch):
    """``root/tiny``: a saved tiny ``family`` model whose tokenizer llama.cpp can name (the tiny byte-level BPE
    splits text as GPT-2 does, so its check hash is registered as llama.cpp's "gpt-2" for the test)."""
    monkeypatch.setenv("ADAPRUNER_CACHE", str(root / "cache"))
    save_tiny(root / "tiny", family)
    settings = root / "tiny" / "tokenizer_config.json"  # Qwen2's tokenizer class would add an unknown token
    settings.write_text(json.dumps(json.loads(settings.read_text()) | {"unk_token": "</s>", "pad_token": "</s>"}))
    name_tokenizer_for_llama_cpp(root / "tiny", monkeypatch)
    return root / "tiny"


def pruned_family(root, family: str, monkeypatch, ratio: float = 0.3, **options):
    """``root/pruned``: the tiny ``family`` model with ``ratio`` removed (mixed widths unless uniform)."""
    tiny = tiny_family(root, family, monkeypatch)
    write_corpus(root / "corpus.txt")
    adapruner.prune(
        str(tiny), ratio, output=root / "pruned", calibration=str(root / "corpus.txt"), seq_len=16, **options
    )
    return root / "pruned"


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama-mha", {"layers": "1:4"}),
        ("llama-gqa", {"layers": "1:4", "refit": "bias"}),
        ("mistral-gqa", {"layers": "0:4", "ranking": "global-all", "refit": "bias"}),
        ("qwen2-gqa", {"layers": "1:4", "refit": "bias", "ratio": 0.2}),
        ("qwen2-mha", {"layers": "0:4", "ranking": "global"}),
    ],
)
def test_per_layer_tiny_models_give_transformers_logits_in_llama_cpp(tmp_path, monkeypatch, family, options):
    pruned = pruned_family(tmp_path, family, monkeypatch, **options)
    config = json.loads((pruned / "config.json").read_text())
    assert len(set(layer_shapes(config))) > 1  # per-layer widths: llama.cpp's deci graph
    result = adapruner.export(pruned, tmp_path / "m.gguf", quant="f32")
    assert result.arch == "deci"
    ids = torch.randint(0, config["vocab_size"], (40,), generator=torch.Generator().manual_seed(0)).tolist()
    assert_same_logits(result.path, pruned, ids, atol=1e-3)


@pytest.mark.parametrize(
    ("family", "uniform", "arch"),
    [("llama-gqa", True, "llama"), ("qwen2-gqa", False, "qwen2"), ("qwen2-gqa", True, "deci")],
)
def test_one_width_models_in_llama_cpp(tmp_path, monkeypatch, family, uniform, arch):
    """Uniform widths keep the family's graph where llama.cpp's can hold them (its qwen2 graph sizes q/o as
    hidden x hidden, so a qwen2 with pruned heads goes to deci); the dense qwen2 keeps NeoX rows and biases."""
    if uniform:
        model = pruned_family(tmp_path, family, monkeypatch, ratio=0.2, uniform=True)
    else:
        model = tiny_family(tmp_path, family, monkeypatch)
    result = adapruner.export(model, tmp_path / "m.gguf", quant="f32")
    assert result.arch == arch
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_logits(result.path, model, ids, atol=1e-3)


def test_quantised_tiny_exports_load_and_generate(tmp_path, monkeypatch):
    pruned = pruned_family(tmp_path, "llama-gqa", monkeypatch, layers="1:4")
    for quant in ("q8_0", "q4_k_m"):
        result = adapruner.export(pruned, tmp_path / f"m-{quant}.gguf", quant=quant)
        llm = engine.load(result.path, n_ctx=64)
        out = llm.create_completion("the model prunes", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1, quant
    assert not list(tmp_path.glob(".m-*.partial"))  # the F16 intermediate and the temporary name are gone


def test_engine_refusals_are_one_line(tmp_path):
    with pytest.raises(AdaPrunerError, match="does not exist: export the model first"):
        engine.load(tmp_path / "missing.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AdaPrunerError, match=r"llama\.cpp cannot load"):
        engine.load(broken)
    with pytest.raises(AdaPrunerError, match="quantisation 'q3_x' unknown"):
        engine.quantize(broken, tmp_path / "out.gguf", "q3_x")


# --- the real SmolLM2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pruned(tmp_path_factory):
    """SmolLM2 pruned at 0.2 and 0.5 (element1 over LLM-Pruner's layers, FLAP's bias compensation): per-layer
    widths and o_proj/down_proj biases, the deci graph's optional tensors."""
    root = tmp_path_factory.mktemp("smol")
    for ratio in (0.2, 0.5):
        adapruner.prune("smollm2-135m", ratio, refit="bias", output=root / f"r{ratio}")
    return root


@pytest.mark.real
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_smollm2_pruned_gives_transformers_logits_in_llama_cpp(smollm2_pruned, tmp_path, ratio):
    from transformers import AutoTokenizer

    pruned = smollm2_pruned / f"r{ratio}"
    result = adapruner.export(pruned, tmp_path / "m.gguf", quant="f32")
    assert result.arch == "deci" and result.tokenizer_source.endswith("tokenizer.gguf")
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 6, add_special_tokens=False)["input_ids"][:64]
    assert_same_logits(result.path, pruned, ids, atol=2e-3)


@pytest.mark.real
def test_smollm2_quantised_export_generates_text(smollm2_pruned, tmp_path):
    result = adapruner.export(smollm2_pruned / "r0.2", tmp_path / "m.gguf", quant="q4_k_m")
    llm = engine.load(result.path, n_ctx=128)
    text = llm.create_completion("The capital of France is", max_tokens=12, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0


def tokenization_differences(asset: str, gguf_dir) -> tuple[int, int]:
    """(documents tokenized alike, documents) over the four sources' test splits, llama.cpp vs transformers,
    for the dense ``asset`` exported with its own tokenizer fields; every difference must be llama.cpp's
    numeral rule (whitespace right before a numeral grouped otherwise), nothing else."""
    from transformers import AutoTokenizer

    from adapruner.assets import model_dir
    from adapruner.data.sources import OFFLINE_SOURCES, load_documents

    dense = model_dir(asset)
    result = adapruner.export(dense, gguf_dir / f"{asset}.gguf", quant="q8_0")
    llm = engine.load(result.path, n_ctx=64, logits_all=False)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    same = total = 0
    for source in OFFLINE_SOURCES:
        for document in load_documents(source, "test"):
            ours = llm.tokenize(document.encode(), add_bos=False, special=False)
            theirs = tokenizer(document, add_special_tokens=False)["input_ids"]
            total += 1
            if ours == theirs:
                same += 1
                continue
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
            rest = document[len(tokenizer.decode(theirs[:first])) :]
            assert rest[:1].isspace() and rest.lstrip()[:1].isnumeric(), (source, rest[:40])
    assert llm.tokenize(b"Hi there", add_bos=True, special=False) == tokenizer("Hi there")["input_ids"]  # BOS alike
    return same, total


@pytest.mark.real
def test_llama_cpp_tokenizes_the_four_sources_as_transformers(tmp_path):
    """SmolLM2: every test document of the four sources gets transformers' ids, but where llama.cpp's own
    "smollm" pre-tokenizer differs from the Hugging Face one (the same in the official SmolLM2 GGUF): it
    splits numerals off before its whitespace rule ("\n\n1925", " ⅓")."""
    same, total = tokenization_differences("smollm2-135m", tmp_path)
    assert same / total > 0.99, (same, total)


@pytest.mark.real
def test_qwen25_tokenizer_in_llama_cpp_equals_transformers(tmp_path):
    """Qwen2.5-0.5B (``adapruner assets fetch qwen2.5-0.5b``; skipped where it is not fetched): its
    pre-tokenizer is recognised as llama.cpp's "qwen2" and the four sources' test text tokenizes alike."""
    from transformers import AutoTokenizer

    from adapruner.assets import model_dir
    from adapruner.export.tokenizer import fields_from_hf, read_fields

    dense = model_dir("qwen2.5-0.5b")
    if not (dense / "config.json").is_file():
        pytest.skip("qwen2.5-0.5b is not fetched: adapruner assets fetch qwen2.5-0.5b")
    built = fields_from_hf(dense, len(AutoTokenizer.from_pretrained(dense)))
    kept = read_fields(dense / "tokenizer.gguf")
    assert built["tokenizer.ggml.pre"].value == kept["tokenizer.ggml.pre"].value == "qwen2"
    same, total = tokenization_differences("qwen2.5-0.5b", tmp_path)
    assert same == total  # llama.cpp's qwen2 pre-tokenizer agrees on every document
