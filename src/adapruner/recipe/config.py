"""What a pruning run is, in three values validated in one place: the :class:`Recipe` (what is pruned
and how units are chosen), the :class:`Runtime` (where and in what precision it runs) and, for a search's
per-layer trial, the :class:`Allocation` (each layer's kept counts). :class:`PruneConfig` bundles them for
``adapruner prune``, whose flat options (CLI flags, API keywords) it sorts into the three.

Every way into pruning (``adapruner prune``, a search trial, ``--from-run``, the pipeline) hands a recipe and
its allocation to :func:`adapruner.recipe.plan.plan_recipe`; the runtime travels in its ``PlanInputs``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import AdaPrunerError
from ..importance import AGGREGATIONS, Importance, get_metric
from ..importance.metrics import PerKind
from ..local import LocalSettings
from ..methods import get_method, with_method
from ..models.groups import HEAD_MODES
from ..pruning.plan import Budget
from ..pruning.ranking import RANKINGS


@dataclass(frozen=True)
class Recipe:
    """What is pruned and how its units are chosen: two runs with the same recipe (and allocation) remove
    the same units, whatever their runtime."""

    model: str
    ratio: float
    metric: str = "element1"
    aggregation: str = "sum"
    calibration: str = "books"
    num_samples: int = 10
    seq_len: int = 64
    layers: str | None = None
    head_mode: str = "auto"
    attention_scale: float = 1.0
    align: int = 1
    seed: int = 0
    mix: dict[str, float] | None = None
    attention_metric: str | None = None  # None: ``metric`` scores attention heads too
    depth_slope: float = 0.0  # per-layer rate profile (see Budget); 0, 0 = uniform
    depth_bend: float = 0.0
    method: str | None = None  # the preset (adapruner.methods) the other fields started from
    ranking: str = "layer"  # layer | global | global-all (FLAP's AL-AM): which units compete for the cut
    # "NxL": activation statistics (Wanda-sp, FLAP, compensation) from N fresh windows of L tokens of
    # ``calibration`` instead of the gradient samples; None: from the same samples
    activation_calibration: str | None = None
    activation_seed: int | None = None  # seed of those windows and of the refit's (None: ``seed``)
    # Refit of the kept weights: "none"; "bias" (FLAP's compensation of removed o_proj/down_proj inputs); "lsq"
    # (layer by layer, least squares of the kept o_proj/down_proj columns, see adapruner.local). The
    # ``obs`` metric always refits by least squares.
    refit: str = "none"
    # NxL windows of ``calibration`` the layer-by-layer engine runs on; None: REFIT_TOKENS tokens in the longest
    # windows the text offers enough of (128x128; books, whose passages are short: 256x64), see check_calibration
    refit_calibration: str | None = None
    refit_damping: float = 1e-3  # fraction of the mean diagonal of each input Gram matrix (measured, README)
    refit_bias: bool = True  # lsq/obs: refit a bias too (the kept columns fitted on centred inputs)
    obs_rounds: int = 16  # obs: batches in which MLP channels are removed
    # every layer pruned to the same sizes and saved in the family's stock architecture (no remote code):
    # the ranking is per layer, the layer range every layer, the depth profile flat (adapruner.pruning.stock)
    uniform: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Recipe:
        """A stored recipe; fields this version does not know are a one-line error naming ``where``."""
        return cls(**known_fields(data, where, "recipe", cls))

    @property
    def refit_mode(self) -> str:
        """none, bias or lsq: what the plan's kept weights get (``obs`` selection always refits by lsq)."""
        return "lsq" if self.local_selection else self.refit

    @property
    def fresh_seed(self) -> int:
        """The seed of the fresh windows (activation statistics, refit): ``activation_seed``, else ``seed``."""
        return self.seed if self.activation_seed is None else self.activation_seed

    @property
    def local_selection(self) -> bool:
        """Structured OBS chooses the units inside the layer-by-layer engine (no static scores)."""
        return self.metric == OBS

    @property
    def uses_local_engine(self) -> bool:
        return self.refit_mode == "lsq"

    def local_settings(self, device: str | None = None) -> LocalSettings:
        """The layer-by-layer engine's settings; ``device``: the runtime's ``refit_device``."""
        return LocalSettings(
            selection="obs" if self.local_selection else "plan",
            refit="lsq",
            damping=self.refit_damping,
            bias=self.refit_bias,
            rounds=self.obs_rounds,
            device=device,
        )

    def build_metric(self) -> Importance:
        if self.local_selection:
            raise AdaPrunerError("the obs metric has no static scores: it selects inside the local engine")
        mlp = get_metric(self.metric, seed=self.seed, mix=self.mix)
        if self.attention_metric in (None, self.metric):
            return mlp
        return PerKind(get_metric(self.attention_metric, seed=self.seed, mix=self.mix), mlp)

    def statistic_needs(self) -> frozenset[str]:
        """What the statistics pass must collect: the metric's needs, plus activations to compensate."""
        if self.local_selection:
            return frozenset()
        return self.build_metric().needs | ({"activations"} if self.refit_mode == "bias" else frozenset())

    def fresh_activations(self) -> bool:
        """Activation statistics come from their own fresh windows rather than the calibration samples.

        ``adapruner prune`` and every search trial decide it here, so a trial and its ``--from-run``
        prune read the same activations.
        """
        return self.activation_calibration is not None and "activations" in self.statistic_needs()

    def budget(self, layer_range: tuple[int, int] | None = None) -> Budget:
        return Budget(
            self.ratio,
            layer_range,
            self.attention_scale,
            self.align,
            self.head_mode,
            self.depth_slope,
            self.depth_bend,
        )

    def validate(self) -> None:
        self.budget()
        self._validate_refit()
        if not self.local_selection:
            self.build_metric()
        if self.method is not None:
            get_method(self.method)
        if self.ranking not in RANKINGS:
            raise AdaPrunerError(f"unknown ranking '{self.ranking}': choose one of {', '.join(RANKINGS)}")
        if self.aggregation not in AGGREGATIONS:
            raise AdaPrunerError(f"unknown aggregation '{self.aggregation}': choose one of {', '.join(AGGREGATIONS)}")
        if self.head_mode not in HEAD_MODES:
            raise AdaPrunerError(f"unknown head mode '{self.head_mode}': choose one of {', '.join(HEAD_MODES)}")
        if self.num_samples < 1 or self.seq_len < 2:
            raise AdaPrunerError("--num-samples must be >= 1 and --seq-len >= 2")
        if self.activation_calibration is not None:
            parse_windows(self.activation_calibration)

    def _validate_refit(self) -> None:
        if self.refit not in REFIT_MODES:
            raise AdaPrunerError(f"unknown --refit '{self.refit}': choose one of {', '.join(REFIT_MODES)}")
        if self.uses_local_engine:
            if self.refit_calibration is not None:
                parse_windows(self.refit_calibration)
            self.local_settings()
        if not self.local_selection:
            return
        if self.refit == "bias":
            raise AdaPrunerError("--metric obs refits by least squares: drop --refit bias")
        if self.ranking != "layer" or self.attention_metric not in (None, OBS):
            raise AdaPrunerError(
                "--metric obs chooses units inside each layer at the budget's per-layer rates: use --ranking layer "
                "and no --attention-metric"
            )


@dataclass(frozen=True)
class Runtime:
    """How a recipe runs: precision, memory and devices. It never changes which units go (beyond the
    rounding of ``dtype``), so ``--from-run`` takes the prune's runtime, not the search's."""

    dtype: str = "float32"
    offload: bool = False
    batch_size: int | None = None  # samples per statistics step; None: all at once, as LLM-Pruner does
    gradient_checkpointing: bool = True  # same statistics, ~0.5x peak memory, a little slower
    refit_device: str | None = None  # run the layer-by-layer engine there, one layer at a time (e.g. cuda)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Allocation:
    """What a search's per-layer trial fixes: every layer's kept (layer, attention units, MLP channels),
    pruned by assembling the supernet's candidates (OBS order + least-squares refit on the dense model's
    inputs over the recipe's refit windows; adapruner.local.supernet) whose deepest candidate removes
    ``max_removal`` of a layer's units (it decides OBS's removal order)."""

    keep_counts: tuple[tuple[int, int, int], ...]
    max_removal: float = 0.9

    def __post_init__(self) -> None:
        counts = tuple(tuple(int(v) for v in row) for row in self.keep_counts)
        if not counts or any(len(row) != 3 for row in counts):
            raise AdaPrunerError("an allocation needs [layer, attention units, MLP channels] for every layer")
        object.__setattr__(self, "keep_counts", counts)

    @property
    def per_layer(self) -> dict[int, tuple[int, int]]:
        return {layer: (attn, mlp) for layer, attn, mlp in self.keep_counts}

    @property
    def uniform(self) -> bool:
        """Every layer keeps the same counts (a ``--uniform`` prune can express it)."""
        return len(set(self.per_layer.values())) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"keep_counts": [list(row) for row in self.keep_counts], "max_removal": self.max_removal}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str) -> Allocation | None:
        if data is None:
            return None
        stored = known_fields(data, where, "allocation", cls)
        try:
            return cls(**stored)
        except AdaPrunerError as exc:
            raise AdaPrunerError(f"{where} is corrupted ({exc}): run the search again") from None


@dataclass(frozen=True)
class PruneConfig:
    """A prune's three values, resolved once from its options; recorded in ``adapruner.json``."""

    recipe: Recipe
    runtime: Runtime = field(default_factory=Runtime)
    allocation: Allocation | None = None

    @classmethod
    def from_method(cls, model: str, ratio: float, method: str | None = None, **options: Any) -> PruneConfig:
        """The preset of ``method`` (see :mod:`adapruner.methods`), overridden by ``options``: the flat fields
        of the three values (older spellings included, see :func:`one_spelling`)."""
        return cls.from_flat({"model": model, "ratio": ratio} | with_method({"method": method} | one_spelling(options)))

    @classmethod
    def from_flat(cls, options: dict[str, Any]) -> PruneConfig:
        """Sort flat options (a CLI's flags, an API call's keywords, a pre-split record) into the three
        values; a name none of them has is a one-line error."""
        runtime = {k: options[k] for k in field_names(Runtime) if k in options}
        counts, max_removal = options.get("keep_counts"), options.get("max_removal")
        unknown = sorted(set(options) - field_names(Recipe) - field_names(Runtime) - field_names(Allocation))
        if unknown:
            raise AdaPrunerError(f"unknown pruning option(s) {', '.join(unknown)}: see `adapruner prune --help`")
        allocation = None
        if counts is not None:
            allocation = Allocation(counts) if max_removal is None else Allocation(counts, max_removal)
        recipe = {k: options[k] for k in field_names(Recipe) if k in options}
        return cls(Recipe(**recipe), Runtime(**runtime), allocation)

    def to_dict(self) -> dict[str, Any]:
        allocation = None if self.allocation is None else self.allocation.to_dict()
        return {"recipe": self.recipe.to_dict(), "runtime": self.runtime.to_dict(), "allocation": allocation}

    @property
    def output_bias(self) -> str | None:
        """What gives o_proj/down_proj a bias in the output (None: nothing): ``--uniform`` must express it."""
        recipe = self.recipe
        if self.allocation is not None:
            return "the supernet's least-squares refit"
        if recipe.refit_mode == "bias":
            return "bias compensation (--refit bias)"
        if recipe.refit_mode == "lsq" and recipe.refit_bias:
            return "the least-squares refit (its bias)"
        return None

    def as_uniform(self, given: dict[str, Any]) -> PruneConfig:
        """This recipe with every layer pruned alike (``--uniform``): a preset's cross-layer ranking becomes
        ``layer`` (FLAP: its uniform UL-UM variant) and its layer range every layer. Options typed in
        ``given`` that contradict it are one-line errors."""
        if given.get("ranking") not in (None, "layer") or given.get("global_ranking"):
            raise AdaPrunerError("--uniform prunes every layer alike: drop --ranking")
        if given.get("depth_slope") or given.get("depth_bend"):
            raise AdaPrunerError("--uniform prunes every layer alike: drop --depth-slope/--depth-bend")
        if self.allocation is not None and not self.allocation.uniform:
            raise AdaPrunerError(
                "--uniform: this search's best trial keeps different counts per layer; search with --uniform"
            )
        layers = given.get("layers") or ("0:" if self.allocation is None else None)
        recipe = replace(self.recipe, ranking="layer", layers=layers, depth_slope=0.0, depth_bend=0.0)
        return replace(self, recipe=recipe)

    def validate(self) -> None:
        self.recipe.validate()
        if self.recipe.uses_local_engine:
            self.recipe.local_settings(self.runtime.refit_device)


def field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def known_fields(data: dict[str, Any], where: str, what: str, *classes: type) -> dict[str, Any]:
    """``data``, a stored ``what`` read from ``where``, once it is a mapping of fields of ``classes``: a
    field this version does not know means a newer AdaPruner wrote it (one line)."""
    if not isinstance(data, dict):
        raise AdaPrunerError(f"{where} is corrupted (its {what} is not a mapping): run the search again")
    unknown = sorted(set(data).difference(*(field_names(cls) for cls in classes)))
    if unknown:
        raise AdaPrunerError(
            f"{where} was written by a newer AdaPruner (unknown {what} fields {', '.join(unknown)}): upgrade adapruner"
        )
    return data


OBS = "obs"  # structured OBS selection: a metric name that the local engine, not a score, implements
REFIT_MODES = ("none", "bias", "lsq")


REFIT_TOKENS = 128 * 128  # the default refit windows: 128 of 128 tokens, or as many tokens in shorter ones
REFIT_LENGTHS = (128, 64, 32)  # their lengths, longest first


LEGACY_SPELLINGS = ("global_ranking", "compensate")  # older options, each now a value of one field


def one_spelling(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the older spellings made values of the one field each concept has:
    ``global_ranking=True`` is ``ranking="global"``; ``compensate=True`` is ``refit="bias"`` (a least-squares
    refit, which supersedes compensation, stays). A contradiction is a one-line error."""
    options = dict(options)
    if options.pop("global_ranking", False):
        if options.get("ranking") not in (None, "layer", "global"):
            raise AdaPrunerError(f"--global-ranking contradicts ranking '{options['ranking']}': give only --ranking")
        options["ranking"] = "global"
    if options.pop("compensate", False) and options.get("refit") in (None, "none"):
        options["refit"] = "bias"
    return options


def parse_windows(text: str) -> tuple[int, int]:
    """``"128x128"`` -> (128 windows, 128 tokens each); a one-line error otherwise."""
    count, sep, length = str(text).lower().partition("x")
    if not (sep and count.strip().isdigit() and length.strip().isdigit()) or int(count) < 1 or int(length) < 2:
        raise AdaPrunerError(f"activation calibration '{text}' must look like 128x128 (windows x tokens)")
    return int(count), int(length)


FRESH_SEED = 0  # the search draws fresh activation windows with this seed: one pass per source, shared by mixes
