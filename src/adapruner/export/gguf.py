"""Write a pruned (or dense) model directory as a GGUF file for llama.cpp.

Per-layer widths use llama.cpp's ``deci`` architecture (written for NVIDIA's Nemotron-NAS models),
whose graph builds every layer with its own ``n_head(il)``, ``n_head_kv(il)`` and ``n_ff(il)`` read
from per-layer arrays, and loads optional biases on q/k/v, the attention output and the FFN. A model
whose layers all have the same widths and only the family's own biases keeps its family's architecture
(``llama`` for LLaMA and Mistral, ``qwen2``), so any llama.cpp build runs it.

What the file holds comes from the directory alone (``config.json``, the safetensors weights, the
tokenizer): tensor names through the ``gguf`` package's name map for the architecture, q/k rows
permuted into the pair layout of llama.cpp's "normal" rotary embedding where the architecture uses it
(``llama``, ``deci``; ``qwen2`` uses the NeoX layout of transformers itself), tied embeddings written
once, 1-D tensors in F32, matrices in F32, F16, BF16 or Q8_0 (the ``gguf`` package's encoders), or any
type of llama.cpp's own quantiser (:mod:`adapruner.export.engine`). The tokenizer fields see
:mod:`adapruner.export.tokenizer`. The file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import AdaPrunerError
from ..files import temporary_file
from ..models.base import LayerShape, adapter_class_for
from . import engine
from . import tokenizer as vocab
from .rope import llama3_rope_factors, rope_settings, to_pair_rope

DECI = "deci"  # per-layer widths; its rotary embedding is the pair layout (q/k rows permuted)
EMBEDDING = "model.embed_tokens.weight"
# the matrix types this module writes with the gguf package's own encoders
WRITER_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class ModelLayout:
    """What the exporter needs to know about a model directory, read from its config alone."""

    arch: str
    pair_rope: bool  # q/k rows permuted into llama.cpp's pair rotary layout
    layers: list[LayerShape]
    head_dim: int
    hidden_size: int
    rope_theta: float
    rope: dict[str, Any]  # the scaling parameters, ``rope_type`` always set
    config: dict[str, Any]

    @property
    def per_layer(self) -> bool:
        return self.arch == DECI


@dataclass(frozen=True)
class ExportResult:
    path: Path
    arch: str
    tensor_type: str
    tokenizer_source: str
    layers: list[LayerShape]
    bytes: int


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir() or not path.is_file() or not list(model_dir.glob("*.safetensors")):
        raise AdaPrunerError(
            f"{model_dir} is not an AdaPruner or Hugging Face model directory (config.json and *.safetensors "
            "needed): give the output of `adapruner prune` or a local model"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdaPrunerError(f"{path} is corrupted ({exc.msg}): prune the model again") from None


def layer_shapes(config: dict[str, Any]) -> list[LayerShape]:
    """Per-layer widths: ``pruned_layers`` (per-layer models) or the plain config's, repeated."""
    fields = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    if config.get("pruned_layers"):
        return [LayerShape(*(int(entry[f]) for f in fields)) for entry in config["pruned_layers"]]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    shape = LayerShape(int(config["num_attention_heads"]), int(kv), int(config["intermediate_size"]))
    return [shape] * int(config["num_hidden_layers"])


def extra_biases(config: dict[str, Any]) -> bool:
    """Compensation biases on o_proj/down_proj that the family's stock layout would not build."""
    return any(entry.get("o_proj_bias") or entry.get("down_proj_bias") for entry in config.get("pruned_layers") or [])


def read_layout(model_dir: Path) -> ModelLayout:
    config = read_config(model_dir)
    adapter = adapter_class_for(str(config.get("model_type")))  # unknown families refused here
    layers = layer_shapes(config)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    check_expressible(layers)
    theta, rope = rope_settings(config)  # an unsupported scaling is refused before any tensor is read
    uniform = len(set(layers)) == 1 and not extra_biases(config)
    full_width = layers[0].num_attention_heads * head_dim == int(config["hidden_size"])
    stock = uniform and (full_width or not adapter.gguf_full_width_attention)
    return ModelLayout(
        arch=adapter.gguf_arch if stock else DECI,
        pair_rope=adapter.gguf_pair_rope if stock else True,
        layers=layers,
        head_dim=head_dim,
        hidden_size=int(config["hidden_size"]),
        rope_theta=theta,
        rope=rope,
        config=config,
    )


def check_expressible(layers: list[LayerShape]) -> None:
    """llama.cpp's graph needs heads, KV heads and channels in every layer, and whole query groups."""
    for index, shape in enumerate(layers):
        if min(shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size) < 1:
            raise AdaPrunerError(
                f"layer {index} keeps {shape.num_attention_heads} heads / {shape.num_key_value_heads} KV heads / "
                f"{shape.intermediate_size} channels: llama.cpp cannot run a layer without attention or MLP; "
                "prune with a lower ratio or a per-layer cap"
            )
        if shape.num_attention_heads % shape.num_key_value_heads:
            raise AdaPrunerError(
                f"layer {index}: {shape.num_attention_heads} query heads do not split into "
                f"{shape.num_key_value_heads} KV groups: llama.cpp cannot express it"
            )


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file, known from the safetensors header before any data is read."""

    source: str  # the Hugging Face name ("" for a tensor the exporter computes)
    target: str  # the GGUF name
    shape: tuple[int, ...]
    kind: GGMLQuantizationType

    def add_info(self, writer: gguf.GGUFWriter) -> None:
        """Declare the tensor (name, shape, type, bytes) so the header can be written before any data."""
        if self.kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if self.kind == GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(self.target, self.shape, np.dtype(dtype), math.prod(self.shape) * dtype().itemsize)
            return
        byte_shape = gguf.quant_shape_to_byte_shape(self.shape, self.kind)
        writer.add_tensor_info(self.target, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=self.kind)


def safetensors_headers(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor's file and shape, from the safetensors headers alone (no tensor data)."""
    from safetensors import safe_open

    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                found[name] = (path, tuple(handle.get_slice(name).get_shape()))
    return found


@contextlib.contextmanager
def tensor_reader(headers: dict[str, tuple[Path, tuple[int, ...]]]) -> Iterator[Callable[[str], np.ndarray]]:
    """``read(name)``: one tensor as float32 numpy (bf16/f16 widened), each safetensors file opened once for
    the whole write; the exporter holds one tensor at a time."""
    import torch
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = {
            path: stack.enter_context(safe_open(str(path), framework="pt"))
            for path in {path for path, _shape in headers.values()}
        }
        yield lambda name: handles[headers[name][0]].get_tensor(name).to(torch.float32).numpy()


def embedding_rows(headers: dict[str, tuple[Path, tuple[int, ...]]], model_dir: Path) -> int:
    """Rows of the token embedding, from the safetensors header."""
    if EMBEDDING not in headers:
        raise AdaPrunerError(f"{model_dir} holds no {EMBEDDING}: not a LLaMA-layout checkpoint")
    return int(headers[EMBEDDING][1][0])


def layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def convert_tensor(name: str, data: np.ndarray, layout: ModelLayout) -> np.ndarray:
    """q/k rows into llama.cpp's pair layout where the architecture needs it; everything else as is."""
    index = layer_index(name)
    if not layout.pair_rope or index is None:
        return data
    shape = layout.layers[index]
    if ".self_attn.q_proj." in name:
        return to_pair_rope(data, shape.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return to_pair_rope(data, shape.num_key_value_heads)
    return data


def tensor_type(name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    """1-D tensors and norms stay F32 (as llama.cpp's converter does); Q8_0 needs rows of 32."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    return wanted


def encode(data: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    if kind == GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), kind)


def add_hparams(writer: gguf.GGUFWriter, layout: ModelLayout, name: str, file_type: LlamaFileType, rows: int) -> None:
    config = layout.config
    arrays = layout.per_layer
    heads = [s.num_attention_heads for s in layout.layers]
    kv_heads = [s.num_key_value_heads for s in layout.layers]
    channels = [s.intermediate_size for s in layout.layers]
    writer.add_name(name)
    writer.add_block_count(len(layout.layers))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(layout.hidden_size)
    writer.add_feed_forward_length(channels if arrays else channels[0])
    writer.add_head_count(heads if arrays else heads[0])
    writer.add_head_count_kv(kv_heads if arrays else kv_heads[0])
    writer.add_rope_freq_base(layout.rope_theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_vocab_size(rows)
    writer.add_file_type(file_type)
    if layout.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(layout.rope["factor"]))


def gguf_name(name: str, names: gguf.TensorNameMap) -> str:
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise AdaPrunerError(f"tensor {name} has no GGUF name in llama.cpp's map: report a bug with the model id")
    return mapped


def tokenizer_fields(
    model_dir: Path, rows: int, tokenizer_gguf: Path | None, source_dir: Path | None
) -> tuple[vocab.TokenizerFields, str]:
    """(fields, where they came from): the given GGUF, the source asset's kept GGUF, or the HF tokenizer."""
    candidates = [tokenizer_gguf] if tokenizer_gguf else []
    candidates += [d / vocab.TOKENIZER_GGUF for d in (model_dir, source_dir) if d is not None]
    for path in candidates:
        if path is tokenizer_gguf or path.is_file():
            fields = vocab.read_fields(path)
            if vocab.token_count(fields) != rows:
                raise AdaPrunerError(
                    f"{path} has {vocab.token_count(fields)} tokens but the model {rows} embedding rows: "
                    "give a tokenizer GGUF of this model's dense version"
                )
            return fields, str(path)
    return vocab.fields_from_hf(model_dir, rows), f"{model_dir} (Hugging Face tokenizer)"


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and (output.is_dir() or not overwrite):
        raise AdaPrunerError(f"output {output} exists: choose another --output or pass --overwrite")
    parent = output.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise AdaPrunerError(f"cannot write {output}: {parent} is not a writable directory")


FORMATS = ("gguf",)


def check_export_request(format: str, quant: str) -> None:
    """A known format and matrix type, and llama.cpp's binding where its quantiser is needed (one line)."""
    if format not in FORMATS:
        raise AdaPrunerError(f"unknown export format '{format}': gguf is the one export format")
    if quant not in WRITER_TYPES and quant not in engine.LLAMA_QUANTS:
        raise AdaPrunerError(
            f"unknown --quant '{quant}': choose among {', '.join([*WRITER_TYPES, *engine.LLAMA_QUANTS])}"
        )
    if quant in engine.LLAMA_QUANTS:
        engine.llama_cpp()


def default_gguf_name(quant: str) -> str:
    """The file name ``--export gguf`` writes inside a model directory."""
    return f"model-{quant}.gguf"


def export_gguf(
    model_dir: str | Path,
    output: str | Path,
    *,
    quant: str = "f16",
    tokenizer_gguf: str | Path | None = None,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model_dir`` as a GGUF at ``output`` (see the module docstring); complete or not at all.

    ``quant``: f32, f16, bf16 or q8_0 (written here), or a type of llama.cpp's quantiser (q4_k_m, q6_k…:
    written as F16 first, then quantised by llama.cpp). ``source_dir``: the dense model's directory, where
    a kept ``tokenizer.gguf`` is looked for.
    """
    model_dir, output = Path(model_dir), Path(output)
    check_export_request("gguf", quant)
    layout = read_layout(model_dir)
    check_output(output, overwrite)
    headers = safetensors_headers(model_dir)
    rows = embedding_rows(headers, model_dir)
    fields, tokenizer_source = tokenizer_fields(
        model_dir, rows, Path(tokenizer_gguf) if tokenizer_gguf else None, Path(source_dir) if source_dir else None
    )
    name = str(layout.config.get("_name_or_path") or model_dir.name)
    with temporary_file(output) as tmp:
        if quant in WRITER_TYPES:
            write_gguf(tmp, headers, layout, fields, name, quant, rows)
        else:
            with temporary_file(output) as f16:
                write_gguf(f16, headers, layout, fields, name, "f16", rows)
                engine.quantize(f16, tmp, quant)
        os.replace(tmp, output)
    return ExportResult(output, layout.arch, quant, tokenizer_source, layout.layers, output.stat().st_size)


def plan_tensors(
    headers: dict[str, tuple[Path, tuple[int, ...]]], layout: ModelLayout, wanted: GGMLQuantizationType
) -> list[PlannedTensor]:
    """The file's tensors in order, each with its GGUF name and type (tied ``lm_head`` left out: llama.cpp
    reuses ``token_embd`` when ``output.weight`` is absent)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[layout.arch.upper()], len(layout.layers))
    tied = layout.config.get("tie_word_embeddings", False)
    planned = []
    if layout.rope["rope_type"] == "llama3":
        target = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(PlannedTensor("", target, (layout.head_dim // 2,), GGMLQuantizationType.F32))
    for source, (_path, shape) in headers.items():
        if tied and source == "lm_head.weight":
            continue
        target = gguf_name(source, names)
        planned.append(PlannedTensor(source, target, shape, tensor_type(target, shape, wanted)))
    return planned


def write_gguf(
    path: Path,
    headers: dict[str, tuple[Path, tuple[int, ...]]],
    layout: ModelLayout,
    fields: vocab.TokenizerFields,
    name: str,
    quant: str,
    rows: int,
) -> None:
    """Metadata, tokenizer fields, tensor infos, then the tensors one at a time (read, converted, encoded and
    written before the next is read: memory stays at one tensor, whatever the model's size)."""
    wanted, file_type = WRITER_TYPES[quant]
    planned = plan_tensors(headers, layout, wanted)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    add_hparams(writer, layout, name, file_type, rows)
    vocab.add_fields(writer, fields)
    for tensor in planned:
        tensor.add_info(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with tensor_reader(headers) as read:
        for tensor in planned:
            if tensor.source:
                data = convert_tensor(tensor.source, read(tensor.source), layout)
            else:
                data = llama3_rope_factors(layout.rope, layout.head_dim, layout.rope_theta)
            writer.write_tensor_data(encode(data, tensor.kind))
    writer.close()


def gguf_layers(path: str | Path) -> dict[str, Any]:
    """Architecture and per-layer widths of a GGUF file (for ``adapruner info FILE.gguf``)."""
    reader = vocab.open_gguf(path)
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    blocks = int(fields[f"{arch}.block_count"].contents())

    def per_layer(key: str, default: str | None = None) -> list[int]:
        field = fields.get(key) or (fields.get(default) if default else None)
        if field is None:
            return []
        value = field.contents()
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * blocks

    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {
        "architecture": arch,
        "layers": blocks,
        "heads": per_layer(f"{arch}.attention.head_count"),
        "kv_heads": per_layer(f"{arch}.attention.head_count_kv", f"{arch}.attention.head_count"),
        "channels": per_layer(f"{arch}.feed_forward_length"),
        "tensors": len(reader.tensors),
        "tensor_types": types,
        "parameters": int(sum(int(np.prod(t.shape)) for t in reader.tensors)),
    }
