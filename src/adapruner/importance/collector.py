"""One pass over calibration samples that gathers every statistic a metric may read.

Memory: only the prunable projections of the pruned layers take gradients, and each gradient is folded
into fp32 accumulators by a post-accumulate hook the moment it arrives, then freed. So the model never
holds a full set of ``.grad`` tensors, and bf16/fp16 weights get fp32 statistics. Accumulators can live
on the CPU (``offload=True``) for large models.

What is gathered, per module (``needs``):

* ``grad``: mean over samples of dL_i/dW (the gradient of the mean loss), per element;
* ``fisher``: mean over samples of (dL_i/dW)^2, per element (needs one backward per sample);
* ``activations``: per input feature, the sum and the sum of squares of the module's input over all
  tokens, and the token count (Wanda-sp, FLAP);
* ``unit_sums`` (per sample, for the statistics cache): row sums (q/k/v/gate/up) or column sums (o/down)
  of W*g_i and of W^2*g_i^2, so vector-wise and second-order scores of any subset are sums of cached
  numbers.

Every backward step also records its loss and the norm of its gradient over the listed modules
(``Statistics.sample``: per-sample dense loss and gradient norm in a per-sample pass).

Per-sample passes (``fisher``, ``unit_sums``) run ``sample_batch`` samples per forward/backward when
gradient checkpointing is off: the loss is the *sum* of the per-sample mean losses, so the gradient
reaching a module's output for sample ``s`` is that of sample ``s``'s own loss, and the per-sample
weight gradient is ``G_s = dY_s^T X_s`` (one batched matmul from the module's input and output
gradient, caught by hooks). No weight ``.grad`` is ever formed. Same numbers as one sample per pass
(tested), several times faster on small models, at the cost of holding ``sample_batch`` samples'
activations; with checkpointing on, samples go one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .base import Statistics

NEEDS = frozenset({"grad", "fisher", "activations", "unit_sums"})
TABLES = ("act_sum", "act_sq", "unit_wg", "unit_wwgg", "unit_abs_wg", "sample")


def _reduce_dim(module_name: str) -> int:
    """Which axis a unit owns: columns for the output projections, rows for the others."""
    return 0 if module_name.endswith(("o_proj", "down_proj")) else 1


class _Collector:
    """Hooks that fold gradients and inputs into statistics as they arrive."""

    def __init__(
        self, model: torch.nn.Module, modules: list[str], needs: frozenset[str], offload: bool, num_steps: int
    ) -> None:
        self.model, self.modules, self.needs = model, modules, needs
        self.store = torch.device("cpu") if offload else None
        self.grads: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.sample_weight = 1.0
        self.step_grad_sq = 0.0
        self.lean = False
        # statistic -> module -> [num_steps, ...]; preallocated at first use, so that the many small
        # per-step results never interleave with the big temporaries (heap fragmentation grew RSS by
        # ~0.5 GB per sample on SmolLM2 when each step allocated its own small tensors)
        self.num_steps, self.step_index = num_steps, 0
        self.tables: dict[str, dict[str, torch.Tensor]] = {}

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.store) if self.store is not None else t

    def _accumulate(self, table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        value = self._place(value)
        if name in table:
            table[name].add_(value)
        else:
            table[name] = value.clone()

    def _record(self, stat: str, name: str, value: torch.Tensor) -> None:
        table = self.tables.setdefault(stat, {})
        if name not in table:
            device = self.store if self.store is not None else value.device
            table[name] = torch.zeros((self.num_steps, *value.shape), dtype=torch.float32, device=device)
        table[name][self.step_index].copy_(value)

    def record_rows(self, stat: str, name: str, values: torch.Tensor) -> None:
        """Rows ``step_index .. step_index + len(values)`` of a per-step table (one row per sample)."""
        table = self.tables.setdefault(stat, {})
        if name not in table:
            device = self.store if self.store is not None else values.device
            table[name] = torch.zeros((self.num_steps, *values.shape[1:]), dtype=torch.float32, device=device)
        table[name][self.step_index : self.step_index + values.shape[0]].copy_(values)

    def on_grad(self, name: str, param: torch.Tensor) -> None:
        g = param.grad.detach().float()
        param.grad = None
        self.step_grad_sq += float(g.pow(2).sum())
        if self.lean or "unit_sums" in self.needs:  # reduce now to per-row/column sums
            wg = param.detach().float() * g
            dim = _reduce_dim(name)
            self._record("unit_wg", name, wg.sum(dim))
            if self.lean:  # one step holds the whole subset: no per-element gradient is kept
                self._record("unit_abs_wg", name, wg.abs().sum(dim))
            if "unit_sums" in self.needs:
                self._record("unit_wwgg", name, wg.pow(2).sum(dim))
        if "grad" in self.needs and not self.lean:
            self._accumulate(self.grads, name, g * self.sample_weight)
        if "fisher" in self.needs:
            self._accumulate(self.fisher, name, g.pow(2) * self.sample_weight)

    def on_input(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self._record("act_sum", name, x.sum(0))
        self._record("act_sq", name, x.pow(2).sum(0))

    def end_step(self, tokens: int, loss: float | None) -> None:
        if loss is not None:
            self._record("sample", "loss", torch.tensor(loss))
            self._record("sample", "grad_norm", torch.tensor(self.step_grad_sq**0.5))
        self._record("tokens", "", torch.tensor(float(tokens)))
        self.step_grad_sq = 0.0
        self.step_index += 1

    def statistics(self, num_samples: int, per_sample: bool) -> Statistics:
        tables = {stat: self.tables.get(stat, {}) for stat in TABLES}
        return Statistics(
            grads=self.grads,
            fisher=self.fisher,
            tokens=self.tables["tokens"][""].cpu(),
            num_samples=num_samples,
            per_sample=per_sample,
            **tables,
        )

    @contextmanager
    def hooks(self) -> Iterator[bool]:
        handles, previous = [], {p: p.requires_grad for p in self.model.parameters()}
        backward = bool(self.needs & {"grad", "fisher", "unit_sums"})
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in self.modules:
            module = self.model.get_submodule(name)
            if backward:
                module.weight.requires_grad_(True)
                handles.append(module.weight.register_post_accumulate_grad_hook(lambda p, n=name: self.on_grad(n, p)))
            if "activations" in self.needs:
                handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: self.on_input(n, args[0])))
        try:
            yield backward
        finally:
            for h in handles:
                h.remove()
            for p, flag in previous.items():
                p.requires_grad_(flag)
                p.grad = None


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean next-token loss (as ``model(labels=...)`` computes it) without ever holding the full logits.

    The vocabulary projection runs on ``chunk`` tokens at a time under checkpointing, so the
    [tokens, vocab] logits and their gradient never exist at once: on small-hidden models with large
    vocabularies (SmolLM2: 576 vs 49,152) they are the biggest tensors of the pass.
    """
    head, hidden, targets = _head_inputs(model, input_ids)
    total = sum(
        checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    )
    return total / targets.numel()


def _head_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The output head, the [batch * (L - 1), hidden] states it predicts from and their next tokens."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return model.get_output_embeddings(), hidden, input_ids[:, 1:].reshape(-1).to(hidden.device)


@contextmanager
def _checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """HF gradient checkpointing only acts in train mode; dropout is off in the models we prune."""
    if not enabled:
        yield
        return
    was_training = model.training
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    try:
        yield
    finally:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        model.train(was_training)


class _BatchedPerSample:
    """Per-sample statistics of a batch from module inputs and output gradients (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, modules: list[str], collector: _Collector, n: int) -> None:
        self.model, self.modules, self.collector, self.n = model, modules, collector, n
        self.grad_sq: torch.Tensor | None = None  # [batch] squared per-sample gradient norm, summed over modules

    def on_forward(self, name: str, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        c = self.collector
        x = x.detach()
        if "activations" in c.needs:
            xf = x.float()
            c.record_rows("act_sum", name, xf.sum(1))
            c.record_rows("act_sq", name, xf.pow(2).sum(1))
        if y.requires_grad:
            y.register_hook(lambda go, n=name, m=module, inp=x: self.on_output_grad(n, m, inp, go))

    def on_output_grad(self, name: str, module: torch.nn.Module, x: torch.Tensor, go: torch.Tensor) -> None:
        c = self.collector
        grads = torch.bmm(go.float().transpose(1, 2), x.float())  # [batch, out, in]: dL_s/dW per sample
        grads_sq = grads.pow(2)
        sq = grads_sq.sum((1, 2))
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq
        if "unit_sums" in c.needs:
            wg = grads * module.weight.detach().float()
            dim = _reduce_dim(name) + 1
            c.record_rows("unit_wg", name, wg.sum(dim))
            c.record_rows("unit_wwgg", name, wg.pow(2).sum(dim))
        if "grad" in c.needs:
            c._accumulate(c.grads, name, grads.sum(0) / self.n)
        if "fisher" in c.needs:
            c._accumulate(c.fisher, name, grads_sq.sum(0) / self.n)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """No parameter takes a gradient; the embeddings' output does, so every activation gradient flows."""
        previous = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        handles = [self.model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())]
        for name in self.modules:
            module = self.model.get_submodule(name)
            handles.append(
                module.register_forward_hook(lambda m, args, out, n=name: self.on_forward(n, m, args[0], out))
            )
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in previous.items():
                p.requires_grad_(flag)

    def step(self, batch: torch.Tensor) -> None:
        self.grad_sq = None
        losses = per_sample_lm_loss(self.model, batch)
        losses.sum().backward()
        c = self.collector
        c.record_rows("sample", "loss", losses.detach().float())
        grad_sq = self.grad_sq if self.grad_sq is not None else torch.zeros(batch.shape[0])
        c.record_rows("sample", "grad_norm", grad_sq.sqrt())
        c.record_rows("tokens", "", torch.full((batch.shape[0],), float(batch.shape[1])))
        c.step_index += batch.shape[0]


def _chunk_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(head(hidden).float(), targets, reduction="none")


def per_sample_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[batch] mean next-token loss of each sample; the vocabulary projection chunked as in :func:`lm_loss`."""
    head, hidden, targets = _head_inputs(model, input_ids)
    losses = torch.cat(
        [
            checkpoint(_chunk_losses, head, h, t, use_reentrant=False)
            for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
        ]
    )
    return losses.view(input_ids.shape[0], -1).mean(1)


def collect_statistics(
    model: torch.nn.Module,
    samples: torch.Tensor,
    modules: list[str],
    needs: Iterable[str] = ("grad",),
    batch_size: int = 10,
    offload: bool = False,
    checkpointing: bool = False,
    sample_batch: int = 8,
) -> Statistics:
    """Gather ``needs`` over ``samples`` [N, L] for the listed linear modules (see the module docstring).

    When only the mean gradient is needed and one batch holds all samples, no per-element gradient is
    kept at all: each arriving gradient is reduced at once to the row/column sums of W*g and |W*g|,
    which is all element1 and vector read. ``checkpointing`` recomputes activations in the backward
    pass (transformers' gradient checkpointing) to trade time for memory. Per-sample statistics are
    gathered ``sample_batch`` samples at a time (1: one pass per sample; always so with checkpointing).
    """
    needs = frozenset(needs)
    unknown = needs - NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    per_sample = bool(needs & {"fisher", "unit_sums"})
    if per_sample and sample_batch > 1 and not checkpointing:
        return _batched_per_sample_statistics(model, samples, modules, needs, offload, sample_batch)
    batches = samples.split(1 if per_sample else batch_size)
    collector = _Collector(model, modules, needs, offload, len(batches))
    collector.lean = needs & {"grad", "fisher", "unit_sums"} == {"grad"} and samples.shape[0] <= batch_size
    device = next(model.parameters()).device
    n = samples.shape[0]
    with collector.hooks() as backward, _checkpointing(model, checkpointing and backward):
        for batch in tqdm(batches, desc="statistics", disable=len(batches) < 4, leave=False):
            batch = batch.to(device)
            collector.sample_weight = batch.shape[0] / n
            loss = None
            if backward:
                batch_loss = lm_loss(model, batch)
                batch_loss.backward()
                loss = float(batch_loss.detach())
            else:
                with torch.no_grad():
                    model(input_ids=batch)
            collector.end_step(batch.numel(), loss)
    return collector.statistics(n, per_sample)


def _batched_per_sample_statistics(
    model: torch.nn.Module,
    samples: torch.Tensor,
    modules: list[str],
    needs: frozenset[str],
    offload: bool,
    sample_batch: int,
) -> Statistics:
    n = samples.shape[0]
    collector = _Collector(model, modules, needs, offload, n)
    batched = _BatchedPerSample(model, modules, collector, n)
    device = next(model.parameters()).device
    batches = samples.split(sample_batch)
    with batched.hooks():
        for batch in tqdm(batches, desc="statistics", disable=len(batches) < 4, leave=False):
            batched.step(batch.to(device))
    return collector.statistics(n, per_sample=True)
