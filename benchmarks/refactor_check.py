"""Did a refactor change any result? Fingerprint the pruning paths on the tiny model, before and after.

Runs, in a scratch directory with its own cache: seven ``prune`` recipes (LLM-Pruner's, Wanda-sp, FLAP,
FLAP + refit, structured OBS, Wanda-sp + least-squares refit, element2 + compensation on fresh windows)
and a 20-trial search over the full space (every metric, compensation, refit, then per-layer supernet
trials) followed by ``prune --from-run``; records every plan, trial value and perplexity. Minutes on a CPU.

    git stash; python benchmarks/refactor_check.py --output before.json; git stash pop
    python benchmarks/refactor_check.py --output after.json --compare before.json

``--compare`` prints each difference and exits 1 if there is any (equal means bit-identical floats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
RECIPES = [
    ("llm-pruner-element1", {}),
    ("wanda-sp", {}),
    ("flap", {}),
    ("flap-refit", {"refit_calibration": "64x32"}),
    ("local-obs", {"refit_calibration": "64x32"}),
    (None, {"metric": "wanda_sp", "refit": "lsq", "refit_calibration": "64x32"}),
    (None, {"metric": "element2", "refit": "bias", "activation_calibration": "32x32"}),
]
SEARCH_METRICS = ["element1", "element2", "vector", "second", "wanda_sp", "flap", "wifv", "l2", "mix"]


def fingerprint(root: Path) -> dict:
    """Plans, trial values and perplexities of the recipes and the search, on a tiny model saved in ``root``."""
    os.environ["ADAPRUNER_CACHE"] = str(root / "cache")  # before the package reads it
    sys.path.insert(0, str(TESTS))
    import optuna

    from adapruner import prune, search
    from adapruner.data import token_stream
    from adapruner.evaluation import perplexity
    from conftest import save_tiny, supernet_search_setup

    save_tiny(root / "tiny")
    corpus, space, options = supernet_search_setup(  # writes the corpus the recipes read too
        root, warm_starts=["flap", "flap-refit"], profile_trials=12, metrics=SEARCH_METRICS, refits=["none", "lsq"]
    )
    result: dict = {"recipes": {}}
    for method, extra in RECIPES:
        pruned = prune(str(root / "tiny"), 0.2, method=method, calibration=str(corpus), **extra)
        tokens = token_stream(pruned.tokenizer, str(corpus), "validation", 512)
        ppl = perplexity(pruned.model, tokens, 16, progress=False)
        result["recipes"][f"{method or 'custom'} {json.dumps(extra, sort_keys=True)}"] = [ppl, pruned.plan.to_dict()]
    run = root / "run"
    found = search(str(root / "tiny"), 0.2, trials=20, output=run, space=space, pruner="none", seed=3, **options)
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    result["trials"] = [[t.number, t.state.name, t.value] for t in study.trials]
    winner = prune(str(root / "tiny"), from_run=root / "run")
    tokens = token_stream(winner.tokenizer, str(corpus), "validation", 512)
    result["best"] = found["best"]["value"]
    result["from_run"] = {"ppl": perplexity(winner.model, tokens, 16, progress=False), "plan": winner.plan.to_dict()}
    return result


def differences(before: dict, after: dict, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after))
        return [d for k in keys for d in differences(before.get(k), after.get(k), f"{where}/{k}")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [d for i, (b, a) in pairs for d in differences(b, a, f"{where}[{i}]")]
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="JSON file for this code's fingerprint")
    parser.add_argument("--compare", type=Path, help="a fingerprint of other code to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapruner-refactor-") as scratch:
        result = fingerprint(Path(scratch))
    args.output.write_text(json.dumps(result, indent=1))
    print(f"fingerprint written to {args.output}: {len(result['recipes'])} recipes, {len(result['trials'])} trials")
    if args.compare is not None:
        found = differences(json.loads(args.compare.read_text()), json.loads(json.dumps(result)))
        print("\n".join(found) if found else f"identical to {args.compare}")
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
