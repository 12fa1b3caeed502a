"""Layer-by-layer local pruning: every decoder layer is pruned and refitted on what it really receives.

Calibration windows enter layer 0; for each decoder layer in order the engine

1. gathers the input moments of o_proj (the attention output of every head) *from the model pruned so
   far*, chooses the heads to keep (from a given plan, or by structured OBS) and refits o_proj;
2. gathers the input moments of down_proj (through the already refitted attention), chooses the
   channels and refits down_proj;
3. runs the pruned layer to produce the next layer's inputs.

Each refit reproduces what the *dense* projection outputs on the pruned model's own inputs (``W x + b``
with every input column), so every layer is fitted to what it will see once the earlier layers are
pruned (sequential, as ZipLM, SlimGPT and Týr-the-Pruner do). Only one projection's moments live at a
time (``InputMoments``: fp64 sums), next to the calibration hidden states of the current layer.

Removed columns are written as zeros and the refitted kept columns (and bias) in place, so during the
pass the model *is* the pruned model, without masks. ``restore=True`` puts the dense weights back at the
end and returns the refits for :func:`applied` (search trials); otherwise the model stays refitted and
``prune_physically`` then cuts it (``adapruner prune``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AdaPrunerError
from ..models.base import ModelAdapter, get_adapter
from ..models.groups import HeadMode, attention_group
from ..pruning.plan import KeepCounts, PrunePlan, layer_plan
from ..util import log
from .solve import InputMoments, Refit, bias_compensation, obs_select, output_energy, refit_columns

REFITS = ("lsq", "bias")
SELECTIONS = ("plan", "obs")


@dataclass(frozen=True)
class LocalSettings:
    """How the engine prunes: ``selection`` plan (given) or obs; ``refit`` lsq or bias (FLAP's)."""

    selection: str = "plan"
    refit: str = "lsq"
    damping: float = 0.01  # fraction of the mean diagonal of the Gram matrix added to its diagonal
    bias: bool = True  # lsq: refit a bias too (the input mean's share); obs then ranks on the covariance
    rounds: int = 16  # obs: batches in which MLP channels are removed
    batch_size: int = 16  # calibration windows per forward step
    # where the layers run: None = where the model is; e.g. "cuda" for a model kept on the CPU, which then
    # goes to the device one decoder layer at a time (weights, hidden states and statistics)
    device: str | None = None

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise AdaPrunerError(f"unknown local selection '{self.selection}': choose one of {', '.join(SELECTIONS)}")
        if self.refit not in REFITS:
            raise AdaPrunerError(f"unknown --refit '{self.refit}' for local pruning: choose one of {', '.join(REFITS)}")
        if not 0.0 <= self.damping <= 1e3:
            raise AdaPrunerError(f"--refit-damping {self.damping} must lie in [0, 1000] (e.g. 0.01)")
        if self.rounds < 1 or self.batch_size < 1:
            raise AdaPrunerError("obs rounds and the refit batch size must be at least 1")
        if self.device is not None:
            try:
                if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
                    raise AdaPrunerError(f"--refit-device {self.device}: no CUDA device is available here")
            except RuntimeError:
                raise AdaPrunerError(
                    f"--refit-device '{self.device}' is not a torch device (e.g. cuda, cuda:1, cpu)"
                ) from None


@dataclass
class LocalResult:
    """The plan the engine pruned with, the refitted projections and what the refits cost."""

    plan: PrunePlan
    refits: dict[str, Refit] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "layer.kind" -> relative error
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative error after the refit
    damped: dict[str, float] = field(default_factory=dict)  # modules that needed more damping than asked
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready record (for ``adapruner.json``)."""
        errors = list(self.errors.values())
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "relative_errors": {k: round(v, 6) for k, v in self.errors.items()},
            "damping_raised": self.damped,
            "curves": {k: [[n, round(e, 6)] for n, e in v] for k, v in self.curves.items()},
        }


class _StopForwardError(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class LayerInputs:
    """The hidden states entering a decoder layer, per batch, with the keyword arguments it is called with."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor inside (nested tuples, lists, dicts) on ``device`` (None: as it is)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_inputs(
    adapter: ModelAdapter, windows: torch.Tensor, batch_size: int, device: torch.device | None = None
) -> LayerInputs:
    """Run the embeddings (and whatever precedes layer 0) on ``windows`` and keep layer 0's inputs
    (moved to ``device`` when the layers are to run elsewhere than the model lives)."""
    layer0 = adapter.decoder_layers()[0]
    inputs = LayerInputs([], [])

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(to_device(hidden, device))
        inputs.kwargs.append(to_device({k: v for k, v in kwargs.items() if k != "hidden_states"}, device))
        raise _StopForwardError

    home = next(adapter.model.parameters()).device
    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            with suppress(_StopForwardError):
                adapter.model.get_decoder()(input_ids=batch.to(home), use_cache=False)
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch: the next layer's inputs (same keyword arguments)."""
    hidden = [_first(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True)]
    return LayerInputs(hidden, inputs.kwargs)


@torch.no_grad()
def input_moments(layer: nn.Module, module: nn.Linear, inputs: LayerInputs, device: torch.device) -> InputMoments:
    """Moments of ``module``'s input over every batch; the layer stops right after reaching it."""
    moments = InputMoments(module.in_features, device)

    def hook(_module: nn.Module, args: tuple) -> None:
        moments.add(args[0])
        raise _StopForwardError

    handle = module.register_forward_pre_hook(hook)
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            with suppress(_StopForwardError):
                layer(hidden, **kwargs)
    finally:
        handle.remove()
    return moments


def write_refit(module: nn.Linear, refit: Refit) -> None:
    """Put refitted weights (and bias, created if the module had none) into ``module`` in place."""
    module.weight.data.copy_(refit.weight.to(module.weight.device))
    if refit.bias is None:
        return
    bias = refit.bias.to(device=module.weight.device, dtype=module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    else:
        module.bias.data.copy_(bias)


def _snapshot(module: nn.Linear, device: torch.device | None = None) -> Refit:
    """A copy of the module's weights (on ``device``: the model's home when layers visit another device)."""
    bias = None if module.bias is None else module.bias.detach().to(device, copy=True)
    return Refit(module.weight.detach().to(device, copy=True), bias, 0.0)


@contextmanager
def _visiting(layer: nn.Module, device: torch.device, home: torch.device) -> Iterator[None]:
    """The layer on ``device`` for the block, back home afterwards (a no-op when both are the same)."""
    if device == home:
        yield
        return
    layer.to(device)
    try:
        yield
    finally:
        layer.to(home)


def _restore(module: nn.Linear, original: Refit) -> None:
    module.weight.data.copy_(original.weight)
    if original.bias is None:
        module.bias = None
    else:
        module.bias.data.copy_(original.bias)


@contextmanager
def applied(model: nn.Module, refits: dict[str, Refit]) -> Iterator[None]:
    """Run ``model`` with refitted projections written in place; the dense weights come back afterwards."""
    originals: dict[str, Refit] = {}
    try:
        for name, refit in refits.items():
            module = model.get_submodule(name)
            originals[name] = _snapshot(module)
            write_refit(module, refit)
        yield
    finally:
        for name, original in originals.items():
            _restore(model.get_submodule(name), original)


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


class _Engine:
    """One pass of the layer-by-layer pruning (see the module docstring)."""

    def __init__(
        self, adapter: ModelAdapter, settings: LocalSettings, head_mode: HeadMode, device: torch.device, keep: bool
    ) -> None:
        self.adapter, self.settings, self.head_mode, self.device = adapter, settings, head_mode, device
        self.keep = keep  # copies of the dense weights and of the refits, for restore and applied()
        self.home = next(adapter.model.parameters()).device  # dense copies and refits are kept here
        self.result = LocalResult(PrunePlan.keep_all(adapter))
        self.originals: dict[str, Refit] = {}

    @property
    def centred(self) -> bool:
        """A bias column (lsq with bias, FLAP's compensation): fits and OBS costs on the covariance."""
        return self.settings.bias or self.settings.refit == "bias"

    def fit(self, name: str, module: nn.Linear, moments: InputMoments, kept: torch.Tensor) -> None:
        """Refit ``module`` on its kept columns and write it in place (copies kept only to restore).

        The moments are consumed (their Gram matrix freed during the solve), so one projection's
        statistics are in memory at a time.
        """
        s = self.settings
        if self.keep:
            self.originals[name] = _snapshot(module, self.home)
        if s.refit == "bias":
            refit = bias_compensation(module.weight, module.bias, moments, kept)
        else:
            refit = refit_columns(module.weight, module.bias, moments, kept, s.damping, s.bias, name)
        if refit.damping > s.damping:
            self.result.damped[name] = refit.damping
            log(f"{name}: its input statistics needed damping {refit.damping:g} instead of {s.damping:g}")
        self.result.errors[name] = refit.error
        write_refit(module, refit)
        if self.keep:  # search trials: the refits are applied again later (adapruner.local.applied)
            bias = None if refit.bias is None else refit.bias.to(self.home)
            self.result.refits[name] = Refit(refit.weight.to(self.home), bias, refit.damping, refit.error)

    def statistics(self, name: str, index: int, module: nn.Linear, inputs: LayerInputs) -> InputMoments:
        """The input moments of ``module`` on the pruned model so far (checked)."""
        moments = input_moments(self.adapter.decoder_layers()[index], module, inputs, self.device)
        moments.check(name)
        return moments

    def select(
        self, key: str, module: nn.Linear, moments: InputMoments, width: int, keep: int, blocks: int
    ) -> list[int]:
        """Units to keep by structured OBS; the relative error curve is recorded under ``key``."""
        s = self.settings
        gram = moments.finalise(self.centred)  # the moments keep it for the refit that follows
        selection = obs_select(module.weight, gram, width, keep, blocks, s.rounds, s.damping, key)
        total = max(output_energy(module.weight, gram), 1e-30)
        self.result.curves[key] = [(n, e / total) for n, e in selection.curve]
        return selection.kept_units

    def attention(self, index: int, inputs: LayerInputs, kept_heads: list[int] | None, keep: int | None) -> None:
        adapter, mods = self.adapter, self.adapter.layer(index)
        name = adapter.prunable_module_names(index)["o_proj"]
        shape, group = adapter.layer_shape(index), attention_group(adapter, index, self.head_mode)
        if kept_heads is not None and len(kept_heads) == shape.num_attention_heads:
            return  # nothing removed: nothing to refit
        moments = self.statistics(name, index, mods.o_proj, inputs)
        if kept_heads is None:
            width = mods.o_proj.in_features // group.num_units
            units = self.select(f"{index}.attention", mods.o_proj, moments, width, keep, group.blocks)
            lp = layer_plan(shape, group, units, [])
            kept_heads = lp.query_heads
            planned = self.result.plan.layers[index]
            planned.query_heads, planned.kv_heads = kept_heads, lp.kv_heads
        if len(kept_heads) < shape.num_attention_heads:
            self.fit(name, mods.o_proj, moments, _head_columns(kept_heads, adapter.head_dim))

    def mlp(self, index: int, inputs: LayerInputs, kept: list[int] | None, keep: int | None) -> None:
        adapter, mods = self.adapter, self.adapter.layer(index)
        name = adapter.prunable_module_names(index)["down_proj"]
        if kept is not None and len(kept) == mods.down_proj.in_features:
            return
        moments = self.statistics(name, index, mods.down_proj, inputs)
        if kept is None:
            kept = self.select(f"{index}.mlp", mods.down_proj, moments, 1, keep, 1)
            self.result.plan.layers[index].channels = kept
        if len(kept) < mods.down_proj.in_features:
            self.fit(name, mods.down_proj, moments, torch.tensor(kept, dtype=torch.long))

    def restore(self) -> None:
        for name, original in self.originals.items():
            _restore(self.adapter.model.get_submodule(name), original)


def local_prune(
    model: nn.Module,
    windows: torch.Tensor,
    settings: LocalSettings,
    *,
    plan: PrunePlan | None = None,
    keep: KeepCounts | None = None,
    head_mode: HeadMode = "auto",
    restore: bool = False,
) -> LocalResult:
    """Prune ``model`` layer by layer on the calibration ``windows`` [N, L] (see the module docstring).

    ``plan`` fixes what is kept (selection ``plan``: any metric's choice, refitted); with selection
    ``obs`` the engine chooses by structured OBS, keeping ``keep.counts[i]`` (attention units, MLP
    channels) in each pruned layer. With ``restore`` the model is unchanged afterwards (also after an
    error) and the refits are returned for :func:`applied`, at the cost of a copy of every refitted
    projection; otherwise the model stays pruned in place (removed columns zero), no copy is kept
    (``result.refits`` stays empty), and after an error the model is part refitted: discard it.
    """
    adapter = get_adapter(model)
    if settings.selection == "plan" and plan is None:
        raise AdaPrunerError("local pruning with the plan's selection needs a plan")
    if settings.selection == "obs" and keep is None:
        raise AdaPrunerError("structured OBS selection needs per-layer keep counts")
    if plan is not None:
        plan.validate(adapter)
    start = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(settings.device) if settings.device is not None else home
    engine = _Engine(adapter, settings, head_mode, device, keep=restore)
    dense_shapes = adapter.layer_shapes()
    if plan is not None:
        pruned = [i for i, lp in enumerate(plan.layers) if lp.shape != dense_shapes[i]]
    else:
        pruned = [i for i, c in enumerate(keep.counts) if c is not None]
    try:
        inputs = capture_inputs(adapter, windows, settings.batch_size, device if device != home else None)
        engine.result.tokens = inputs.tokens
        last = max(pruned, default=-1)
        for index in tqdm(range(last + 1), desc="local pruning", leave=False, disable=last < 3):
            layer = adapter.decoder_layers()[index]
            with _visiting(layer, device, home):
                if index in pruned:
                    counts = None if keep is None else keep.counts[index]
                    lp = plan.layers[index] if plan is not None else None
                    engine.attention(index, inputs, lp.query_heads if lp else None, counts[0] if counts else None)
                    engine.mlp(index, inputs, lp.channels if lp else None, counts[1] if counts else None)
                    if lp is not None:
                        engine.result.plan.layers[index] = lp
                if index < last:
                    inputs = run_layer(layer, inputs)
    except BaseException:
        engine.restore()
        raise
    if restore:
        engine.restore()
    engine.result.plan.validate(adapter)
    engine.result.seconds = time.perf_counter() - start
    return engine.result


__all__ = [
    "REFITS",
    "SELECTIONS",
    "LayerInputs",
    "LocalResult",
    "LocalSettings",
    "applied",
    "capture_inputs",
    "local_prune",
    "write_refit",
]
