"""Local pruning: least squares and structured OBS are what they claim, and refitted models are exact."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from adapruner import AdaPrunerError, load_pruned
from adapruner.local import InputMoments, LocalSettings, applied, local_prune, obs_select, refit_columns
from adapruner.local.engine import capture_inputs, input_moments
from adapruner.local.solve import reconstruction_error
from adapruner.models import get_adapter
from adapruner.pruning import masked, prune_physically
from adapruner.pruning.io import save_pruned
from conftest import TINY, make_tiny
from test_pruning_exact import random_plan

WINDOWS = torch.randint(0, 97, (48, 16), generator=torch.Generator().manual_seed(3))  # 768 tokens
TEXT = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))


def _moments(x: torch.Tensor) -> InputMoments:
    moments = InputMoments(x.shape[1])
    moments.add(x)
    return moments


@pytest.mark.parametrize("with_bias", [True, False])
def test_lsq_solves_the_least_squares_problem(with_bias):
    """The refit equals torch.linalg.lstsq of the kept columns (plus a ones column) against W x + b."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=gen, dtype=torch.float64) + torch.linspace(-1, 2, 10, dtype=torch.float64)
    w, b = torch.randn(6, 10, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 6, 9])
    refit = refit_columns(w, b, _moments(x), kept, damping=0.0, with_bias=with_bias)
    if with_bias:  # a ones column: the bias is fitted with the weights
        solution = torch.linalg.lstsq(torch.cat([x[:, kept], torch.ones(400, 1, dtype=torch.float64)], 1), x @ w.T + b)
    else:  # the old bias is kept as it is: only W x is fitted
        solution = torch.linalg.lstsq(x[:, kept], x @ w.T)
    solution = solution.solution
    torch.testing.assert_close(refit.weight[:, kept], solution[: kept.numel()].T, atol=1e-8, rtol=1e-7)
    expected_bias = solution[-1] if with_bias else b
    torch.testing.assert_close(refit.bias, expected_bias, atol=1e-8, rtol=1e-7)
    removed = [i for i in range(10) if i not in kept.tolist()]
    assert torch.all(refit.weight[:, removed] == 0)


def test_lsq_on_a_real_projection_input_beats_dropping_the_columns():
    """On o_proj's own inputs of a tiny model: the residual is lstsq's, and far below plain removal."""
    model = make_tiny("qwen2-gqa")
    adapter = get_adapter(model)
    inputs = capture_inputs(adapter, WINDOWS, 16)
    o_proj = adapter.layer(0).o_proj
    captured: list[torch.Tensor] = []
    handle = o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, 48)))
    moments = input_moments(adapter.decoder_layers()[0], o_proj, inputs, torch.device("cpu"))
    handle.remove()
    x = torch.cat(captured).double()
    assert moments.tokens == x.shape[0] == 768
    kept = torch.arange(0, 32)  # heads 0..3 of 6
    refit = refit_columns(o_proj.weight, o_proj.bias, moments, kept, damping=0.0, with_bias=True)
    target = x @ o_proj.weight.double().T
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    solution = torch.linalg.lstsq(torch.cat([x[:, kept], ones], 1), target).solution
    ours = ((x[:, kept] @ refit.weight[:, kept].double().T + refit.bias.double()) - target).pow(2).mean()
    best = ((torch.cat([x[:, kept], ones], 1) @ solution) - target).pow(2).mean()
    dropped = ((x[:, kept] @ o_proj.weight[:, kept].double().T) - target).pow(2).mean()
    assert float(ours) == pytest.approx(float(best), rel=1e-4)
    assert float(ours) < 0.5 * float(dropped)


def test_obs_cost_is_the_exact_refit_error_and_the_curve_is_monotone():
    """ε of the unit OBS removes first equals the error of removing it and refitting the rest exactly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen).double()
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    gram = x.T @ x / x.shape[0]
    errors = []
    for unit in range(4):  # units of 3 columns
        kept = torch.tensor([c for c in range(12) if c // 3 != unit])
        refit = refit_columns(w, None, _moments(x), kept, damping=0.0, with_bias=False)
        errors.append(reconstruction_error(w, refit.weight, gram))
        assert refit.error == pytest.approx(errors[-1] / reconstruction_error(w, torch.zeros_like(w), gram), rel=1e-6)
    selection = obs_select(w, gram, unit_width=3, keep=3, damping=0.0)
    first_removed = next(u for u in range(4) if u not in selection.kept_units)
    assert first_removed == min(range(4), key=errors.__getitem__)
    assert selection.curve[1][1] == pytest.approx(min(errors), rel=1e-6)
    steps = [e for _, e in selection.curve]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(steps))
    blocked = obs_select(w, gram, unit_width=1, keep=6, blocks=2, damping=0.0)
    assert sum(u < 6 for u in blocked.kept_units) == 3 and len(blocked.kept_units) == 6  # 3 per block
    moments = _moments(x)  # handed over (the supernet's way: its Gram matrix freed once factored)
    centred = moments.finalise(centred=True).clone()
    taken = obs_select(w, moments, unit_width=3, keep=2, damping=1e-3)
    assert taken.removed == obs_select(w, centred, unit_width=3, keep=2, damping=1e-3).removed
    assert moments.gram.numel() == 0  # the moments let go of it


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("selection", ["plan", "obs"])
def test_refitted_trial_equals_the_physically_pruned_model(name, selection):
    """Refits written in place for a trial (then restored) give the physically pruned model's logits."""
    model = make_tiny(name)
    plan, keep = random_plan(model, 0.3, "auto")
    settings = LocalSettings(selection=selection, damping=0.01)
    given = {"plan": plan} if selection == "plan" else {"keep": keep}
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_logits = model(TEXT).logits
    result = local_prune(model, WINDOWS, settings, restore=True, **given)
    assert model.state_dict().keys() == dense_state.keys()
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items()), "restore must be exact"
    with masked(get_adapter(model), result.plan), applied(model, result.refits):
        trial_logits = model(TEXT).logits
    with masked(get_adapter(model), result.plan):
        unrefitted = model(TEXT).logits
    assert torch.equal(model(TEXT).logits, dense_logits)
    pruned = copy.deepcopy(model)
    pruned_result = local_prune(pruned, WINDOWS, settings, **given)
    assert pruned_result.plan.to_dict() == result.plan.to_dict()
    prune_physically(get_adapter(pruned), pruned_result.plan)
    torch.testing.assert_close(pruned(TEXT).logits, trial_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trial_logits, unrefitted, atol=1e-3), "the refit must change the model"
    assert set(result.refits) == {n for n in result.refits if n.endswith(("o_proj", "down_proj"))}
    assert all(0 <= e < 1 for e in result.errors.values())


def test_refitted_model_saves_and_reloads_with_plain_transformers(tmp_path):
    model = make_tiny("llama-gqa")
    plan, _ = random_plan(model, 0.3, "auto")
    local_prune(model, WINDOWS, LocalSettings(), plan=plan)
    prune_physically(get_adapter(model), plan)
    expected = model(TEXT).logits
    save_pruned(model, None, {"format": 1}, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(entry["o_proj_bias"] and entry["down_proj_bias"] for entry in config["pruned_layers"])
    assert torch.equal(load_pruned(tmp_path / "out")(TEXT).logits, expected)
    code = (
        "import sys, torch; sys.modules['adapruner'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        f"torch.save(m(torch.tensor({TEXT.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_refit_lowers_the_error_of_every_module_against_plain_removal():
    model = make_tiny("llama-gqa")
    plan, _ = random_plan(model, 0.3, "auto")
    refitted = local_prune(model, WINDOWS, LocalSettings(), plan=plan, restore=True)
    dropped = local_prune(model, WINDOWS, LocalSettings(refit="bias"), plan=plan, restore=True)
    assert refitted.errors.keys() == dropped.errors.keys()
    assert all(refitted.errors[k] < dropped.errors[k] for k in refitted.errors)


def test_too_few_tokens_is_a_one_line_error_and_leaves_the_model_dense():
    model = make_tiny("llama-gqa")
    plan, _ = random_plan(model, 0.3, "auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdaPrunerError, match=r"saw 20 calibration tokens for 48 input features.*--refit-calibration"):
        local_prune(model, WINDOWS[:2, :10], LocalSettings(), plan=plan)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_overflowed_statistics_are_refused():
    moments = _moments(torch.full((60, 4), float("inf")))
    with pytest.raises(AdaPrunerError, match=r"overflowed.*float16"):
        moments.check("model.layers.0.mlp.down_proj")


def test_singular_statistics_raise_the_damping_instead_of_writing_nan():
    """Duplicated input features make the Gram matrix singular: the damping grows and is reported."""
    x = torch.randn(200, 3, dtype=torch.float64)
    x = torch.cat([x, x], 1)  # rank 3 of 6
    w = torch.randn(4, 6, dtype=torch.float64)
    refit = refit_columns(w, None, _moments(x), torch.arange(6), damping=0.0, with_bias=False)
    assert refit.damping > 0 and torch.isfinite(refit.weight).all()
    target, fitted = x @ w.T, x @ refit.weight.T
    assert float((fitted - target).pow(2).mean()) < 1e-6 * float(target.pow(2).mean())  # still the exact fit


def test_inputs_and_their_keyword_arguments_move_to_the_engine_device():
    """The path of a model kept on one device and refitted on another, as far as one CPU can take it:
    nested keyword arguments (rotary cos/sin tuples) are moved, and an explicit device gives the same refit."""
    from adapruner.local.engine import to_device

    moved = to_device({"position_embeddings": (torch.ones(2), torch.zeros(2)), "cache": None}, torch.device("cpu"))
    assert isinstance(moved["position_embeddings"], tuple) and moved["cache"] is None
    model = make_tiny("qwen2-gqa")
    plan, _ = random_plan(model, 0.3, "auto")
    here = local_prune(model, WINDOWS, LocalSettings(), plan=plan, restore=True)
    explicit = local_prune(model, WINDOWS, LocalSettings(device="cpu"), plan=plan, restore=True)
    assert all(torch.equal(here.refits[k].weight, explicit.refits[k].weight) for k in here.refits)
    if not torch.cuda.is_available():
        with pytest.raises(AdaPrunerError, match="no CUDA device is available"):
            LocalSettings(device="cuda")


def test_local_settings_are_checked():
    with pytest.raises(AdaPrunerError, match="unknown --refit"):
        LocalSettings(refit="magic")
    with pytest.raises(AdaPrunerError, match="damping"):
        LocalSettings(damping=-1)
    with pytest.raises(AdaPrunerError, match="not a torch device"):
        LocalSettings(device="quantum")
