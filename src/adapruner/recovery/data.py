"""Training data for LoRA recovery: Alpaca instructions or plain text, tokenized like LLM-Pruner.

``--data`` names one of:

* ``alpaca`` / ``yahma/alpaca-cleaned``: the cleaned Alpaca set from the Hugging Face hub (needs the
  ``datasets`` package, ``pip install 'adapruner[hub]'``, and a reachable hub);
* a local ``.json`` file (a list of records) or ``.jsonl`` file (one record a line) in Alpaca format:
  ``instruction``, ``output`` and, optionally, ``input``;
* plain text: an AdaPruner text source (``wiki``, ``news``, ``books``, ``squad``, the hub sources, a
  ``.txt`` file or a ``.jsonl`` file whose records have a ``text`` field), or several joined by commas
  (``wiki,news,books,squad``, the default: every source's blocks, shuffled together by the Trainer).
  Training uses each source's calibration split, validation its validation split (taken from the
  sources in turn), so the test split used by ``adapruner evaluate`` is never trained on.

Instructions go through LLM-Pruner's (Alpaca-LoRA's) prompt template, one example per record, truncated to
``cutoff_len`` tokens with EOS appended. Text is tokenized document by document (EOS between documents),
concatenated and cut into blocks of ``cutoff_len`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.sources import _hub_disabled, is_connection_error, load_documents
from ..errors import AdaPrunerError, OfflineError

ALPACA_HUB = "yahma/alpaca-cleaned"
ALPACA_NAMES = ("alpaca", ALPACA_HUB)
ALPACA_REQUIRED = ("instruction", "output")

# LLM-Pruner's templates/alpaca.json (from Alpaca-LoRA), verbatim.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "", output: str | None = None) -> str:
    """Alpaca-LoRA's ``Prompter.generate_prompt``: the prompt, followed by the response if given."""
    if input_text:
        prompt = PROMPT_INPUT.format(instruction=instruction, input=input_text)
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt + output if output is not None else prompt


class ExampleDataset:
    """A list of tokenized examples as a map-style dataset for the Trainer."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass
class TrainingData:
    source: str
    kind: str  # "instructions" or "text"
    train: ExampleDataset
    val: ExampleDataset | None
    fingerprint: str  # of the raw records/documents, so a record says exactly what was trained on
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_example(self) -> float:
        """Mean tokens of a training example (text blocks: exactly the block length)."""
        examples = self.train.examples
        return sum(len(e["input_ids"]) for e in examples) / max(len(examples), 1)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "train_examples": len(self.train),
            "val_examples": len(self.val) if self.val is not None else 0,
            **self.details,
        }


def _fingerprint(items: list[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# --- reading ---------------------------------------------------------------------------------------


def _is_instruction_file(path: Path) -> bool:
    """``.json`` is always instructions; ``.jsonl`` is unless its first record has ``text`` and no ``instruction``."""
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() != ".jsonl":
        return False
    if not path.is_file():
        return True  # reported by read_instructions
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return True  # reported with its line number by read_instructions
                return not (isinstance(first, dict) and "text" in first and "instruction" not in first)
    return True  # empty: reported by read_instructions


def read_instructions(path: Path) -> list[dict[str, str]]:
    """Alpaca records of a local ``.json`` (list) or ``.jsonl`` file, checked field by field."""
    if not path.is_file():
        raise AdaPrunerError(f"training data {path} does not exist: give an Alpaca .json/.jsonl file or a text source")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise AdaPrunerError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): fix the file") from None
        if not isinstance(rows, list):
            raise AdaPrunerError(f"{path} must hold a JSON list of Alpaca records (instruction, input, output)")
        numbered = [(f"{path}[{i}]", row) for i, row in enumerate(rows)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise AdaPrunerError(
                    f"{path}:{number} is not valid JSON ({exc.msg}): fix or remove that line"
                ) from None
    if not numbered:
        raise AdaPrunerError(f"{path} holds no examples: give Alpaca records with instruction, input and output")
    return [_check_record(where, row) for where, row in numbered]


def _check_record(where: str, row: Any) -> dict[str, str]:
    if not isinstance(row, dict):
        raise AdaPrunerError(f"{where} is not a JSON object: Alpaca records need instruction, input and output")
    for key in ALPACA_REQUIRED:
        if key not in row:
            raise AdaPrunerError(
                f"{where} has no '{key}' key: Alpaca records need instruction, output and (optionally) input"
            )
    record = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    for key, value in record.items():
        if not isinstance(value, str):
            raise AdaPrunerError(f"{where}: '{key}' must be a string, not {type(value).__name__}")
    return record


def load_alpaca_hub() -> list[dict[str, str]]:
    """``yahma/alpaca-cleaned`` from the hub (optional ``datasets`` package)."""
    hint = "pass a local Alpaca .json/.jsonl file (or a text source such as wiki) with --data"
    if _hub_disabled():
        raise OfflineError(f"{ALPACA_HUB} cannot be downloaded (the Hugging Face hub is offline): {hint}")
    try:
        import datasets
    except ImportError:
        raise AdaPrunerError(
            f"{ALPACA_HUB} needs the `datasets` package (pip install 'adapruner[hub]'), or {hint}"
        ) from None
    try:
        rows = datasets.load_dataset(ALPACA_HUB, split="train")
    except Exception as error:
        if is_connection_error(error):
            raise OfflineError(f"{ALPACA_HUB} cannot be downloaded (the hub is not reachable): {hint}") from error
        raise AdaPrunerError(f"could not load {ALPACA_HUB} from the hub: {str(error).splitlines()[0]}") from error
    return [_check_record(f"{ALPACA_HUB}[{i}]", dict(row)) for i, row in enumerate(rows)]


# --- tokenizing ------------------------------------------------------------------------------------


def _tokenize(tokenizer: Any, text: str, cutoff_len: int, add_eos: bool = True) -> dict[str, list[int]]:
    """LLM-Pruner's ``tokenize``: truncate to ``cutoff_len``, append EOS when there is room."""
    result = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)
    ids, mask = list(result["input_ids"]), list(result["attention_mask"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
        mask.append(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": list(ids)}


def tokenize_instruction(
    tokenizer: Any, record: dict[str, str], cutoff_len: int, train_on_inputs: bool = True
) -> dict[str, list[int]]:
    """LLM-Pruner's ``generate_and_tokenize_prompt``: prompt + response; optionally loss on the response only."""
    full = _tokenize(tokenizer, alpaca_prompt(record["instruction"], record["input"], record["output"]), cutoff_len)
    if not train_on_inputs:
        user = _tokenize(tokenizer, alpaca_prompt(record["instruction"], record["input"]), cutoff_len, add_eos=False)
        n = len(user["input_ids"])
        full["labels"] = [-100] * n + full["labels"][n:]
    return full


def text_blocks(tokenizer: Any, documents: list[str], block: int) -> list[dict[str, list[int]]]:
    """Documents tokenized (EOS after each), concatenated and cut into whole blocks of ``block`` tokens."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    chunks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
    return [{"input_ids": c, "attention_mask": [1] * block, "labels": list(c)} for c in chunks]


# --- entry point -----------------------------------------------------------------------------------


def load_training_data(
    source: str,
    tokenizer: Any,
    *,
    cutoff_len: int = 256,
    val_set_size: int = 2000,
    train_on_inputs: bool = True,
    seed: int = 42,
) -> TrainingData:
    """Tokenized train (and validation) examples of ``source`` (see the module doc for what it may name)."""
    source = str(source)
    path = Path(source).expanduser()
    if source in ALPACA_NAMES:
        return _instruction_data(source, load_alpaca_hub(), tokenizer, cutoff_len, val_set_size, train_on_inputs, seed)
    if _is_instruction_file(path):
        rows = read_instructions(path)
        return _instruction_data(str(path), rows, tokenizer, cutoff_len, val_set_size, train_on_inputs, seed)
    return _text_data(source, tokenizer, cutoff_len, val_set_size)


def _instruction_data(
    source: str,
    rows: list[dict[str, str]],
    tokenizer: Any,
    cutoff_len: int,
    val_set_size: int,
    train_on_inputs: bool,
    seed: int,
) -> TrainingData:
    if val_set_size >= len(rows):
        raise AdaPrunerError(
            f"{source} holds {len(rows)} examples and --val-set-size {val_set_size} leaves none for training: "
            "pass a smaller --val-set-size (0: no validation)"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # LLM-Pruner: train_test_split(shuffle=True, seed=...)
    val_idx, train_idx = order[:val_set_size], order[val_set_size:]

    def encode(indices: list[int]) -> ExampleDataset:
        return ExampleDataset([tokenize_instruction(tokenizer, rows[i], cutoff_len, train_on_inputs) for i in indices])

    return TrainingData(
        source=source,
        kind="instructions",
        train=encode(train_idx),
        val=encode(val_idx) if val_idx else None,
        fingerprint=_fingerprint(rows),
        details={"records": len(rows), "prompt_template": "alpaca (LLM-Pruner / Alpaca-LoRA)"},
    )


def _text_data(source: str, tokenizer: Any, cutoff_len: int, val_set_size: int) -> TrainingData:
    names = [part.strip() for part in source.split(",") if part.strip()]
    if not names:
        raise AdaPrunerError("--data is empty: name a text source such as wiki, or wiki,news,books,squad")
    train: list[dict[str, list[int]]] = []
    val_parts: list[list[dict[str, list[int]]]] = []
    documents: list[list[str]] = []
    counts: dict[str, int] = {}
    for name in names:
        train_docs = load_documents(name, "calibration")
        val_docs = load_documents(name, "validation") if val_set_size > 0 else []
        blocks = text_blocks(tokenizer, train_docs, cutoff_len)
        if not blocks:
            raise AdaPrunerError(
                f"source '{name}' has fewer than {cutoff_len} training tokens: use more text or a smaller --cutoff-len"
            )
        train += blocks
        counts[name] = len(blocks)
        val_parts.append(text_blocks(tokenizer, val_docs, cutoff_len))
        documents += [train_docs, val_docs]
    val = _in_turn(val_parts)[:val_set_size]
    return TrainingData(
        source=",".join(names),
        kind="text",
        train=ExampleDataset(train),
        val=ExampleDataset(val) if val else None,
        fingerprint=_fingerprint(documents),
        details={
            "splits": {"train": "calibration", "val": "validation"},
            "block_tokens": cutoff_len,
            "train_blocks": counts,
        },
    )


def _in_turn(parts: list[list[Any]]) -> list[Any]:
    """One item of each list in turn, so a cap on the total takes from every source alike."""
    merged = []
    for index in range(max((len(p) for p in parts), default=0)):
        merged += [part[index] for part in parts if index < len(part)]
    return merged
