"""Calibrations compared on the same annotation loops (issue 14).

Usage::

    python benchmarks/calibration_replay.py                 # both datasets, 12 starts
    python benchmarks/calibration_replay.py --starts 3      # quicker, noisier

``annotation_loop.py`` lets each variant steer its own loop, and the loop is
chaotic: one round's plan moves the next round's suggestions, so the means
of a few starts differ by half a point between runs of the same code. This
benchmark takes that noise out of comparisons of *calibrations*. It runs
today's loop once per start at array level (``propagate``, ``stop_plan``
and ``suggest``, as ``propagate_labels`` and ``suggest_seeds`` run them,
without the database: 1 random sample, ``2 C - 1`` k-center picks, then
rounds of 40 suggestions) and keeps every round's raw scores: the
targets' uncalibrated probabilities, the held-out seeds' out-of-fold ones,
their classes and graph-cell weights. Each calibration then recalibrates
the same scores at every round and makes its own stop plan, so the
variants differ only by what they change.

The recorded loops are cached in ``~/.cache/dinoprop-bench/replay/``,
keyed by the sources of ``dinoprop.propagation_methods`` and
``dinoprop.seeds``: they are recorded again when that code changes.

Reported per dataset and calibration (mean over the starts): the best stop
(the cheapest round whose dataset really is >= 95% right), the rounds from
the sixth on whose plan promised 95% and whose dataset was less accurate,
the accepted labels' real errors over the plan's estimate, and the stop
``stopping_forecast`` recommends on the calibration's own cost history,
finished as ``plan_stop`` finishes it (at no less than the trend's cost,
with its larger reserve),
or the last round where none is recommended (as ``annotation_loop.py``
reports it): its cost over the best stop, and the least accurate dataset
it left.
"A perfect threshold" accepts the most confident labels while their real
errors fit the budget: the ceiling of a calibration on this ranking.

The table is written to ``benchmarks/results/calibration_replay.md``; the
last printed line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import multiprocessing
import os
import pickle
import platform
import time
from pathlib import Path

import numpy as np

from propagation import CACHE, features

REPO = Path(__file__).resolve().parents[1]
REPLAY_CACHE = CACHE / "replay"
RESULTS = REPO / "benchmarks" / "results" / "calibration_replay.md"
BATCH = 40
TARGET_ACCURACY = 0.95
#: Rounds before this one are left out of the promise and error-ratio
#: figures: the first rounds, with a few dozen seeds, are not yet trusted.
TRUSTED_FROM_ROUND = 6


# ------------------------------------------------------------ recording


def code_digest() -> str:
    """A digest of the code the recorded loops depend on (the stop plan is
    replayed, not recorded, so ``stopping.py`` is left out)."""
    digest = hashlib.sha256()
    package = REPO / "plugin" / "dinoprop"
    sources = sorted((package / "propagation_methods").glob("*.py")) + [package / "seeds.py"]
    for path in sources:
        if path.name != "stopping.py":
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _dataset(name: str):
    """The dataset's centred features, kNN graph (as ``propagate_labels``
    searches it) and class indices, built once for all its starts."""
    from dinoprop import propagation_methods as pm
    from dinoprop.graph import knn_search

    raw, labels = features(name)
    _, y = np.unique(labels, return_inverse=True)
    return pm.center_and_normalize(raw), pm.Graph(*knn_search(raw, 10)), y


def record_loop(x, graph, y, start: int, rounds: int) -> list:
    """Today's loop on one dataset from one start, every round's raw scores
    (each run given the checked predictions the one before handed on, as
    ``propagate_labels`` gives them)."""
    from dinoprop import propagation_methods as pm
    from dinoprop.seeds import suggest

    rng = np.random.default_rng(start)
    seeds = [int(rng.integers(len(y)))]
    seeds += [int(i) for i in suggest(x, graph, np.array(seeds), list(y[seeds]), 2 * (y.max() + 1) - 1)]
    loop, handed_on = [], {}
    for _ in range(rounds):
        seed_idx = np.array(seeds, np.int64)
        present, seed_labels = np.unique(y[seed_idx], return_inverse=True)
        problem = pm.Problem(x, graph, len(present), knn_k=10)
        outcome = pm.propagate(problem, seed_idx, seed_labels, **_handed_on(handed_on, present, len(seed_idx)))
        targets = np.setdiff1d(np.arange(len(y)), seed_idx)
        loop.append(dict(
            seed_idx=seed_idx, targets=targets, present=present,
            scores=problem.scores(outcome.method, seed_idx, seed_labels, last=True)[targets]
            .astype(np.float16),
            **_held_out_scores(problem, graph, seed_idx, seed_labels, outcome.method),
            temperature=outcome.temperature, spread=outcome.temperature_spread,
            shrink=outcome.shrink,
        ))
        suggested = suggest(x, graph, seed_idx, list(y[seed_idx]), BATCH, probs=outcome.probs)
        if not len(suggested):
            break
        seeds += [int(i) for i in suggested]
        handed_on = dict(checked=outcome.checked, classes=present, num_seeds=len(seed_idx))
    return loop


def _handed_on(previous: dict, classes, num_seeds: int) -> dict:
    """What ``propagate_labels`` hands from one run to the next: the
    previous run's checked predictions (on the seeds, which keep their
    positions as the loop appends) and the seeds labeled since."""
    if not previous:
        return {}
    checked = previous["checked"]
    if checked is not None:
        checked = checked.remapped(checked.positions, previous["classes"], classes)
    return dict(checked=checked, new_seeds=np.arange(previous["num_seeds"], num_seeds))


def _held_out_scores(problem, graph, seed_idx, seed_labels, method):
    """The out-of-fold scores ``propagate`` calibrated on (the same folds,
    from its default fold count and shuffling seed; the whole graph, which
    it cross-validates on below ``cv_max_nodes``), their true classes and
    graph-cell weights. ``propagate`` keeps only their calibrated form, so
    the chosen method's folds run again here."""
    import inspect

    from dinoprop import propagation_methods as pm
    from dinoprop.propagation_methods import auto

    defaults = inspect.signature(pm.propagate).parameters
    folds = auto._seed_folds(
        seed_labels, defaults["max_folds"].default, defaults["random_state"].default
    )
    held_out = np.concatenate(folds)
    oof = auto._out_of_fold(problem, seed_idx, seed_labels, folds, [method])[method]
    weights = auto.seed_weights(graph, seed_idx)[held_out]
    return dict(oof=oof.astype(np.float32), held_out=seed_labels[held_out], weights=weights)


def recorded_loops(name: str, starts: int, rounds: int) -> dict:
    """The loops of one dataset, from the cache or recorded now."""
    path = REPLAY_CACHE / ("%s-%s-%d-%d.pkl" % (name, code_digest(), starts, rounds))
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    tick = time.perf_counter()
    x, graph, y = _dataset(name)
    loops = []
    for start in range(starts):
        loops.append(record_loop(x, graph, y, start, rounds))
        print("  %s: start %d recorded (%.0f s)" % (name, start, time.perf_counter() - tick), flush=True)
    recorded = {"truth": y, "loops": loops}
    REPLAY_CACHE.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(recorded, f)
    return recorded


# ------------------------------------------------------------ calibrations


def _calibrated_top(scores, temperature, round_):
    from dinoprop.propagation_methods.calibration import calibrate

    return calibrate(
        scores, temperature, shrink=round_["shrink"], log_spread=round_["spread"]
    ).max(axis=1)


def todays(round_, scores):
    """What ``propagate`` does today: its own temperature."""
    confidence = _calibrated_top(scores, round_["temperature"], round_)
    return confidence, confidence


def shifted(over_cells: bool, caution: float):
    """The temperature fitted on the held-out seeds reweighted to the
    targets' confidences (:func:`confidence_shift_weights`), over the
    unweighted or the cell-weighted seeds; the plan counts errors with the
    confidences at ``T * exp(caution * spread)``."""
    from dinoprop.propagation_methods.calibration import fit_temperature

    def calibration(round_, scores):
        base = round_["weights"] if over_cells else None
        weights = confidence_shift_weights(round_["oof"].max(1), scores.max(1), base)
        temperature = fit_temperature(round_["oof"], round_["held_out"], weights)
        label = _calibrated_top(scores, temperature, round_)
        if not caution:
            return label, label
        cautious = temperature * np.exp(caution * round_["spread"])
        return label, _calibrated_top(scores, cautious, round_)

    return calibration


def confidence_shift_weights(held_out_conf, target_conf, base=None, bins=10, clip=(0.05, 20.0)):
    """Importance weights for one covariate: each held-out seed weighted by
    the targets' share over the held-out seeds' (``base``-weighted) share
    of its bin of uncalibrated top probability, clipped."""
    edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    held_bins, target_bins = np.digitize(held_out_conf, edges), np.digitize(target_conf, edges)
    base = np.ones(len(held_out_conf)) if base is None else np.asarray(base, np.float64)
    held_share = np.bincount(held_bins, weights=base, minlength=bins) / base.sum()
    target_share = np.bincount(target_bins, minlength=bins) / max(len(target_conf), 1)
    ratio = target_share[held_bins] / np.maximum(held_share[held_bins], 1e-12)
    return base * np.clip(ratio, *clip)


CALIBRATIONS = {
    "today's": todays,
    "confidence shift": shifted(over_cells=False, caution=0.0),
    "confidence shift, cautious plan (k = 1)": shifted(over_cells=False, caution=1.0),
    "cells x shift": shifted(over_cells=True, caution=0.0),
    "cells x shift, cautious plan (k = 1)": shifted(over_cells=True, caution=1.0),
}


# ------------------------------------------------------------ scoring


def _accept(label_conf, plan_conf, num_human, min_cost=None, sigmas=None):
    """The stop plan's acceptance: most confident labels first, their
    errors counted with ``plan_conf`` (as :func:`stop_plan` counts them
    with the labels' own confidences) with ``sigmas`` standard deviations
    in reserve (default the plan's), at no less than ``min_cost``."""
    from dinoprop.propagation_methods.stopping import ERROR_MARGIN_SIGMAS, _tie_boundary

    sigmas = ERROR_MARGIN_SIGMAS if sigmas is None else sigmas
    budget = (1.0 - TARGET_ACCURACY) * (num_human + len(label_conf))
    order = np.argsort(-label_conf, kind="stable")
    p = plan_conf[order].astype(np.float64)
    errors = np.cumsum(1.0 - p)
    fits = errors + sigmas * np.sqrt(np.cumsum(p * (1.0 - p))) <= budget + 1e-9
    count = int(np.argmin(fits)) if not fits.all() else len(p)
    ranked = label_conf[order]
    count = _tie_boundary(ranked, count, step=-1)
    capped = num_human + len(p) - int(np.ceil(min_cost - 1e-9)) if min_cost is not None else count
    if capped < count:
        count = _tie_boundary(ranked, max(capped, 0), step=1)
    accepted = np.zeros(len(label_conf), bool)
    accepted[order[:count]] = True
    return accepted, float(errors[count - 1]) if count else 0.0


def replay(recorded: dict, calibration) -> dict:
    """One calibration over every recorded loop of a dataset."""
    from dinoprop import propagation_methods as pm

    truth, num = recorded["truth"], len(recorded["truth"])
    best, perfect, below, trusted, worst, ratios, recommended = [], [], 0, 0, 0, [], []
    num_recommended = 0
    for loop in recorded["loops"]:
        rows, history, start_below, cheapest = [], [], 0, num
        for number, round_ in enumerate(loop):
            scores = round_["scores"].astype(np.float32)
            right = round_["present"][scores.argmax(1)] == truth[round_["targets"]]
            cheapest = min(cheapest, num - _perfect_accepted(scores.max(1), right, num))
            confidences, num_human = calibration(round_, scores), len(round_["seed_idx"])
            accepted, estimated = _accept(*confidences, num_human)
            history.append([num_human, num - int(accepted.sum())])
            forecast = pm.stopping_forecast(history)
            if forecast["recommend_stop"]:  # the finish, as plan_stop makes it
                accepted, estimated = _accept(
                    *confidences, num_human, forecast["trend_cost"], pm.FINISH_MARGIN_SIGMAS
                )
            wrong = int((accepted & ~right).sum())
            cost, accuracy = num - int(accepted.sum()), 1.0 - wrong / num
            rows.append((cost, accuracy, forecast["recommend_stop"]))
            if number >= TRUSTED_FROM_ROUND:
                trusted += 1
                start_below += accuracy < TARGET_ACCURACY
                if estimated > 0:
                    ratios.append(wrong / estimated)
        below += start_below
        worst = max(worst, start_below)
        reached = [cost for cost, accuracy, _ in rows if accuracy >= TARGET_ACCURACY]
        best_cost = min(reached) if reached else num
        best.append(best_cost / num)
        perfect.append(cheapest / num)
        # as annotation_loop.py: the first recommended round, else the last
        stop = next((row for row in rows if row[2]), rows[-1])
        recommended.append((stop[0] / best_cost, stop[1]))
        num_recommended += any(row[2] for row in rows)
    return {
        "best_stop": float(np.mean(best)),
        "perfect_threshold": float(np.mean(perfect)),
        "rounds_below": below,
        "trusted_rounds": trusted,
        "worst_start_below": worst,
        "real_over_estimated": float(np.mean(ratios)) if ratios else None,
        "recommended_over_best": float(np.mean([r for r, _ in recommended])) if recommended else None,
        "recommended_min_accuracy": min((a for _, a in recommended), default=None),
        "starts_recommended": num_recommended,
        "starts": len(recorded["loops"]),
    }


def _perfect_accepted(confidence, right, num):
    """How many of the most confident labels fit the error budget by their
    real errors."""
    errors = np.cumsum(~right[np.argsort(-confidence, kind="stable")])
    return int(np.searchsorted(errors, (1.0 - TARGET_ACCURACY) * num, side="right"))


def run_dataset(name: str, starts: int, rounds: int) -> dict:
    recorded = recorded_loops(name, starts, rounds)
    return {label: replay(recorded, calibration) for label, calibration in CALIBRATIONS.items()}


# ------------------------------------------------------------ reporting


def report(results: dict, args) -> str:
    lines = [
        "# Calibrations compared on the same annotation loops",
        "",
        "Measured %s on %s (%d cores), `calibration_replay.py --starts %d --rounds %d`."
        % (datetime.date.today(), platform.machine(), os.cpu_count(), args.starts, args.rounds),
        "",
        "| dataset | calibration | best stop | a perfect threshold | rounds below 95% (worst start) "
        "| real / estimated errors | recommended stop | its least accurate dataset |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_calibration in results.items():
        for label, r in by_calibration.items():
            lines.append("| %s | %s | %.1f%% | %.1f%% | %d of %d (%d) | %s | %s | %s |" % (
                name, label, 100 * r["best_stop"], 100 * r["perfect_threshold"],
                r["rounds_below"], r["trusted_rounds"], r["worst_start_below"],
                "%.2f" % r["real_over_estimated"] if r["real_over_estimated"] else "-",
                "%.2fx (recommended at %d of %d starts)"
                % (r["recommended_over_best"], r["starts_recommended"], r["starts"])
                if r["recommended_over_best"] else "none",
                "%.2f%%" % (100 * r["recommended_min_accuracy"]) if r["recommended_min_accuracy"] else "-",
            ))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=12, help="random starts per dataset")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of 40 suggestions per loop")
    parser.add_argument("--datasets", nargs="+", default=["clothing-small", "cifar10-test"])
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(args.datasets), mp_context=context) as pool:
        futures = {n: pool.submit(run_dataset, n, args.starts, args.rounds) for n in args.datasets}
        results = {n: f.result() for n, f in futures.items()}
    text = report(results, args)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
