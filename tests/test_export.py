"""GGUF export: what the file holds, read back with the gguf package (llama.cpp itself: see docs/export.md).

Checked here: the architecture (``deci`` for per-layer widths, the family's own otherwise), the
per-layer arrays, every tensor equal to the Hugging Face weight after undoing llama.cpp's rotary row
order, tied embeddings written once, quantised types within their rounding, the tokenizer fields (a
given GGUF copied verbatim; built from SmolLM2's Hugging Face tokenizer equal to its source GGUF's), and
the one-line refusals with nothing half-written.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import adapruner
from adapruner.cli import app
from adapruner.errors import AdaPrunerError
from adapruner.export import gguf_layers
from adapruner.export import tokenizer as vocab
from adapruner.export.gguf import layer_shapes
from adapruner.export.rope import from_pair_rope, to_pair_rope
from conftest import name_tokenizer_for_llama_cpp, pruned_tiny, save_tiny, write_corpus


def tokenizer_gguf(path, tokens: int):
    """A tensor-less GGUF with a tokenizer of ``tokens`` entries (what --tokenizer-gguf takes)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_state(directory) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state |= {k: v.to(torch.float32).numpy() for k, v in load_file(path).items()}
    return state


def read_back(path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors, types = {}, {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        types[tensor.name] = tensor.tensor_type.name
    return fields, tensors, types


def expected_tensors(directory, arch: str, config: dict) -> dict[str, np.ndarray]:
    """The HF weights under their GGUF names, q/k rows in llama.cpp's pair order where the arch needs it."""
    shapes = layer_shapes(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(shapes))
    expected = {}
    for name, data in hf_state(directory).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch != "qwen2" and ".layers." in name:
            index = int(name.split(".")[2])
            if ".q_proj." in name:
                data = to_pair_rope(data, shapes[index].num_attention_heads)
            elif ".k_proj." in name:
                data = to_pair_rope(data, shapes[index].num_key_value_heads)
        expected[names.get_name(name, try_suffixes=(".weight", ".bias"))] = data
    return expected


def test_pair_rope_order_round_trips_and_pairs_each_head_halves():
    rows = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8
    paired = to_pair_rope(rows, 2)
    np.testing.assert_array_equal(from_pair_rope(paired, 2), rows)
    # head 0: rotate-half rows 0..3 are x, 4..7 are y; pairs are (x0, y0, x1, y1, ...)
    np.testing.assert_array_equal(paired[:4, 0], rows[[0, 4, 1, 5], 0])
    np.testing.assert_array_equal(paired[8:12, 0], rows[[8, 12, 9, 13], 0])


def test_per_layer_model_is_deci_with_every_tensor_equal(tmp_path):
    root = pruned_tiny(tmp_path)
    pruned = root / "pruned"
    config = json.loads((pruned / "config.json").read_text())
    shapes = layer_shapes(config)
    assert len(set(shapes)) > 1  # mixed widths: the case that needs deci
    rows = config["vocab_size"]
    result = adapruner.export(
        pruned, tmp_path / "m.gguf", quant="f32", tokenizer_gguf=tokenizer_gguf(tmp_path / "t.gguf", rows)
    )
    assert result.arch == "deci" and result.path.is_file()
    fields, tensors, types = read_back(result.path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [s.num_attention_heads for s in shapes]
    assert fields["deci.attention.head_count_kv"] == [s.num_key_value_heads for s in shapes]
    assert fields["deci.feed_forward_length"] == [s.intermediate_size for s in shapes]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert len(fields["tokenizer.ggml.tokens"]) == rows
    expected = expected_tensors(pruned, "deci", config)
    assert set(tensors) == set(expected)
    for name, data in expected.items():
        np.testing.assert_array_equal(tensors[name], data, err_msg=name)
    assert all(types[n] == "F32" for n in tensors)
    assert not list(tmp_path.glob(".m.gguf.*"))  # no temporary file left


@pytest.mark.parametrize("family", ["qwen2-gqa", "mistral-gqa", "llama-bias"])
def test_uniform_model_keeps_its_family_architecture(tmp_path, family):
    save_tiny(tmp_path / "tiny", family)
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    tok = tokenizer_gguf(tmp_path / "t.gguf", config["vocab_size"])
    result = adapruner.export(tmp_path / "tiny", tmp_path / "m.gguf", quant="f32", tokenizer_gguf=tok)
    arch = {"qwen2-gqa": "qwen2", "mistral-gqa": "llama", "llama-bias": "llama"}[family]
    assert result.arch == arch
    fields, tensors, _ = read_back(result.path)
    assert fields[f"{arch}.attention.head_count"] == config["num_attention_heads"]  # a number, not an array
    expected = expected_tensors(tmp_path / "tiny", arch, config)
    assert set(tensors) == set(expected)
    for name, data in expected.items():
        np.testing.assert_array_equal(tensors[name], data, err_msg=name)
    if family == "qwen2-gqa":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors)
    # tied embeddings are written once (llama.cpp reuses token_embd when output.weight is absent)
    assert ("output.weight" in tensors) == (not config.get("tie_word_embeddings", True))


WIDE_TINY = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}


def save_wide_tiny(directory) -> dict:
    """A tiny LLaMA whose hidden size (64) suits Q8_0's 32-wide blocks and whose MLP width (80) does not."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**WIDE_TINY)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize(
    ("quant", "kind", "tolerance"), [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)]
)
def test_quantised_matrices_round_within_their_type(tmp_path, quant, kind, tolerance):
    config = save_wide_tiny(tmp_path / "tiny")
    tok = tokenizer_gguf(tmp_path / "t.gguf", config["vocab_size"])
    result = adapruner.export(tmp_path / "tiny", tmp_path / "m.gguf", quant=quant, tokenizer_gguf=tok)
    _, tensors, types = read_back(result.path)
    expected = expected_tensors(tmp_path / "tiny", "llama", config)
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay exact
    assert types["blk.0.ffn_up.weight"] == kind  # rows of 64
    # rows of 80 do not fill Q8_0's blocks of 32: F16 there, as llama.cpp's own quantiser falls back
    assert types["blk.0.ffn_down.weight"] == ("F16" if quant == "q8_0" else kind)
    for name, data in expected.items():
        scale = np.abs(data).max()
        assert np.abs(tensors[name] - data).max() <= tolerance * scale, name


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    root = pruned_tiny(tmp_path)
    rows = json.loads((root / "pruned" / "config.json").read_text())["vocab_size"]
    good = tokenizer_gguf(tmp_path / "t.gguf", rows)
    with pytest.raises(AdaPrunerError, match="not an AdaPruner or Hugging Face model directory"):
        adapruner.export(tmp_path / "nothing", tmp_path / "a.gguf", tokenizer_gguf=good)
    with pytest.raises(AdaPrunerError, match="unknown --quant 'q3_x'"):
        adapruner.export(root / "pruned", tmp_path / "a.gguf", quant="q3_x", tokenizer_gguf=good)
    with pytest.raises(AdaPrunerError, match=f"has {rows + 1} tokens but the model {rows} embedding rows"):
        adapruner.export(
            root / "pruned", tmp_path / "a.gguf", tokenizer_gguf=tokenizer_gguf(tmp_path / "w.gguf", rows + 1)
        )
    with pytest.raises(AdaPrunerError, match=r"not one AdaPruner can name for llama.cpp.*--tokenizer-gguf"):
        adapruner.export(root / "pruned", tmp_path / "a.gguf")  # the tiny BPE's pre-tokenizer is unknown
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(AdaPrunerError, match="not a readable GGUF"):
        adapruner.export(root / "pruned", tmp_path / "a.gguf", tokenizer_gguf=tmp_path / "bad.gguf")
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob(".a.gguf.*"))
    adapruner.export(root / "pruned", tmp_path / "a.gguf", tokenizer_gguf=good)
    with pytest.raises(AdaPrunerError, match="exists: choose another --output or pass --overwrite"):
        adapruner.export(root / "pruned", tmp_path / "a.gguf", tokenizer_gguf=good)


def test_layers_without_attention_or_mlp_are_refused(tmp_path):
    root = pruned_tiny(tmp_path)
    config_path = root / "pruned" / "config.json"
    config = json.loads(config_path.read_text())
    config["pruned_layers"][1]["intermediate_size"] = 0
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdaPrunerError, match=r"layer 1 keeps .* 0 channels: llama.cpp cannot run"):
        adapruner.export(root / "pruned", tmp_path / "a.gguf")


def test_cli_export_and_info_on_the_file(tmp_path):
    root = pruned_tiny(tmp_path)
    rows = json.loads((root / "pruned" / "config.json").read_text())["vocab_size"]
    tok = tokenizer_gguf(tmp_path / "t.gguf", rows)
    runner = CliRunner()
    out = tmp_path / "m.gguf"
    result = runner.invoke(app, ["export", str(root / "pruned"), "--output", str(out), "--tokenizer-gguf", str(tok)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "architecture deci, f16" in said and f"tokenizer from {tok}" in said
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and '"architecture": "deci"' in info.output
    widths = gguf_layers(out)
    assert widths["heads"] == [
        s.num_attention_heads for s in layer_shapes(json.loads((root / "pruned" / "config.json").read_text()))
    ]
    again = runner.invoke(app, ["export", str(root / "pruned"), "--output", str(out), "--tokenizer-gguf", str(tok)])
    assert again.exit_code == 2 and "exists" in again.output and len(again.output.strip().splitlines()) == 1
    bad = runner.invoke(app, ["export", str(root / "pruned"), "--output", str(tmp_path / "x.gguf"), "--format", "onnx"])
    assert bad.exit_code == 2 and "unknown export format 'onnx'" in bad.output


def test_cli_prune_with_align_and_export_writes_the_gguf_inside_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "tiny")
    name_tokenizer_for_llama_cpp(tmp_path / "tiny", monkeypatch)

    write_corpus(tmp_path / "corpus.txt")
    runner = CliRunner()
    common = ["prune", str(tmp_path / "tiny"), "--ratio", "0.2", "--calibration", str(tmp_path / "corpus.txt")]
    common += ["--seq-len", "16", "--layers", "1:4", "--align", "8"]
    bad = runner.invoke(app, [*common, "--output", str(tmp_path / "bad"), "--export", "gguf", "--quant", "q9"])
    assert bad.exit_code == 2 and "unknown --quant 'q9'" in bad.output and not (tmp_path / "bad").exists()
    done = runner.invoke(app, [*common, "--output", str(tmp_path / "out"), "--export", "gguf", "--quant", "q8_0"])
    assert done.exit_code == 0, done.output
    exported = gguf_layers(tmp_path / "out" / "model-q8_0.gguf")
    assert exported["architecture"] == "deci" and "architecture deci, q8_0" in " ".join(done.output.split())
    assert exported["channels"][0] == 40 and all(c % 8 == 0 and c < 40 for c in exported["channels"][1:])
    record = json.loads((tmp_path / "out" / "adapruner.json").read_text())
    assert record["recipe"]["align"] == 8


@pytest.mark.real
def test_smollm2_tokenizer_built_from_hugging_face_equals_its_source_gguf(tmp_path):
    from adapruner.assets import model_dir

    dense = model_dir("smollm2-135m")
    kept = vocab.read_fields(dense / vocab.TOKENIZER_GGUF)  # copied by `assets fetch` from the source GGUF
    built = vocab.fields_from_hf(dense, vocab.token_count(kept))
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        name = f"tokenizer.ggml.{key}"
        assert built[name].value == kept.get(name, vocab.Field(False, gguf.GGUFValueType.BOOL)).value, name
    assert built["tokenizer.chat_template"].value == kept["tokenizer.chat_template"].value


@pytest.mark.real
def test_smollm2_export_uses_the_kept_tokenizer_and_counts_every_parameter(tmp_path):
    from adapruner.assets import model_dir

    result = adapruner.export(model_dir("smollm2-135m"), tmp_path / "dense.gguf", quant="f16")
    assert result.arch == "llama" and result.tokenizer_source.endswith(vocab.TOKENIZER_GGUF)
    assert gguf_layers(result.path)["parameters"] == 134_515_008  # tied embeddings counted once, as HF does
