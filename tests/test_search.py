"""The TPE search on a tiny model: baseline first, best never worse, resumable, refuses other settings."""

from __future__ import annotations

import csv
import json

import pytest

from adapruner import AdaPrunerError
from adapruner.search import SearchSpace, search


def run_search(root, trials: int, ratio: float = 0.15, **kwargs):
    corpus = str(root / "corpus.txt")
    space = SearchSpace(
        sources=[corpus],
        num_samples=[4, 10],
        metrics=["element1", "vector", "wanda_sp", "l2"],
        space=kwargs.pop("space", "joint"),
    )
    return search(
        str(root / "tiny"),
        ratio,
        trials=trials,
        output=root / "run",
        space=space,
        layers="1:3",
        pool_per_source=10,
        objective_data=corpus,
        objective_tokens=512,
        objective_seq_len=16,
        **kwargs,
    )


def test_search_starts_from_the_baseline_and_resumes(tiny_model_dir):
    root = tiny_model_dir
    result = run_search(root, trials=4)
    rows = list(csv.DictReader((root / "run" / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["metric"] == "element1" and rows[0]["aggregation"] == "sum"
    best = json.loads((root / "run" / "best.json").read_text())
    assert best["best"]["value"] <= best["baseline"]["value"] == float(rows[0]["value"])
    assert result["best"]["config"]["metric"] in {"element1", "vector", "wanda_sp", "l2"}
    for name in ("history.png", "history.html", "kept.png", "report.md"):
        assert (root / "run" / name).stat().st_size > 0
    assert f"{best['baseline']['value']:.2f}" in (root / "run" / "report.md").read_text()
    # rerunning the same command continues the study: 2 more trials, none repeated or lost
    run_search(root, trials=6)
    rows = list(csv.DictReader((root / "run" / "trials.csv").open()))
    assert [r["number"] for r in rows] == [str(i) for i in range(6)]
    assert all(r["state"] in {"COMPLETE", "PRUNED"} for r in rows)


def test_resumed_random_search_draws_new_configurations(tiny_model_dir):
    """A seeded sampler made again would replay its first draws: the continued run must not."""
    import optuna

    root = tiny_model_dir
    run_search(root, trials=4, sampler="random", pruner="none")
    run_search(root, trials=8, sampler="random", pruner="none")
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    assert len(study.trials) == 8
    assert not [t.number for t in study.trials if "duplicate_of" in t.user_attrs]
    first, later = study.trials[:4], study.trials[4:]
    assert all(t.params != u.params for t in later for u in first)


def test_study_of_another_ratio_is_refused(tiny_model_dir):
    root = tiny_model_dir
    run_search(root, trials=1)
    with pytest.raises(AdaPrunerError, match="made for another setting"):
        run_search(root, trials=2, ratio=0.1)
    corpus = str(root / "corpus.txt")
    changed = SearchSpace(sources=[corpus], num_samples=[4, 10], metrics=["element1", "vector"], mlp_levels=16)
    kwargs = {"layers": "1:3", "pool_per_source": 10, "objective_data": corpus, "objective_tokens": 512}
    with pytest.raises(AdaPrunerError, match=r"another setting \(search_space: \w+ != \w+, search space: ") as err:
        search(str(root / "tiny"), 0.15, trials=2, output=root / "run", space=changed, objective_seq_len=16, **kwargs)
    assert "mlp_levels 32 -> 16" in str(err.value)  # the refusal names the changed fields
    assert "profile_trials" not in str(err.value)  # and only those


def test_study_made_before_the_space_was_recorded_gets_the_likely_fix(tiny_model_dir):
    """Studies of versions before 2026-12-03 hold only the space's hash: the refusal names coarse_to_fine."""
    import optuna

    from adapruner.search.storage import SPACE_FIELDS_ATTR

    root = tiny_model_dir
    run_search(root, trials=1)
    storage = f"sqlite:///{root / 'run' / 'study.db'}"
    study = optuna.load_study(study_name="adapruner", storage=storage)
    study._storage.set_study_user_attr(study._study_id, SPACE_FIELDS_ATTR, "")  # as an older version left it
    corpus = str(root / "corpus.txt")
    changed = SearchSpace(sources=[corpus], num_samples=[4, 10], metrics=["element1", "vector"], mlp_levels=16)
    kwargs = {"layers": "1:3", "pool_per_source": 10, "objective_data": corpus, "objective_tokens": 512}
    with pytest.raises(AdaPrunerError, match="coarse_to_fine: 1"):
        search(str(root / "tiny"), 0.15, trials=2, output=root / "run", space=changed, objective_seq_len=16, **kwargs)


def test_random_sampler_and_data_only_space(tiny_model_dir):
    root = tiny_model_dir
    result = run_search(root, trials=3, sampler="random", space="data")
    assert result["best"]["config"]["metric"] == "element1"  # metric subspace fixed at LLM-Pruner's choice
    with pytest.raises(AdaPrunerError, match="unknown --sampler"):
        run_search(root, trials=3, sampler="grid")


def test_prune_from_run_reproduces_the_best_trial(tiny_model_dir):
    """The physically pruned model from --from-run scores the best trial's objective exactly."""
    from adapruner import prune
    from adapruner.data import token_stream
    from adapruner.evaluation import perplexity

    root = tiny_model_dir
    result = run_search(root, trials=3)
    pruned = prune(str(root / "tiny"), from_run=root / "run", output=root / "pruned")
    assert pruned.record["search"]["subset"] == result["best"]["subset"]
    assert pruned.record["recipe"]["metric"] == result["best"]["config"]["metric"]
    tokens = token_stream(pruned.tokenizer, str(root / "corpus.txt"), "validation", 512)
    assert perplexity(pruned.model, tokens, 16, progress=False) == pytest.approx(result["best"]["value"], rel=1e-4)


def test_from_run_without_a_search(tiny_model_dir):
    from adapruner import prune

    with pytest.raises(AdaPrunerError, match=r"best\.json is missing"):
        prune(str(tiny_model_dir / "tiny"), from_run=tiny_model_dir)


def test_space_from_yaml_with_flag_overrides(tmp_path):
    from adapruner.search import load_space

    path = tmp_path / "space.yaml"
    path.write_text("sources: [books, wiki]\nnum_samples: [10, 20]\nattention_scale: [0.0, 0.5]\nspace: data\n")
    space = load_space(path, space="metric", metrics=None)
    assert space.sources == ["books", "wiki"] and space.num_samples == [10, 20]
    assert space.attention_scale == (0.0, 0.5) and space.space == "metric"
    path.write_text("sourcez: [books]\n")
    with pytest.raises(AdaPrunerError, match="unknown key"):
        load_space(path)
    path.write_text("num_samples: [5, 20]\n")
    with pytest.raises(AdaPrunerError, match="must include 10"):
        load_space(path)
    with pytest.raises(AdaPrunerError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_trial_left_running_by_a_killed_process_is_retried_not_counted_twice(tiny_model_dir):
    """A trial left RUNNING (the process died mid-trial) is failed and its parameters are run again."""
    import optuna

    root = tiny_model_dir
    run_search(root, trials=2)
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    orphan = study.ask(
        {"metric": optuna.distributions.CategoricalDistribution(["element1", "vector", "wanda_sp", "l2"])}
    )
    assert orphan.params == {"metric": orphan.params["metric"]}  # RUNNING, never told: as after kill -9
    run_search(root, trials=3)
    trials = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}").trials
    states = [t.state.name for t in trials]
    assert states[orphan.number] == "FAIL" and "RUNNING" not in states
    finished = [t for t in trials if t.state.name in {"COMPLETE", "PRUNED"}]
    assert len(finished) == 3  # two before, one after: the orphan is not counted
    assert finished[-1].params["metric"] == orphan.params["metric"]  # its parameters were run again
    rows = list(csv.DictReader((root / "run" / "trials.csv").open()))
    assert len({r["number"] for r in rows}) == len(rows)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("depth_slope: [1.0, -1.0]\n", "low <= high"),
        ("metrics: []\n", "'metrics' is empty"),
        ("metrics: [element1, taylor9]\n", "unknown metric"),
        ("seq_lens: [32]\n", "must include 64"),
        ("attention_scale: [-1, 1]\n", "attention_scale must be >= 0"),
        ("rankings: [layer, everywhere]\n", "unknown ranking"),
        ("rankings: [global]\n", "must include layer"),
        ("compensate: [yes-please]\n", "must list true and/or false"),
        ("compensate: [true]\n", "must include False"),
        ("layer_ranges: ['0:']\n", "must include default"),
        ("layer_ranges: [default, 0:]\n", "quote them in YAML"),
        ("layer_ranges: [default, four-to-eight]\n", "START:END"),
        ("warm_starts: [sparsegpt]\n", "unknown warm start"),
    ],
)
def test_bad_space_files_are_refused(tmp_path, text, message):
    from adapruner.search import load_space

    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(AdaPrunerError, match=message):
        load_space(path)


def test_bad_search_arguments_fail_before_any_work(tiny_model_dir):
    with pytest.raises(AdaPrunerError, match="at least 1"):
        run_search(tiny_model_dir, trials=0)
    with pytest.raises(AdaPrunerError, match="unknown --pruner"):
        run_search(tiny_model_dir, trials=1, pruner="hyperband9")
    with pytest.raises(AdaPrunerError, match="the objective needs at least 4"):
        search(
            str(tiny_model_dir / "tiny"),
            0.15,
            trials=1,
            output=tiny_model_dir / "run2",
            space=SearchSpace(sources=[str(tiny_model_dir / "corpus.txt")]),
            layers="1:3",
            pool_per_source=10,
            objective_data=str(tiny_model_dir / "corpus.txt"),
            objective_tokens=40,
            objective_seq_len=16,
        )


def _tiny_objective(root):
    from adapruner.data import token_stream
    from adapruner.data.pool import build_pool
    from adapruner.importance.cache import StatisticsCache
    from adapruner.models import get_adapter
    from adapruner.models.loading import load_model
    from adapruner.search.objective import Objective

    corpus = str(root / "corpus.txt")
    model, tokenizer = load_model(str(root / "tiny"))
    pool = build_pool(tokenizer, [corpus], 12, 64)
    cache = StatisticsCache(model, pool, get_adapter(model).projection_names(range(1, 3)), directory=root / "stats")
    valid = token_stream(tokenizer, corpus, "validation", 512)
    space = SearchSpace(sources=[corpus], num_samples=[4, 10])
    ranges = {"default": (1, 3), "0:": (0, 4)}
    cache = StatisticsCache(model, pool, get_adapter(model).projection_names(range(0, 4)), directory=root / "stats")
    space = SearchSpace(sources=[corpus], num_samples=[4, 10], layer_ranges=list(ranges))
    return Objective(model, 0.2, ranges, "auto", pool, cache, space, valid, 16), valid


def test_objective_reports_partial_perplexity_and_equals_the_full_pass(tiny_model_dir):
    """The chunked objective is exactly the perplexity of the masked model; a pruner can stop it early."""
    import optuna

    from adapruner.evaluation import perplexity
    from adapruner.models import get_adapter
    from adapruner.pruning import masked
    from adapruner.search.space import baseline_params

    objective, valid = _tiny_objective(tiny_model_dir)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    params = baseline_params(objective.space) | {"seq_len": 32, "depth_slope": 1.0, "attention_metric": "l2"}
    study.enqueue_trial(params)
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert sorted(trial.intermediate_values) == [0, 1, 2]
    planned = objective.plan_for(_config_of(trial))
    plan, means = planned.plan, planned.input_means
    assert means is None
    with masked(get_adapter(objective.model), plan):
        expected = perplexity(objective.model, valid, 16, progress=False)
    assert trial.value == pytest.approx(expected, rel=1e-6)
    assert trial.user_attrs["config"]["seq_len"] == 32 and 32 in objective.caches
    # a trial of a study begun before trials stored their recipe (no `from_run`): best.json gets the same
    # recipe and allocation, rebuilt from its search parameters
    from adapruner.search.study import _recipe_of

    older = optuna.trial.create_trial(
        value=trial.value, params=trial.params, distributions=trial.distributions,
        user_attrs={"config": trial.user_attrs["config"]},
    )  # fmt: skip
    stored = trial.user_attrs["from_run"]
    assert stored["recipe"]["depth_slope"] == 1.0 and stored["recipe"]["attention_metric"] == "l2"
    assert _recipe_of(older, objective) == stored == _recipe_of(trial, objective)

    hopeless = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))  # any ppl is > 1
    hopeless.enqueue_trial(params)
    hopeless.optimize(objective, n_trials=1)
    assert hopeless.trials[0].state.name == "PRUNED" and list(hopeless.trials[0].intermediate_values) == [0]


def _legacy_recipe_equals_stored(run_dir) -> bool:
    """Older ``best.json`` files still load, as the same recipe and allocation: one of 2026-12-06 (one flat
    recipe, runtime fields included) and one written before recipes were stored (no ``recipe``)."""
    from adapruner.recipe.config import Runtime
    from adapruner.recipe.from_run import recipe_from_run

    stored = recipe_from_run(run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    allocation = best.pop("allocation") or {}
    best["recipe"] |= allocation | Runtime(dtype="bfloat16").to_dict()  # as 2026-12-06 wrote it
    (run_dir / "best.json").write_text(json.dumps(best))
    flat = recipe_from_run(run_dir)
    del best["recipe"]
    (run_dir / "best.json").write_text(json.dumps(best))
    return recipe_from_run(run_dir) == flat == stored


def _config_of(trial):
    from adapruner.search.space import TrialConfig

    config = dict(trial.user_attrs["config"])
    config["sources"] = tuple(config["sources"])
    return TrialConfig(**config)


def test_compensated_joint_trial_on_every_layer_equals_the_physically_pruned_model(tiny_model_dir):
    """FLAP's choices inside the search (bias compensation, joint ranking, all layers) score what prune gives."""
    import copy

    import optuna

    from adapruner.evaluation import perplexity
    from adapruner.models import get_adapter
    from adapruner.pruning import prune_physically
    from adapruner.search.space import baseline_params

    objective, valid = _tiny_objective(tiny_model_dir)
    params = baseline_params(objective.space) | {"metric": "wifv", "ranking": "global-all", "compensate": True}
    params |= {"layers": "0:", "activation_calibration": "pool"}  # the pool subset's means and variances
    study = optuna.create_study()
    study.enqueue_trial(params)
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state.name == "COMPLETE"
    planned = objective.plan_for(_config_of(trial))
    plan, means = planned.plan, planned.input_means
    assert means and all(name.endswith(("o_proj", "down_proj")) for name in means)
    assert plan.layers[0].shape != get_adapter(objective.model).layer_shape(0)  # layer 0 is in the range now
    pruned = copy.deepcopy(objective.model)
    prune_physically(get_adapter(pruned), plan, input_means=means)
    assert trial.value == pytest.approx(perplexity(pruned, valid, 16, progress=False), rel=1e-5)
    uncompensated = optuna.create_study()
    uncompensated.enqueue_trial(params | {"compensate": False})
    uncompensated.optimize(objective, n_trials=1)
    assert uncompensated.trials[0].value != pytest.approx(trial.value, rel=1e-6)  # compensation changes the model


def test_flap_warm_starts_are_trials_1_and_2_and_are_the_methods_exactly(tiny_model_dir):
    """Without --layers the space holds every layer, so FLAP's recipe (its own 128 x 128 calibration
    windows, drawn fresh) is enqueued right after LLM-Pruner's and scores what ``--method flap`` gives;
    FLAP refitted layer by layer follows and scores what ``--method flap-refit`` gives."""
    from adapruner.search.space import warm_start_params
    from conftest import write_corpus

    assert warm_start_params(SearchSpace(space="data"), "flap") is None  # the metric subspace is fixed there
    assert warm_start_params(SearchSpace(compensate=[False]), "flap") is None  # the space cannot express it
    metric_only = warm_start_params(SearchSpace(space="metric"), "flap")
    assert metric_only["compensate"] and metric_only["ranking"] == "global-all" and "num_samples" not in metric_only
    joint = warm_start_params(SearchSpace(), "flap")
    assert joint["use_wiki"] and not joint["use_books"] and joint["activation_calibration"] == "128x128"
    assert "num_samples" not in joint and joint["layers"] == "0:"  # no pool subset is read
    in_pool = warm_start_params(SearchSpace(fresh_activations=[]), "flap", max_samples=10)
    assert in_pool["num_samples"] == 10 and "activation_calibration" not in in_pool

    assert warm_start_params(SearchSpace(refits=["none"]), "flap-refit") is None  # no lsq in the space

    root = tiny_model_dir
    corpus = root / "big.txt"
    write_corpus(corpus, documents=300, words=200)  # room for 128 windows of 128 tokens
    space = SearchSpace(sources=[str(corpus)], num_samples=[4, 10], metrics=["element1", "wifv"])
    kwargs = {"pool_per_source": 10, "objective_data": str(corpus), "objective_tokens": 512, "objective_seq_len": 16}
    result = search(str(root / "tiny"), 0.15, trials=3, output=root / "run", space=space, **kwargs)
    assert result["warm_starts"]["flap"]["trial"] == 1 and result["warm_starts"]["flap-refit"]["trial"] == 2
    assert result["warm_starts"]["flap"]["value"] != pytest.approx(result["warm_starts"]["flap-refit"]["value"])

    flap, record = _warm_start_is_the_method_exactly(root, corpus, result, "flap")
    assert flap.user_attrs["config"]["compensate"] and flap.user_attrs["config"]["layers"] == "0:"
    assert flap.user_attrs["subset"] is None and "num_samples" not in flap.params
    assert record["recipe"]["refit"] == "bias" and record["recipe"]["ranking"] == "global-all"
    assert record["recipe"]["activation_calibration"] == "128x128" and record["layer_range"] == [0, 4]

    refitted, record = _warm_start_is_the_method_exactly(root, corpus, result, "flap-refit")
    assert refitted.user_attrs["config"]["refit"] == "lsq" and not refitted.user_attrs["config"]["compensate"]
    assert record["recipe"]["refit"] == "lsq" and record["local"]["tokens"] == 128 * 128


def _warm_start_is_the_method_exactly(root, corpus, result, name: str):
    """The warm start's validation perplexity is what ``prune --method NAME`` and ``prune --from-run`` give
    (the refit's weights written in place for the trial, then restored); returns the trial and the record."""
    import optuna

    from adapruner import prune
    from adapruner.data import token_stream
    from adapruner.evaluation import perplexity

    start = result["warm_starts"][name]
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    trial = study.trials[start["trial"]]
    baseline = prune(str(root / "tiny"), 0.15, method=name, calibration=str(corpus))
    tokens = token_stream(baseline.tokenizer, str(corpus), "validation", 512)
    assert perplexity(baseline.model, tokens, 16, progress=False) == pytest.approx(start["value"], rel=1e-4)

    best = json.loads((root / "run" / "best.json").read_text())
    best["best"] |= {"trial": trial.number, "value": start["value"], "config": trial.user_attrs["config"]}
    best |= trial.user_attrs["from_run"]
    best["best"]["subset"] = None
    (root / "run" / "best.json").write_text(json.dumps(best))
    pruned = prune(str(root / "tiny"), from_run=root / "run")
    assert perplexity(pruned.model, tokens, 16, progress=False) == pytest.approx(start["value"], rel=1e-4)
    assert _legacy_recipe_equals_stored(root / "run")
    return trial, pruned.record


def test_trials_only_draw_the_data_parameters_their_metric_reads():
    import optuna

    from adapruner.search.space import suggest

    space = SearchSpace(
        metrics=["l2", "wifv", "element1"], separate_attention_metric=False, compensate=[False], allocations=["profile"]
    )

    def params_of(fixed):
        study = optuna.create_study()
        study.enqueue_trial(fixed)
        trial = study.ask()
        config = suggest(trial, space)
        return trial.params, config

    l2, _ = params_of({"metric": "l2", "refit": "none"})
    assert not any(k.startswith(("use_", "num_samples", "subset_seed", "window")) for k in l2)
    refitted, config = params_of({"metric": "l2", "refit": "lsq"})  # the refit reads the sources' windows only
    assert any(k.startswith("use_") for k in refitted) and "num_samples" not in refitted
    assert "compensate" not in refitted and config.refit == "lsq" and not config.compensate
    wifv, config = params_of({"metric": "wifv", "activation_calibration": "128x128"})
    assert "num_samples" not in wifv and "aggregation" not in wifv and config.activation_calibration == "128x128"
    element1, _ = params_of({"metric": "element1"})
    assert {"num_samples", "seq_len", "subset_seed"} <= set(element1) and "activation_calibration" not in element1


def test_a_configuration_measured_before_is_reused_not_rerun(tiny_model_dir):
    import optuna

    from adapruner.search.space import baseline_params

    objective, _ = _tiny_objective(tiny_model_dir)
    study = optuna.create_study()
    flap_like = baseline_params(objective.space) | {"metric": "wifv", "ranking": "global-all", "compensate": True}
    flap_like.pop("aggregation")  # FLAP's metric reads one member: aggregation is not a parameter then
    flap_like["activation_calibration"] = "pool"
    for params in (baseline_params(objective.space), baseline_params(objective.space), flap_like):
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=3)
    first, again, flap = study.trials
    assert again.user_attrs["duplicate_of"] == 0 and again.value == first.value
    assert again.user_attrs["seconds"]["evaluation"] == 0.0 < first.user_attrs["seconds"]["evaluation"]
    assert "aggregation" not in flap.params and flap.user_attrs["config"]["aggregation"] == "sum"
    assert "duplicate_of" not in flap.user_attrs


def test_per_layer_trials_assemble_supernet_candidates_meet_the_budget_and_prune_from_run_exactly(tiny_model_dir):
    """After the profile trials every trial keeps its own counts per layer: the starts first (the best
    profile trial's counts, then a uniform rate), then mutations of the best; each meets the ratio within
    one MLP channel, and ``prune --from-run`` of the best rebuilds the trial's model exactly."""
    import optuna

    from adapruner import prune
    from adapruner.data import token_stream
    from adapruner.evaluation import perplexity
    from adapruner.search.evolution import params_to_counts
    from conftest import supernet_search_setup

    root = tiny_model_dir
    corpus, space, kwargs = supernet_search_setup(root, warm_starts=["flap"], profile_trials=2)
    result = search(str(root / "tiny"), 0.2, trials=9, output=root / "run", space=space, pruner="none", **kwargs)
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    per_layer = [t for t in study.trials if t.user_attrs.get("allocation") == "per-layer"]
    assert [t.number for t in per_layer] == list(range(2, 9))
    assert [t.user_attrs.get("start") for t in per_layer[:2]] == [0, 1]
    profile_best = min(study.trials[:2], key=lambda t: t.value)
    start = params_to_counts(per_layer[0].params)
    kept = profile_best.user_attrs["kept"]
    heads = [k[0] for k in kept]  # query heads (GQA: query mode; MHA: as many as KV heads)
    assert [start[i][0] for i in range(4)] == heads  # its heads; its channels, repaired to the exact budget:
    assert sum(abs(start[i][1] - kept[i][2]) for i in range(4)) <= 4
    for trial in per_layer[2:]:
        parent = trial.user_attrs["parent"]
        done = [t for t in per_layer if t.number < trial.number and t.value is not None]
        assert study.trials[parent].value == min(t.value for t in done)  # elitist: the best so far
        assert params_to_counts(trial.params) != params_to_counts(study.trials[parent].params)

    rows = list(csv.DictReader((root / "run" / "trials.csv").open()))
    assert "attn_0" in rows[-1] and "mlp_3" in rows[-1]

    best = json.loads((root / "run" / "best.json").read_text())
    trial = min(per_layer, key=lambda t: t.value if t.value is not None else float("inf"))
    best["best"] |= {"trial": trial.number, "value": trial.value, "config": trial.user_attrs["config"], "subset": None}
    best |= trial.user_attrs["from_run"]
    (root / "run" / "best.json").write_text(json.dumps(best))
    pruned = prune(str(root / "tiny"), from_run=root / "run")
    tokens = token_stream(pruned.tokenizer, str(corpus), "validation", 512)
    assert perplexity(pruned.model, tokens, 16, progress=False) == pytest.approx(trial.value, rel=1e-4)
    assert _legacy_recipe_equals_stored(root / "run")
    record = pruned.record
    assert record["allocation"]["keep_counts"] and record["local"]["supernet"]
    unit = 3 * 48  # one MLP channel of the tiny model: gate and up rows, a down_proj column
    dense = record["params"]["dense"]
    biases = sum(p.numel() for n, p in pruned.model.named_parameters() if n.endswith(("o_proj.bias", "down_proj.bias")))
    assert biases and abs(dense - (record["params"]["pruned"] - biases) - 0.2 * dense) <= unit  # refit biases aside
    assert result["best"]["value"] == min(t.value for t in study.trials if t.value is not None)


def test_a_stored_recipe_with_unknown_fields_is_refused_in_one_line(tmp_path):
    from adapruner import AdaPrunerError
    from adapruner.recipe.from_run import recipe_from_run

    best = {"ratio": 0.2, "pool": {}, "best": {"subset": None}, "recipe": {"metric": "element1", "warp_drive": 9}}
    for written in (best, best | {"allocation": None}):  # the flat recipe of 2026-12-06, and today's
        (tmp_path / "best.json").write_text(json.dumps(written))
        with pytest.raises(AdaPrunerError, match=r"newer AdaPruner \(unknown recipe fields warp_drive\): upgrade"):
            recipe_from_run(tmp_path)
        (tmp_path / "best.json").write_text(json.dumps(written | {"recipe": ["not", "a", "mapping"]}))
        with pytest.raises(AdaPrunerError, match="is corrupted"):
            recipe_from_run(tmp_path)
    today = best | {"recipe": {"model": "", "ratio": 0.2}, "allocation": {"keep_counts": [[0, 2]], "max_removal": 0.9}}
    (tmp_path / "best.json").write_text(json.dumps(today))
    with pytest.raises(AdaPrunerError, match="an allocation needs"):
        recipe_from_run(tmp_path)


def test_a_space_without_llm_pruners_metric_is_refused_in_one_line():
    """Trial 0 is LLM-Pruner's recipe: a space whose metrics or aggregations leave it out cannot run it."""
    from adapruner import AdaPrunerError

    with pytest.raises(AdaPrunerError, match=r"metrics \['l2'\] must include element1, LLM-Pruner's choice"):
        SearchSpace(metrics=["l2"])
    with pytest.raises(AdaPrunerError, match=r"aggregations \['max'\] must include sum"):
        SearchSpace(aggregations=["max"])
    assert SearchSpace(space="data", metrics=["l2"]).metrics == ["l2"]  # the data subspace fixes the recipe's
