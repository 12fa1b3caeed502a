"""Distillation from the dense model: the losses, the teacher, and the teacher's top-k cache.

The pruned model (the student) learns the dense model's (the teacher's) next-token distribution:
forward KL ``KL(p_teacher || p_student)`` at temperature ``T`` (scaled by ``T**2`` so its gradients keep
their size when ``T`` changes), as NVIDIA's Minitron recipe does for width-pruned models. Optionally
the residual stream of chosen layers is matched too: the hidden size is never pruned, so every layer
of the student has a counterpart of the same width in the teacher.

The teacher cache stores, for every training window and position, the teacher's ``k`` largest scaled
logits (``z / T``) with their token ids and the log-sum-exp of all the others. The KL divergence over
those ``k + 1`` buckets (the top-k tokens and "the rest") is exact for the top-k and lumps the tail,
so a student trained from the cache needs neither the teacher in memory nor a teacher forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from ..errors import AdaPrunerError
from ..files import save_tensors_atomic, write_json_atomic
from ..models.loading import load_causal_lm, resolve_location
from ..util import log

LOSSES = ("lm", "kd", "kd+lm")
HIDDEN_LOSSES = ("cosine", "mse")
CACHE_FILE = "teacher-cache.json"
CACHE_FORMAT = 1
NO_TEACHER = "none"
TEACHER_FIELDS = ("teacher_idx", "teacher_val", "teacher_rest")  # what a cached batch carries
CACHE_FIELD_NAMES = {
    "windows": "training windows",
    "windows_fingerprint": "training windows",
    "top_k": "--cache-top-k",
    "vocab_size": "vocabulary",
    "per_shard": "shard size",
    "precision": "--precision",
}


# --- losses ----------------------------------------------------------------------------------------


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is trained on: the logits at ``t`` predict the label at ``t + 1``."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, mean over the trained positions; from ``log_probs`` (T = 1) when given."""
    if log_probs is None:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return F.nll_loss(log_probs[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    student_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL from the teacher's full distribution, mean over the masked positions, times ``T**2``.

    ``student_log_probs``: the student's log-softmax at ``temperature`` when the caller has it already
    (KD + LM at T = 1 share one pass over the vocabulary)."""
    student = student_log_probs
    if student is None:
        student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def kd_loss_topk(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_scaled: torch.Tensor,
    rest_lse: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL over the ``k + 1`` buckets a cache keeps (the teacher's top-k tokens and the rest)."""
    scaled = student_logits.float() / temperature
    student_all = torch.logsumexp(scaled, dim=-1)
    student_top = scaled.gather(-1, top_ids.long()) - student_all.unsqueeze(-1)
    # log of the student's mass outside the top-k: log(1 - sum p_top), kept finite when the top-k hold it all
    top_mass = torch.logsumexp(student_top, dim=-1).clamp(max=-1e-6)
    student_rest = torch.log(-torch.expm1(top_mass))
    teacher_all = torch.logaddexp(torch.logsumexp(top_scaled.float(), dim=-1), rest_lse.float())
    teacher_top = top_scaled.float() - teacher_all.unsqueeze(-1)
    teacher_rest = rest_lse.float() - teacher_all
    per_token = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    rest_mass = teacher_rest.exp()  # 0 when k is the whole vocabulary: x log x is then 0, not nan
    per_token = per_token + torch.special.xlogy(rest_mass, rest_mass) - rest_mass * student_rest
    return _masked_mean(per_token, mask) * temperature**2


def hidden_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    layers: Sequence[int],
    kind: str,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean over ``layers`` of the residual-stream distance: ``1 - cos`` or MSE relative to the teacher's power."""
    mask = attention_mask.bool()
    losses = []
    for layer in layers:
        student, teacher = student_states[layer].float(), teacher_states[layer].float()
        if kind == "cosine":
            per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
        else:
            power = _masked_mean(teacher.pow(2).mean(-1), mask).clamp_min(1e-12)
            per_token = (student - teacher).pow(2).mean(-1) / power
        losses.append(_masked_mean(per_token, mask))
    return torch.stack(losses).mean()


def parse_hidden_layers(text: str, num_layers: int) -> list[int]:
    """``all`` or comma-separated decoder-layer indices (negative from the end) -> hidden-state indices.

    Hidden state ``i + 1`` is decoder layer ``i``'s output (index 0 is the embedding output).
    """
    if text.strip() == "all":
        return list(range(1, num_layers + 1))
    chosen = []
    for part in text.split(","):
        try:
            index = int(part)
        except ValueError:
            raise AdaPrunerError(f"--hidden-layers '{text}': give 'all' or layer indices such as 3,7,-1") from None
        if not -num_layers <= index < num_layers:
            raise AdaPrunerError(f"--hidden-layers: layer {index} does not exist (the model has {num_layers})")
        chosen.append(index % num_layers + 1)
    return sorted(set(chosen))


# --- the teacher -----------------------------------------------------------------------------------


def teacher_name(teacher: str | None, record: dict) -> str | None:
    """The teacher to load: the option, or the dense model the pruned directory records; None for ``none``."""
    if teacher is not None:
        return None if teacher.lower() == NO_TEACHER else teacher
    return record.get("source_model")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The vocabulary (token -> id) and special tokens: equal fingerprints tokenize alike."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@dataclass
class Teacher:
    """The dense model the student learns from, with what identifies it for a cache."""

    name: str
    location: str
    model: torch.nn.Module | None  # None: not loaded (a complete cache needs no model)
    tokenizer_fingerprint: str
    vocab_size: int
    num_layers: int

    def identity(self) -> dict[str, Any]:
        return {"teacher": self.location, "tokenizer": self.tokenizer_fingerprint, "vocab_size": self.vocab_size}


def load_teacher(
    name: str, student_tokenizer: Any, student_config: Any, *, load_weights: bool = True, dtype: str = "float32"
) -> Teacher:
    """Resolve ``name`` as ``prune`` does (asset names, local dirs, hub ids) and refuse a mismatched vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    hint = "pass --teacher DIR (the dense model) or --teacher none for LM loss"
    try:
        location = resolve_location(name)
        config = AutoConfig.from_pretrained(location)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except AdaPrunerError as exc:
        raise AdaPrunerError(f"teacher '{name}': {exc}; {hint}") from None
    except (OSError, ValueError) as exc:
        raise AdaPrunerError(f"teacher '{name}' cannot be loaded ({str(exc).splitlines()[0]}): {hint}") from None
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != tokenizer_fingerprint(student_tokenizer) or config.vocab_size != student_config.vocab_size:
        raise AdaPrunerError(
            f"teacher '{name}' has another tokenizer or vocabulary than the student "
            f"({config.vocab_size} vs {student_config.vocab_size} ids): distil from the model it was pruned from"
        )
    model = None
    if load_weights:
        model = load_causal_lm(location, dtype)
        for param in model.parameters():
            param.requires_grad_(False)
    return Teacher(name, str(location), model, fingerprint, config.vocab_size, config.num_hidden_layers)


# --- the teacher cache -----------------------------------------------------------------------------


def windows_fingerprint(examples: Sequence[dict[str, list[int]]]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(torch.tensor(example["input_ids"], dtype=torch.int64).numpy().tobytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def top_k_outputs(logits: torch.Tensor, k: int, temperature: float) -> dict[str, torch.Tensor]:
    """One forward pass's logits -> the cache's fields: top-k scaled logits, their ids, log-sum-exp of the rest."""
    scaled = logits.float() / temperature
    values, ids = scaled.topk(k, dim=-1)
    rest = scaled.scatter(-1, ids, float("-inf"))
    return {"teacher_idx": ids.to(torch.int32), "teacher_val": values, "teacher_rest": torch.logsumexp(rest, dim=-1)}


class TeacherCache:
    """``DIR/teacher-cache.json`` (identity, shard table) and ``DIR/shard-NNNNN.safetensors``.

    Shard ``s`` holds windows ``s * per_shard ...``, each field as one tensor of shape (windows, length, ...)
    padded to the longest window. Shards are written atomically, so a killed build continues where it
    stopped; a cache whose identity differs from the one asked for is refused, never mixed.
    """

    def __init__(self, directory: Path, identity: dict[str, Any], windows: int, per_shard: int = 256) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.windows = windows
        self.per_shard = per_shard
        self._handles: dict[int, Any] = {}

    @property
    def shards(self) -> int:
        return math.ceil(self.windows / self.per_shard)

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.safetensors"

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.shards) if not self.shard_path(s).is_file()]

    def check(self) -> None:
        """Refuse a directory that holds another cache, in one line naming what differs."""
        path = self.directory / CACHE_FILE
        if not path.is_file():
            if self.directory.is_dir() and any(self.directory.iterdir()):
                raise AdaPrunerError(
                    f"--teacher-cache {self.directory} holds other files and no {CACHE_FILE}: choose an empty directory"
                )
            return
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise AdaPrunerError(f"{path} is corrupted: remove {self.directory} and rerun to rebuild it") from None
        expected = self._header()
        differs = sorted(k for k in expected if stored.get(k) != expected[k])
        if differs:
            what = ", ".join(dict.fromkeys(CACHE_FIELD_NAMES.get(k, k) for k in differs))
            raise AdaPrunerError(
                f"--teacher-cache {self.directory} was built for another {what}: "
                "give another directory or remove it to rebuild"
            )

    def _header(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, **self.identity, "windows": self.windows, "per_shard": self.per_shard}

    def build(
        self,
        teacher: torch.nn.Module,
        examples: Sequence[dict[str, list[int]]],
        batch_size: int,
        autocast: torch.dtype | None = None,
    ) -> None:
        """Run the teacher over every window of the missing shards (resumable shard by shard), under
        ``autocast`` when given (bf16 on hardware that has it: the teacher pass is most of the build)."""
        from tqdm.auto import tqdm

        self.check()
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.directory / CACHE_FILE, self._header())
        missing = self.missing_shards()
        if not missing:
            return
        device = next(teacher.parameters()).device
        k, temperature = self.identity["top_k"], self.identity["temperature"]
        bar = tqdm(total=sum(len(self._window_range(s)) for s in missing), desc="teacher cache", unit="window")
        for shard in missing:
            rows = [examples[i] for i in self._window_range(shard)]
            length = max(len(r["input_ids"]) for r in rows)
            parts: dict[str, list[torch.Tensor]] = {name: [] for name in TEACHER_FIELDS}
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                ids, mask = (
                    _pad([r["input_ids"] for r in batch], length, 0),
                    _pad([r["attention_mask"] for r in batch], length, 0),
                )
                with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for name, value in top_k_outputs(logits, k, temperature).items():
                    parts[name].append(value.cpu())
                bar.update(len(batch))
            tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
            save_tensors_atomic(tensors, self.shard_path(shard), {"format": str(CACHE_FORMAT)})
        bar.close()
        log(f"teacher cache: {self.windows} windows in {self.directory}")

    def _window_range(self, shard: int) -> range:
        return range(shard * self.per_shard, min((shard + 1) * self.per_shard, self.windows))

    def window(self, index: int, length: int) -> dict[str, torch.Tensor]:
        """The cached fields of window ``index``'s first ``length`` positions (read through a memory map)."""
        from safetensors import safe_open

        shard = index // self.per_shard
        if shard not in self._handles:
            path = self.shard_path(shard)
            if not path.is_file():
                raise AdaPrunerError(f"teacher cache shard {path} is missing: rerun to rebuild it")
            self._handles[shard] = safe_open(str(path), framework="pt")
        row = index - shard * self.per_shard
        handle = self._handles[shard]
        return {name: handle.get_slice(name)[row : row + 1, :length][0] for name in TEACHER_FIELDS}


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def open_cache(
    directory: Path,
    teacher: Teacher,
    examples: Sequence[dict[str, list[int]]],
    k: int,
    temperature: float,
    precision: str = "fp32",
) -> TeacherCache:
    identity = teacher.identity() | {
        "windows_fingerprint": windows_fingerprint(examples),
        "top_k": k,
        "temperature": temperature,
        "precision": precision,  # the teacher pass's arithmetic: a bf16 cache is not an fp32 one
    }
    return TeacherCache(directory, identity, len(examples))
