"""The tokenizer fields of a GGUF file: what llama.cpp needs to split text into the model's token ids.

Two sources, best first:

* **a GGUF that already holds them** (``tokenizer.*`` keys), e.g. the file an offline asset was
  converted from (``adapruner assets fetch`` keeps them as ``tokenizer.gguf`` beside the model) or a
  GGUF of the dense model that llama.cpp's own converter wrote (``--tokenizer-gguf FILE``): copied
  verbatim, so llama.cpp tokenizes exactly as it does for that file;
* **the Hugging Face tokenizer** of the model directory (byte-level BPE ``tokenizer.json``): tokens and
  their types by id, merges, special ids, ``add_bos``/``add_eos`` and the chat template through the
  ``gguf`` package's :class:`gguf.SpecialVocab`. llama.cpp also needs the *pre-tokenizer* name (how text
  is split before BPE), which a ``tokenizer.json`` does not state: it is recognised by how the tokenizer
  splits :data:`CHECK_TEXT` (a hash of the ids, see :data:`KNOWN_PRE_TOKENIZERS`); an unknown one is
  refused in one line that names ``--tokenizer-gguf``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from ..errors import AdaPrunerError

TOKENIZER_PREFIX = "tokenizer."
TOKENIZER_GGUF = "tokenizer.gguf"  # kept beside an offline asset's converted model

# Text that exercises what pre-tokenizers disagree on: digits, contractions, case, whitespace runs,
# punctuation, newlines, accents and non-Latin scripts.
CHECK_TEXT = (
    "Hello World! It's 2026-12-06, isn't it? I'd've said 1234567 or 3.14159.\n\n"
    "   leading spaces\tand\ttabs\r\nCRLF  double  spaces...!!! ???\n"
    "Ünïcödé café naïve — “quotes” ‘single’ 日本語のテキスト 中文 한국어 Ελληνικά русский\n"
    "code: def f(x):\n    return x**2  # comment\nURL https://example.com/a_b-c?d=1&e=2 emoji 🦙🚀"
)
# sha256 of the ids of CHECK_TEXT -> llama.cpp's pre-tokenizer name. Computed here from tokenizers that
# were checked against a GGUF holding the name (SmolLM2's asset, Qwen2.5's asset); add a row with the
# test that checks it.
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "7c631ed67f8afeb4e51e56686063225b8a9e1b0d38adca9c226a5d1baa64f358": "smollm",  # SmolLM2 (tests/test_export.py)
    "179cfaa2779065ea1d50521a57fff9ad531a60965350df1e87d06eb491a13dd3": "qwen2",  # Qwen2.5 (tests/test_engine.py)
}


@dataclass(frozen=True)
class Field:
    """One GGUF key-value pair, typed as the writer needs it."""

    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


TokenizerFields = dict[str, Field]


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUF file's reader, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise AdaPrunerError(f"GGUF file {path} does not exist: check the path")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:
        raise AdaPrunerError(f"{path} is not a readable GGUF file ({exc})") from None


def read_fields(path: str | Path, reader: gguf.GGUFReader | None = None) -> TokenizerFields:
    """The tokenizer keys of a GGUF file (values decoded), or a one-line error."""
    reader = reader or open_gguf(path)
    fields: TokenizerFields = {}
    for name, field in reader.fields.items():
        if not name.startswith(TOKENIZER_PREFIX):
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        fields[name] = Field(field.contents(), vtype, sub_type)
    if f"{TOKENIZER_PREFIX}ggml.tokens" not in fields:
        raise AdaPrunerError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens): give a GGUF of the dense model")
    return fields


def add_fields(writer: gguf.GGUFWriter, fields: TokenizerFields) -> None:
    for name, field in fields.items():
        writer.add_key_value(name, field.value, field.vtype, sub_type=field.sub_type)


def token_count(fields: TokenizerFields) -> int:
    return len(fields[f"{TOKENIZER_PREFIX}ggml.tokens"].value)


def save_tokenizer_gguf(source: str | Path, destination: str | Path) -> Path:
    """Write the tokenizer keys of ``source`` (a model GGUF) to a tensor-less GGUF at ``destination``."""
    reader = open_gguf(source)
    fields = read_fields(source, reader)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(destination), arch)
    add_fields(writer, fields)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(destination)


# --- from a Hugging Face tokenizer --------------------------------------------------------------


def check_text_hash(tokenizer: Any) -> str:
    ids = tokenizer.encode(CHECK_TEXT, add_special_tokens=False)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def adds_bos(tokenizer: Any) -> bool:
    """Whether transformers puts BOS before a text (llama.cpp must then do the same)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def pre_tokenizer_name(tokenizer: Any, model_dir: Path) -> str:
    """llama.cpp's name for how this tokenizer splits text, recognised by its ids on CHECK_TEXT."""
    digest = check_text_hash(tokenizer)
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        raise AdaPrunerError(
            f"the tokenizer of {model_dir} is not one AdaPruner can name for llama.cpp (check hash "
            f"{digest[:12]}): pass --tokenizer-gguf FILE, a GGUF of the dense model (e.g. from llama.cpp's "
            "convert_hf_to_gguf.py)"
        )
    return name


def _tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdaPrunerError(
            f"{model_dir} has no readable tokenizer.json ({exc}): pass --tokenizer-gguf FILE, a GGUF of the dense model"
        ) from None
    model, decoder = data.get("model", {}), data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise AdaPrunerError(
            f"the tokenizer of {model_dir} is not a byte-level BPE (GPT-2 style) tokenizer: pass --tokenizer-gguf "
            "FILE, a GGUF of the dense model"
        )
    return data


def tokens_and_types(data: dict[str, Any], rows: int) -> tuple[list[str], list[int]]:
    """One token per embedding row: special added tokens CONTROL, other added USER_DEFINED, the rest
    NORMAL, ids with no token (the embedding padded past the vocabulary) ``[PAD<id>]`` UNUSED."""
    by_id: dict[int, tuple[str, int]] = {idx: (tok, TokenType.NORMAL) for tok, idx in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= rows:
        raise AdaPrunerError(
            f"the tokenizer has token id {max(by_id)} but the model only {rows} embedding rows: "
            "the tokenizer does not belong to this model"
        )
    tokens, types = [], []
    for idx in range(rows):
        token, kind = by_id.get(idx, (f"[PAD{idx}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def fields_from_hf(model_dir: str | Path, rows: int) -> TokenizerFields:
    """Tokenizer keys built from a Hugging Face tokenizer directory (see the module docstring)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    data = _tokenizer_json(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pre = pre_tokenizer_name(tokenizer, model_dir)
    tokens, types = tokens_and_types(data, rows)
    collector = gguf.GGUFWriter(None, "llama")  # only collects key-values, never written
    collector.add_tokenizer_model("gpt2")
    collector.add_tokenizer_pre(pre)
    collector.add_token_list(tokens)
    collector.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=rows).add_to_gguf(collector, quiet=True)
    fields: TokenizerFields = {f"{TOKENIZER_PREFIX}ggml.add_bos_token": Field(adds_bos(tokenizer), GGUFValueType.BOOL)}
    for shard in collector.kv_data:
        for name, value in shard.items():
            if name.startswith(TOKENIZER_PREFIX):
                fields[name] = Field(value.value, value.type, getattr(value, "sub_type", None))
    return fields
