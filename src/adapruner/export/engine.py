"""llama.cpp itself, through llama-cpp-python: its quantiser, and logits/perplexity/speed of a GGUF.

The exporter writes F32/F16/BF16/Q8_0 with the ``gguf`` package's own encoders; every other type
(Q4_0, the K-quants…) goes through ``llama_model_quantize``, the quantiser of llama.cpp's
``llama-quantize`` tool, so a file quantises exactly as it would by hand. The same binding loads a GGUF
to check it against transformers (tests, ``benchmarks/engine_speed.py``). llama-cpp-python compiles
llama.cpp from source once per machine (10–35 min on 2 cores); ``pip install 'adapruner[engine]'``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdaPrunerError

# --quant names that llama.cpp's quantiser writes, as its llama_ftype constants' suffixes
LLAMA_QUANTS = {
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q2_k": "Q2_K",
    "q3_k_s": "Q3_K_S",
    "q3_k_m": "Q3_K_M",
    "q3_k_l": "Q3_K_L",
    "q4_k_s": "Q4_K_S",
    "q4_k_m": "Q4_K_M",
    "q5_k_s": "Q5_K_S",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}
GGML_F32 = 0  # ggml_type of an F32 tensor
INSTALL_HINT = "pip install 'adapruner[engine]' (llama-cpp-python; compiles llama.cpp once, 10-35 min on 2 cores)"


def llama_cpp() -> Any:
    """The ``llama_cpp`` module, or a one-line error that says how to install it."""
    try:
        import llama_cpp as module
    except ImportError:
        raise AdaPrunerError(f"this needs llama.cpp's Python binding: {INSTALL_HINT}") from None
    return module


def quantize(source: str | Path, output: str | Path, quant: str, threads: int | None = None) -> None:
    """Quantise the GGUF ``source`` into ``output`` with llama.cpp's quantiser (``llama-quantize``'s defaults:
    tensors whose rows its block size does not divide fall back to a type that fits, as the tool does)."""
    module = llama_cpp()
    if quant not in LLAMA_QUANTS:
        raise AdaPrunerError(f"llama.cpp quantisation '{quant}' unknown: choose among {', '.join(LLAMA_QUANTS)}")
    params = module.llama_model_quantize_default_params()
    params.ftype = getattr(module, f"LLAMA_FTYPE_MOSTLY_{LLAMA_QUANTS[quant]}")
    params.nthread = threads or os.cpu_count() or 1
    with quiet_stderr() as log:
        code = module.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if code != 0:
        raise AdaPrunerError(f"llama.cpp could not quantise {source} to {quant}: {llama_reason(log)}")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[list[str]]:
    """What the C library prints on file descriptor 2 (its per-tensor log) is kept out of the terminal; the
    yielded list receives those lines on exit, so a failure can quote llama.cpp's own reason."""
    lines: list[str] = []
    saved = os.dup(2)
    python_side = io.StringIO()  # llama-cpp-python forwards llama.cpp's log to sys.stderr
    with tempfile.TemporaryFile() as capture, contextlib.redirect_stderr(python_side):
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())
            lines.extend(python_side.getvalue().splitlines())


def llama_reason(lines: list[str]) -> str:
    """llama.cpp's own error line from its log, e.g. 'unknown pre-tokenizer type: ...'."""
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return errors[0].split("error loading model: ")[-1].strip() if errors else "see llama.cpp's log (verbose=True)"


def load(
    path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True, kv_f32: bool = False
) -> Any:
    """A ``llama_cpp.Llama`` on ``path``, quiet, CPU threads as given (default: every core). ``kv_f32``: an F32
    KV cache instead of llama.cpp's F16 (exact comparisons with transformers)."""
    module = llama_cpp()
    if not Path(path).is_file():
        raise AdaPrunerError(f"{path} does not exist: export the model first (adapruner export DIR --output FILE)")
    threads = threads or os.cpu_count() or 1
    log: list[str] = []
    try:
        with quiet_stderr() as log:
            return module.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                verbose=False,
                **({"type_k": GGML_F32, "type_v": GGML_F32} if kv_f32 else {}),
            )
    except ValueError:  # llama-cpp-python: "Failed to load model from file"
        raise AdaPrunerError(f"llama.cpp cannot load {path}: {llama_reason(log)}") from None


def logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence, from an empty cache."""
    llm.reset()  # eval() drops the cache past n_tokens, so the sequence starts afresh
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def window_nll(llm: Any, window: Sequence[int]) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of one window, as transformers' perplexity counts them."""
    scores = logits(llm, window)[:-1]  # float32: the log-sum-exp is exact to ~1e-7 relative, at half the time
    targets = np.asarray(window[1:])
    top = scores.max(axis=1, keepdims=True)
    np.subtract(scores, top, out=scores)
    picked = scores[np.arange(len(targets)), targets].astype(np.float64)
    log_z = np.log(np.exp(scores, out=scores).sum(axis=1, dtype=np.float64))
    return float((log_z - picked).sum()), len(targets)


def perplexity(llm: Any, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) over ``windows`` [N, L] (llama.cpp's logits, our windowing)."""
    total, count = 0.0, 0
    for window in windows:
        nll, n = window_nll(llm, window.tolist())
        total, count = total + nll, count + n
    return math.exp(total / count)


@dataclass(frozen=True)
class Speed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def speed(llm: Any, prompt: Sequence[int], continuation: Sequence[int], repeats: int = 3) -> Speed:
    """Best of ``repeats``: prefill of ``prompt`` in one batch, then ``continuation`` fed one token at a time
    (what decoding costs; which token is fed does not change the cost). Load ``llm`` with
    ``logits_all=False`` so the prefill is not timed copying every position's logits."""
    best_prefill = best_decode = 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(list(prompt))
        prefill = len(prompt) / (time.perf_counter() - start)
        start = time.perf_counter()
        for token in continuation:
            llm.eval([int(token)])
        decode = len(continuation) / (time.perf_counter() - start)
        best_prefill, best_decode = max(best_prefill, prefill), max(best_decode, decode)
    return Speed(best_prefill, best_decode)
