"""The linear algebra of local pruning: input moments, least-squares refit and structured OBS selection.

Notation for one projection ``y = W x + b`` (o_proj or down_proj), ``x`` its input over the calibration
tokens, ``K`` the input columns that stay. Everything is solved on the *Gram matrix* of the input:

* without a bias column, ``A = E[x xᵀ]`` (the second moment), and the refit keeps the old bias;
* with a bias column, ``A = Cov(x)`` (centred) and the bias absorbs the mean: the affine least squares
  ``min E||W x + b - W'_K x_K - b'||²`` splits into the centred fit of ``W'_K`` and
  ``b' = b + W μ - W'_K μ_K``. FLAP's bias compensation is the special case ``W'_K = W_K``.

Least squares (``refit_columns``): ``W'_K = W A_{:,K} (A_KK + λ I)⁻¹`` with ``λ = damping · mean diag A_KK``.

Structured OBS (``obs_select``, ZipLM / SlimGPT / Týr-the-Pruner): with ``A⁻¹`` over the kept columns,
removing the column group ``S`` raises the reconstruction error by ``ε_S = tr(W_S [(A⁻¹)_SS]⁻¹ W_Sᵀ)``;
the best update of the remaining columns is ``δW = -W_S [(A⁻¹)_SS]⁻¹ (A⁻¹)_{S,:}`` and the inverse of
the remaining block is ``A⁻¹ - (A⁻¹)_{:,S} [(A⁻¹)_SS]⁻¹ (A⁻¹)_{S,:}``. Groups go a batch at a time, the
cheapest first; the error after each batch is recorded (an error-vs-removed curve per layer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import AdaPrunerError

MAX_DAMPING = 1e3  # past this the damping fallback gives up: the statistics are unusable
ROWS_PER_PRODUCT = 1024  # rows of x xᵀ formed at a time when accumulating (bounds the fp32 temporary)
MIN_PIVOT = 1e-10  # smallest squared Cholesky pivot, relative to the largest: past it the matrix counts as singular


@dataclass
class InputMoments:
    """Sum of ``x xᵀ`` and of ``x`` over calibration tokens, accumulated in fp64 (bf16/fp16-safe)."""

    width: int
    device: torch.device | str = "cpu"
    gram: torch.Tensor = field(init=False)
    total: torch.Tensor = field(init=False)
    tokens: int = 0
    centred: bool | None = None  # set once the sums are turned into a Gram matrix (finalise)

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.width, self.width, dtype=torch.float64, device=self.device)
        self.total = torch.zeros(self.width, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``[..., width]`` in (products in fp32 at least, sums in fp64)."""
        x = x.detach().reshape(-1, self.width)
        x = (x if x.dtype == torch.float64 else x.float()).to(self.gram.device)
        for start in range(0, self.width, ROWS_PER_PRODUCT):  # a few rows at a time: no n×n temporary
            self.gram[start : start + ROWS_PER_PRODUCT].add_(x[:, start : start + ROWS_PER_PRODUCT].T @ x)
        self.total += x.sum(0).to(device=self.total.device, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)

    def finalise(self, centred: bool) -> torch.Tensor:
        """The Gram matrix, made *in place* from the sums (no second n×n copy); the moments keep it."""
        if self.centred is None:
            self.gram.div_(max(self.tokens, 1))
            if centred:
                self.gram.addr_(self.mean, self.mean, alpha=-1)
            self.centred = centred
        elif self.centred != centred:
            raise ValueError("these moments were finalised with the other centring")
        return self.gram

    def release(self, centred: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The finalised Gram matrix and the mean (None unless ``centred``), handed over: the moments
        let go of it, so the receiver's reference is the only one and can free it early."""
        gram = self.finalise(centred)
        self.gram = torch.empty(0, dtype=torch.float64)
        return gram, self.mean if centred else None

    def check(self, name: str) -> None:
        """Refuse statistics that cannot give a sound refit: too few tokens, or inf/NaN inputs."""
        if not all_finite(self.gram):
            raise AdaPrunerError(
                f"the inputs of {name} overflowed (inf/NaN in its statistics): load the model in float32 or "
                "bfloat16 (--dtype) instead of float16"
            )
        if self.tokens < self.width:
            raise AdaPrunerError(
                f"the refit of {name} saw {self.tokens} calibration tokens for {self.width} input features: "
                f"give at least {self.width} (e.g. --refit-calibration 128x128)"
            )


def all_finite(tensor: torch.Tensor) -> bool:
    """No inf/NaN in ``tensor``, read from its fp64 sum (inf and NaN propagate into it): ``isfinite`` would
    form a full-size copy (``abs``), ~1 GB for a 7B model's MLP Gram matrix."""
    return math.isfinite(float(tensor.sum(dtype=torch.float64)))


@dataclass
class Refit:
    """A projection's refitted weights: ``weight`` full width, zero in the removed columns; ``bias`` or None.

    ``error`` is the reconstruction error ``tr(ΔW A ΔWᵀ)`` relative to the output energy ``tr(W A Wᵀ)``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    damping: float = 0.0  # the damping actually used (more than asked if the matrix needed it)
    error: float = 0.0


def _damped_cholesky(matrix: torch.Tensor, damping: float, name: str) -> tuple[torch.Tensor, float, float]:
    """Cholesky factor of ``matrix + λ·mean(diag)·I``, ``matrix`` damped *in place*; λ grows ×10 until the
    factor exists (reported by the caller). Returns the factor, λ and the absolute shift ``λ·mean(diag)``."""
    diagonal = matrix.diagonal()
    scale = float(diagonal.mean().clamp_min(1e-12))
    current, shift = damping, 0.0
    while current <= MAX_DAMPING:
        diagonal.add_(current * scale - shift)
        shift = current * scale
        factor, info = torch.linalg.cholesky_ex(matrix)
        pivots = factor.diagonal().abs()
        sound = int(info) == 0 and all_finite(factor)
        if sound and float(pivots.min()) ** 2 >= MIN_PIVOT * float(pivots.max()) ** 2:
            return factor, current, shift
        del factor
        current = max(current * 10, 1e-6)
    raise AdaPrunerError(
        f"the input statistics of {name} are singular even with damping {MAX_DAMPING:g}: use more (and more "
        "varied) calibration text (--refit-calibration)"
    )


def damped_inverse(matrix: torch.Tensor, damping: float, name: str = "a projection") -> tuple[torch.Tensor, float]:
    """``(matrix + λ·mean(diag)·I)⁻¹`` and the damping used (``matrix`` is damped in place, then restored)."""
    factor, used, shift = _damped_cholesky(matrix, damping, name)
    matrix.diagonal().sub_(shift)
    return torch.cholesky_inverse(factor), used


def output_energy(w: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(W A Wᵀ)``: the mean squared output of ``W x`` (centred or not, as ``A``)."""
    w = w.detach().to(gram)
    return float(((w @ gram) * w).sum())


def refit_columns(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: InputMoments,
    kept: torch.Tensor,
    damping: float,
    with_bias: bool,
    name: str = "a projection",
) -> Refit:
    """Least-squares weights of the kept input columns that reproduce ``W x + b`` (see the module docstring).

    ``with_bias``: a bias column (the Gram matrix is the covariance and the bias is refitted); else the
    second moment and the old bias stays. The moments are consumed: their Gram matrix is freed once the
    kept block is copied out, so the solve holds it and then two |K|×|K| matrices, never more.
    """
    gram, mean = moments.release(centred=with_bias)
    parts = gram_parts(weight, gram, kept)
    del gram  # the only reference (InputMoments.release): freed before the solve
    return solve_refit(weight, bias, parts, mean, kept, damping, name)


ROWS_PER_SOLVE = 512  # rows of W multiplied by the Gram matrix at a time (bounds the fp64 temporary)


@dataclass
class GramParts:
    """All a refit needs of the n×n Gram matrix ``A``: ``tr(W A Wᵀ)``, the kept block ``A_KK`` and the
    kept-by-removed block ``A_KR``, so that ``A`` itself can be freed before the solve (on a 7B MLP the
    peak is then ``A`` + ``A_KK`` + ``A_KR``, 1.75 GB, instead of also holding ``A_{K,:} Wᵀ``)."""

    total: float
    block: torch.Tensor | None  # A_KK, [|K|, |K|]
    cross: torch.Tensor | None  # A_KR, [|K|, |R|]


def _fp64_rows(weight: torch.Tensor, device: torch.device) -> Iterator[tuple[slice, torch.Tensor]]:
    """``weight`` in fp64 on ``device``, ``ROWS_PER_SOLVE`` rows at a time (never a full fp64 copy)."""
    for start in range(0, weight.shape[0], ROWS_PER_SOLVE):
        rows = slice(start, start + ROWS_PER_SOLVE)
        yield rows, weight[rows].detach().to(device=device, dtype=torch.float64)


def gram_parts(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> GramParts:
    """The parts of a finalised fp64 Gram matrix a refit of ``weight`` on the columns ``kept`` reads
    (``tr(W A Wᵀ)`` a few rows of ``W`` at a time: no fp64 copy of ``W`` nor of ``W A``)."""
    kept = kept.to(gram.device)
    total = sum(float(((w @ gram) * w).sum()) for _, w in _fp64_rows(weight, gram.device))
    removed = _complement(kept, gram.shape[0])
    rows = kept.unsqueeze(1)
    return GramParts(total, gram[rows, kept], gram[rows, removed])  # no |K|×n intermediate


def _complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)


def solve_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    parts: GramParts,
    mean: torch.Tensor | None,
    kept: torch.Tensor,
    damping: float,
    name: str = "a projection",
) -> Refit:
    """:func:`refit_columns` from the Gram matrix's parts (centred when ``mean`` is given, which then refits
    the bias). ``parts`` is consumed: its blocks are freed as soon as they are used."""
    device = parts.block.device
    kept = kept.to(device)
    removed = _complement(kept, weight.shape[1])
    rhs = torch.empty(len(kept), weight.shape[0], dtype=torch.float64, device=device)  # A_{K,:} Wᵀ
    for rows, w in _fp64_rows(weight, device):
        rhs[:, rows] = parts.block @ w[:, kept].T + parts.cross @ w[:, removed].T
    parts.cross = None
    factor, used, shift = _damped_cholesky(parts.block, damping, name)
    parts.block = None
    # two triangular solves on L and Lᵀ (a view): cholesky_solve would copy the |K|×|K| factor
    new_kept = torch.linalg.solve_triangular(factor, rhs, upper=False)
    new_kept = torch.linalg.solve_triangular(factor.mT, new_kept, upper=True).T  # [out, |K|]
    del factor
    # error = tr(ΔW A ΔWᵀ) = tr(W A Wᵀ) - 2 tr(W'_K rhs) + tr(W'_K A_KK W'_Kᵀ), and W'_K (A_KK + shift·I) = rhsᵀ
    error = parts.total - float((new_kept * rhs.T).sum()) - shift * float(new_kept.pow(2).sum())
    del rhs
    new_bias = None if bias is None else bias.detach().to(device=device, dtype=torch.float64)
    if mean is not None:
        offset = torch.cat([w @ mean for _, w in _fp64_rows(weight, device)]) - new_kept @ mean[kept]
        new_bias = offset if new_bias is None else new_bias + offset
    _check_finite(new_kept, new_bias, name)
    new = torch.zeros(weight.shape, dtype=weight.dtype, device=device)
    new[:, kept] = new_kept.to(weight.dtype)
    return Refit(new, None if new_bias is None else new_bias.to(weight.dtype), used, max(error, 0.0) / parts.total)


def bias_compensation(
    weight: torch.Tensor, bias: torch.Tensor | None, moments: InputMoments, kept: torch.Tensor
) -> Refit:
    """FLAP's compensation as a refit: kept columns unchanged, the removed ones' mean input becomes bias."""
    gram, mean = moments.release(centred=True)
    w = weight.detach().to(device=gram.device, dtype=torch.float64)
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    removed[kept.to(w.device)] = False
    offset = w[:, removed] @ mean[removed]
    gone = removed.nonzero().squeeze(1)
    error = output_energy(w[:, gone], gram[gone.unsqueeze(1), gone]) / output_energy(w, gram)
    new = w.clone()
    new[:, removed] = 0
    new_bias = offset if bias is None else bias.detach().to(torch.float64).to(w.device) + offset
    return Refit(new.to(weight.dtype), new_bias.to(weight.dtype), 0.0, error)


def _check_finite(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    if not all_finite(weight) or (bias is not None and not all_finite(bias)):
        raise AdaPrunerError(f"the refit of {name} produced inf/NaN weights: raise --refit-damping")


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(ΔW A ΔWᵀ)``: mean squared output error of the refit over the calibration tokens."""
    return output_energy(weight.to(gram) - new_weight.to(gram), gram)


@dataclass
class Selection:
    """What structured OBS keeps, and the error curve it walked: (units removed, error) per batch."""

    kept_units: list[int]
    curve: list[tuple[int, float]]
    removed: list[int] = field(default_factory=list)  # the units removed, first removed first


def obs_select(
    weight: torch.Tensor,
    gram: torch.Tensor | InputMoments,
    unit_width: int,
    keep: int,
    blocks: int = 1,
    rounds: int = 16,
    damping: float = 0.01,
    name: str = "a projection",
) -> Selection:
    """Greedy structured OBS over the input columns of ``weight``, ``unit_width`` columns per unit.

    Keeps ``keep`` units, the same number in each of ``blocks`` consecutive runs of units (GQA query heads
    per KV group). Removes units in ``rounds`` batches (at most one unit per block and round when
    ``blocks > 1``, so every block loses its cheapest unit in turn), cheapest ``ε`` first, updating the
    inverse and the weights exactly after each batch. The returned curve starts at (0, 0.0).

    Given :class:`InputMoments` (centred), their Gram matrix is taken over and freed once factored, so
    the inverse never sits next to it (a 7B model's MLP: ~1 GB less at the peak).
    """
    num_units = weight.shape[1] // unit_width
    per_block = num_units // blocks
    if keep % blocks or not 0 < keep <= num_units:
        raise AdaPrunerError(f"{name}: cannot keep {keep} of {num_units} units evenly over {blocks} blocks")
    if isinstance(gram, InputMoments):
        matrix = gram.release(centred=True)[0]  # now the only reference
        dtype, device = matrix.dtype, matrix.device
        factor = _damped_cholesky(matrix, damping, name)[0]
        del matrix
        inverse = torch.cholesky_inverse(factor)
        del factor
    else:
        dtype, device = gram.dtype, gram.device
        inverse, _ = damped_inverse(gram, damping, name)
    w = weight.detach().to(device=device, dtype=dtype).clone()
    alive = torch.ones(num_units, dtype=torch.bool)
    curve: list[tuple[int, float]] = [(0, 0.0)]
    order: list[int] = []
    to_remove, removed, error = num_units - keep, 0, 0.0
    steps = to_remove // blocks if blocks > 1 else min(max(rounds, 1), to_remove)
    for step in range(steps):
        costs = _unit_costs(w, inverse, unit_width, alive)
        if blocks > 1:
            picked = [b * per_block + int(costs[b * per_block : (b + 1) * per_block].argmin()) for b in range(blocks)]
        else:
            count = (to_remove - removed + (steps - step) - 1) // (steps - step)
            picked = costs.argsort()[:count].tolist()
        columns = torch.cat([torch.arange(u * unit_width, (u + 1) * unit_width) for u in picked]).to(device)
        error += _remove_columns(w, inverse, columns)
        alive[picked] = False
        order += picked
        removed += len(picked)
        curve.append((removed, error))
    return Selection(alive.nonzero().squeeze(1).tolist(), curve, order)


def _unit_costs(w: torch.Tensor, inverse: torch.Tensor, width: int, alive: torch.Tensor) -> torch.Tensor:
    """ε of removing each unit alone (inf for units already gone)."""
    num_units = alive.numel()
    if width == 1:
        diag = inverse.diagonal().clamp_min(1e-30)
        costs = w.pow(2).sum(0) / diag
    else:
        costs = torch.empty(num_units, dtype=w.dtype)
        for unit in range(num_units):
            if not alive[unit]:
                continue
            cols = slice(unit * width, (unit + 1) * width)
            block = inverse[cols, cols]
            w_s = w[:, cols]
            costs[unit] = (w_s @ torch.linalg.solve(block, w_s.T)).trace()  # tr(W_S [(A⁻¹)_SS]⁻¹ W_Sᵀ)
    costs = costs.cpu().clone()
    costs[~alive] = float("inf")
    return costs


def _remove_columns(w: torch.Tensor, inverse: torch.Tensor, cols: torch.Tensor) -> float:
    """Remove columns ``cols`` jointly: exact OBS update of ``w`` and ``inverse`` in place; returns ε."""
    block = inverse[cols][:, cols]
    solve_w = torch.linalg.solve(block, w[:, cols].T)  # [(A⁻¹)_SS]⁻¹ W_Sᵀ
    error = float((w[:, cols] * solve_w.T).sum())
    rows = inverse[cols]  # (A⁻¹)_{S,:}
    w -= solve_w.T @ rows
    inverse -= rows.T @ torch.linalg.solve(block, rows)
    w[:, cols] = 0
    inverse[cols] = 0
    inverse[:, cols] = 0
    return error


__all__ = [
    "InputMoments",
    "Refit",
    "Selection",
    "bias_compensation",
    "damped_inverse",
    "gram_parts",
    "obs_select",
    "output_energy",
    "reconstruction_error",
    "refit_columns",
    "solve_refit",
]
