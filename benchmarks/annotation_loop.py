"""Annotation-effort benchmark: human labels until the whole dataset is 95% right.

Usage::

    python benchmarks/annotation_loop.py            # clothing-small and cifar10-test, 5 starts
    python benchmarks/annotation_loop.py --quick    # clothing-small, 1 start, < 10 min

A simulated annotation team works on a FiftyOne dataset through the SDK:
its efficientnet-lite0 features (fp32, cached by ``benchmarks/propagation.py``)
are the embeddings, and the true classes stay outside the dataset, revealed
only for the samples a human labels.

- Start: one random sample is labeled, then ``suggest_seeds`` picks
  ``2 * C - 1`` more (k-center coverage); the random first sample is what
  differs between starts.
- Each round: ``propagate_labels`` (``method="auto"``), then the team could
  stop: accept every propagated label at or above the stop plan's threshold
  (``summary()["stop_plan"]``, whole dataset at 95% by the calibrated
  confidences) and label the rest by hand. The cost of stopping is the human
  labels so far plus the rest; the truth scores the accepted labels. Then
  ``suggest_seeds`` picks the next 40 samples and the human labels them.
- The recommended stop is the first round whose stop plan says
  ``recommend_stop`` (no truth involved). The best stop is the cheapest
  round whose dataset really is >= 95% right (known only with the truth).
- The loop ends when the human labels alone cost as much as the best stop
  found (no later stop can be cheaper) and the recommendation has come, or
  after ``MAX_ROUNDS``.

Baselines, same starts, same human-label counts: label everything (cost N);
random seeds + kNN vote calibrated and accepted by the same stop plan
(``propagate(method="knn")``); scikit-learn ``LabelSpreading(kernel="knn")``
on random seeds, its label distributions as confidence, the threshold chosen
by 5-fold cross-validation on its seeds to keep the dataset at 95%. Each
baseline's figure is its best stop, chosen with the truth, as for dinoprop.
The "precision rule" column applies today's recommended threshold (accepted
labels at 95% precision) to dinoprop's own runs.

The last printed line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from private_db import use_private_database

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "annotation_loop.md"
BATCH = 40
TARGET_ACCURACY = 0.95
MAX_ROUNDS = 30
NUM_STARTS = 5
FOLDS = 5


# ------------------------------------------------------------ the team


class Team:
    """The simulated team on one FiftyOne dataset: it knows the truth and
    reveals it only for the samples it labels."""

    def __init__(self, name, raw, labels, start):
        import fiftyone as fo

        from propagation import image_files

        files, _ = image_files(name)
        self.dataset = fo.Dataset()
        self.dataset.add_samples([fo.Sample(filepath=f) for f in files])
        self.dataset.set_values("dinoprop_embedding", [np.asarray(v) for v in raw])
        self.ids = np.array(self.dataset.values("id"))
        self.truth = np.asarray(labels)
        self.rng = np.random.default_rng(start)
        self.labeled = np.zeros(len(self.ids), bool)

    def label(self, ids):
        """The human labels these samples (their true class)."""
        import fiftyone as fo

        index = {sid: i for i, sid in enumerate(self.ids)}
        rows = [index[sid] for sid in ids]
        self.labeled[rows] = True
        self.dataset.set_values(
            "label",
            {self.ids[i]: fo.Classification(label=str(self.truth[i])) for i in rows},
            key_field="id",
        )

    def outcomes(self, *thresholds):
        """Cost and truth of stopping now at each threshold: accept the
        propagated labels at or above it, label the rest."""
        preds, confs = self.dataset.values(
            ["label_propagated.label", "label_propagated.confidence"]
        )
        target = ~self.labeled
        conf = np.array([c if c is not None else -1.0 for c in confs])
        right = np.array([p == t for p, t in zip(preds, self.truth)])
        return [
            _stop_outcome(len(self.ids), int(self.labeled.sum()), target & (conf >= t), right)
            for t in thresholds
        ]

    def delete(self):
        self.dataset.delete()


def _stop_outcome(num, num_human, accepted, right):
    wrong = int((accepted & ~right).sum())
    num_accepted = int(accepted.sum())
    return {
        "human": num_human,
        "accepted": num_accepted,
        "cost": num - num_accepted,
        "precision": float((accepted & right).sum() / num_accepted) if num_accepted else None,
        "accuracy": 1.0 - wrong / num,
        "accepted_ids": np.flatnonzero(accepted),
    }


def dinoprop_loop(name, raw, labels, start):
    """The team's loop through the SDK; one row per round."""
    import dinoprop

    team = Team(name, raw, labels, start)
    num_classes = len(np.unique(labels))
    rows, best = [], None
    try:
        team.label([team.ids[team.rng.integers(len(team.ids))]])
        team.label(dinoprop.suggest_seeds(team.dataset, 2 * num_classes - 1, "label", progress=False))
        for round_ in range(int(os.environ.get("DINOPROP_BENCH_MAX_ROUNDS", MAX_ROUNDS))):
            tick = time.perf_counter()
            results = dinoprop.propagate_labels(team.dataset, "label", progress=False)
            summary = results.summary()
            plan = summary["stop_plan"]
            row, precision_rule = team.outcomes(
                plan["threshold"] if plan["num_accepted"] else 2.0,
                summary["recommended_threshold"] or 2.0,
            )
            row.update(
                round=round_,
                threshold=plan["threshold"],
                estimated_accuracy=plan["estimated_accuracy"],
                recommend_stop=plan["recommend_stop"],
                saving=plan["next_batch_saving"],
                precision_rule_cost=precision_rule["cost"],
                precision_rule_accuracy=precision_rule["accuracy"],
                precision_rule_accepted=precision_rule["accepted_ids"],
                method=summary["method"],
            )
            if row["accuracy"] >= TARGET_ACCURACY and (best is None or row["cost"] < best):
                best = row["cost"]
            recommended = any(r["recommend_stop"] for r in rows + [row])
            suggested = dinoprop.suggest_seeds(team.dataset, BATCH, "label", progress=False)
            row["seconds"] = time.perf_counter() - tick
            rows.append(row)
            print("  %s start %d round %2d: %4d human, cost %4d, accuracy %.3f%s (%.1f s)"
                  % (name, start, round_, row["human"], row["cost"], row["accuracy"],
                     "  [recommended stop]" if row["recommend_stop"] else "", row["seconds"]),
                  flush=True)
            if (best is not None and team.labeled.sum() + BATCH > best and recommended) or not suggested:
                break
            team.label(suggested)
    finally:
        team.delete()
    return rows


# ------------------------------------------------------------ baselines


def random_order(num, start):
    """The order random seeds are drawn in, per start."""
    return np.random.default_rng(1000 + start).permutation(num)


def knn_baseline(problem, y, seeds):
    """Random seeds, kNN vote, calibrated and accepted by the stop plan."""
    from dinoprop import propagation_methods as pm

    out = pm.propagate(problem, seeds, y[seeds], method="knn")
    return _accept_by_plan(out.probs, y, seeds, out.oof_probs is not None)


def _accept_by_plan(probs, y, seeds, calibrated):
    from dinoprop import propagation_methods as pm

    target = np.ones(len(y), bool)
    target[seeds] = False
    conf = probs.max(axis=1)
    plan = pm.stop_plan(conf[target], len(seeds), TARGET_ACCURACY)
    accepted = target & (conf >= plan.threshold) if calibrated and plan.num_accepted else target & False
    return _stop_outcome(len(y), len(seeds), accepted, probs.argmax(axis=1) == y)


def label_spreading_baseline(x, y, seeds):
    """Random seeds, LabelSpreading(knn), threshold by 5-fold CV on the seeds."""
    from sklearn.model_selection import StratifiedKFold

    dist = _label_spreading(x, y, seeds)
    target = np.ones(len(y), bool)
    target[seeds] = False
    conf, right = dist.max(axis=1), dist.argmax(axis=1) == y
    counts = np.bincount(y[seeds])
    if counts[counts > 0].min() < 2:
        return _stop_outcome(len(y), len(seeds), target & False, right)
    folds = min(FOLDS, int(counts[counts > 0].min()))
    oof_conf, oof_right = [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(seeds, y[seeds]):
        fold = _label_spreading(x, y, seeds[train])
        oof_conf.append(fold[seeds[test]].max(axis=1))
        oof_right.append(fold[seeds[test]].argmax(axis=1) == y[seeds[test]])
    threshold = _cv_threshold(np.concatenate(oof_conf), np.concatenate(oof_right), conf[target], len(y))
    return _stop_outcome(len(y), len(seeds), target & (conf >= threshold), right)


def _label_spreading(x, y, seeds):
    from sklearn.semi_supervised import LabelSpreading

    targets = np.full(len(y), -1)
    targets[seeds] = y[seeds]
    return LabelSpreading(kernel="knn", n_neighbors=10).fit(x, targets).label_distributions_


def _cv_threshold(oof_conf, oof_right, target_conf, num):
    """The lowest threshold whose accepted targets, at the cross-validated
    seeds' precision above it, keep the dataset at the target accuracy."""
    best = np.inf
    for threshold in np.unique(oof_conf)[::-1]:
        above = oof_conf >= threshold
        errors = (target_conf >= threshold).sum() * (1.0 - oof_right[above].mean())
        if errors > (1.0 - TARGET_ACCURACY) * num:
            break
        best = threshold
    return best


def baselines(raw, labels, human_counts, start):
    """Each baseline's outcome at every human-label count of the loop."""
    from dinoprop import propagation_methods as pm
    from dinoprop.graph import knn_search

    _, y = np.unique(labels, return_inverse=True)
    x = pm.center_and_normalize(raw)
    neighbors, sims = knn_search(raw, 10)
    problem = pm.Problem(x, pm.Graph(neighbors, sims), int(y.max()) + 1)
    order = random_order(len(y), start)
    out = {"random + kNN vote": [], "random + LabelSpreading": []}
    for count in human_counts:
        seeds = np.sort(order[:count])
        out["random + kNN vote"].append(knn_baseline(problem, y, seeds))
        out["random + LabelSpreading"].append(label_spreading_baseline(x, y, seeds))
    return out


# ------------------------------------------------------------ reporting


def best_stop(rows):
    """The cheapest stop whose dataset is really at the target, or None."""
    ok = [r for r in rows if r["accuracy"] >= TARGET_ACCURACY]
    return min(ok, key=lambda r: r["cost"]) if ok else None


def recommended_stop(rows):
    """The first round whose stop plan recommends stopping (else the last)."""
    return next((r for r in rows if r["recommend_stop"]), rows[-1])


#: Stability is measured from this round on: the first rounds, with a few
#: dozen seeds, move the accepted share by design.
STABLE_FROM_ROUND = 5


def stability(rows, key="accepted_ids"):
    """Share of the accepted labels still accepted a round later (mean), and
    the largest change of the accepted count between rounds, from
    :data:`STABLE_FROM_ROUND` on."""
    rows = [r for r in rows if r["round"] >= STABLE_FROM_ROUND]
    kept, swing = [], 0.0
    for before, after in zip(rows, rows[1:]):
        a, b = set(before[key].tolist()), set(after[key].tolist())
        if a:
            kept.append(len(a & b) / len(a))
        swing = max(swing, abs(len(b) - len(a)))
    return (float(np.mean(kept)) if kept else None), swing


def run_dataset(name, starts):
    """The loops of one dataset: every start, with its baselines."""
    import logging

    from propagation import features

    # the loop's early runs warn that nothing reaches 95% precision yet
    logging.getLogger("dinoprop").setLevel(logging.ERROR)
    raw, labels = features(name)
    num = len(labels)
    per_start = []
    for start in range(starts):
        tick = time.perf_counter()
        rows = dinoprop_loop(name, raw, labels, start)
        base = baselines(raw, labels, [r["human"] for r in rows], start)
        per_start.append({"rows": rows, "baselines": base, "seconds": time.perf_counter() - tick})
    return {"num": num, "starts": per_start}


def run_all(names, starts):
    """Each dataset's loops, the datasets in parallel processes (one core
    each) when there are several."""
    if len(names) == 1:
        return {names[0]: run_dataset(names[0], starts)}
    import concurrent.futures
    import multiprocessing

    import fiftyone.core.odm as foo

    foo.get_db_conn()  # the database starts here, once, before the workers

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(names), mp_context=context) as pool:
        futures = {name: pool.submit(run_dataset, name, starts) for name in names}
        return {name: future.result() for name, future in futures.items()}


def summarize(name, result):
    num = result["num"]
    keys = ("best", "recommended", "rec_accuracy", "rec_precision", "precision_rule")
    values = {k: [] for k in keys}
    base = {}
    for run in result["starts"]:
        rows = run["rows"]
        best, rec = best_stop(rows), recommended_stop(rows)
        values["best"].append(best["cost"] / num if best else 1.0)
        values["recommended"].append(rec["cost"] / num)
        values["rec_accuracy"].append(rec["accuracy"])
        values["rec_precision"].append(rec["precision"] or 0.0)
        rule = [r["precision_rule_cost"] for r in rows if r["precision_rule_accuracy"] >= TARGET_ACCURACY]
        values["precision_rule"].append(min(rule) / num if rule else 1.0)
        for label, outcomes in run["baselines"].items():
            b = best_stop(outcomes)
            base.setdefault(label, []).append(b["cost"] / num if b else 1.0)
    out = {k: float(np.mean(v)) for k, v in values.items()}
    out["baselines"] = {"label everything": 1.0, **{k: float(np.mean(v)) for k, v in base.items()}}
    return out


def round_table(name, result) -> list:
    """The per-round table of the first start."""
    run = result["starts"][0]
    num = result["num"]
    lines = [
        "### %s, start 0: every round" % name, "",
        "| round | human labels | accepted | precision of accepted | cost of stopping | "
        "dataset accuracy if stopped | estimated | next-batch saving forecast | "
        "precision-rule cost | kNN cost (acc) | LabelSpreading cost (acc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    knn, ls = run["baselines"]["random + kNN vote"], run["baselines"]["random + LabelSpreading"]
    for r, k, s in zip(run["rows"], knn, ls):
        lines.append(
            "| %d%s | %d | %d | %s | %d (%.1f%%) | %.2f%% | %.2f%% | %s | %d (%.2f%%) | %d (%.2f%%) | %d (%.2f%%) |"
            % (r["round"], " **stop**" if r["recommend_stop"] else "", r["human"], r["accepted"],
               "%.2f%%" % (100 * r["precision"]) if r["precision"] is not None else "-",
               r["cost"], 100 * r["cost"] / num, 100 * r["accuracy"], 100 * r["estimated_accuracy"],
               "-" if r["saving"] is None else "%.0f" % r["saving"],
               r["precision_rule_cost"], 100 * r["precision_rule_accuracy"],
               k["cost"], 100 * k["accuracy"], s["cost"], 100 * s["accuracy"])
        )
    return lines


def report(results, summaries, args) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Annotation-effort benchmark",
        "",
        "Measured %s on %s (%d cores), 1-minute load %.1f; `%s`."
        % (datetime.date.today().isoformat(), platform.processor() or platform.machine(),
           os.cpu_count(), load, "annotation_loop.py" + (" --quick" if args.quick else "")),
        "",
        "Cost = human labels until every sample is labeled and the dataset is at least "
        "95%% right, as a share of N; mean over %d start(s). Batches of %d suggestions. "
        "Every baseline figure is its best stop, chosen with the truth, like dinoprop's "
        "best stop; dinoprop's recommended stop uses no truth." % (args.starts, BATCH),
        "",
        "| dataset | N | dinoprop best stop | dinoprop recommended stop | its accuracy | "
        "its accepted precision | dinoprop runs, precision rule | random + kNN vote | "
        "random + LabelSpreading | label everything |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        b = s["baselines"]
        lines.append(
            "| %s | %d | **%.1f%%** | %.1f%% (%.2fx best) | %.2f%% | %.2f%% | %.1f%% | %.1f%% | %.1f%% | 100%% |"
            % (name, results[name]["num"], 100 * s["best"], 100 * s["recommended"],
               s["recommended"] / s["best"], 100 * s["rec_accuracy"], 100 * s["rec_precision"],
               100 * s["precision_rule"], 100 * b["random + kNN vote"],
               100 * b["random + LabelSpreading"])
        )
    lines += ["", "Stability from round %d on (start 0): accepted labels still accepted "
              "a round later, and the largest change of the accepted count between rounds, "
              "for the stop plan and for the precision threshold:" % STABLE_FROM_ROUND, ""]
    for name, result in results.items():
        rows = result["starts"][0]["rows"]
        kept, swing = stability(rows)
        kept_p, swing_p = stability(rows, "precision_rule_accepted")
        lines.append("- %s: stop plan %.1f%% kept, largest swing %d labels (%.1f%% of N); "
                     "precision rule %.1f%% kept, largest swing %d (%.1f%%)"
                     % (name, 100 * (kept or 0), swing, 100 * swing / result["num"],
                        100 * (kept_p or 0), swing_p, 100 * swing_p / result["num"]))
    lines += ["", "Seconds per start (loop + baselines): " + ", ".join(
        "%s %s" % (n, "/".join("%.0f" % s["seconds"] for s in r["starts"])) for n, r in results.items())]
    for name, result in results.items():
        lines += [""] + round_table(name, result)
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="clothing-small, 1 start")
    parser.add_argument("--starts", type=int, default=None, help="random starts (default 5; 1 with --quick)")
    parser.add_argument("--datasets", nargs="+", default=None)
    parser.add_argument("--max-rounds", type=int, default=MAX_ROUNDS, help="rounds per loop at most")
    args = parser.parse_args()
    os.environ["DINOPROP_BENCH_MAX_ROUNDS"] = str(args.max_rounds)
    args.starts = args.starts or (1 if args.quick else NUM_STARTS)
    names = args.datasets or (["clothing-small"] if args.quick else ["clothing-small", "cifar10-test"])
    use_private_database()
    results = run_all(names, args.starts)
    summaries = {name: summarize(name, results[name]) for name in names}
    text = report(results, summaries, args)
    print(text)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    print(json.dumps({
        "effort_fraction": {n: round(s["best"], 4) for n, s in summaries.items()},
        "recommended_stop_effort_fraction": {n: round(s["recommended"], 4) for n, s in summaries.items()},
        "final_accuracy": {n: round(s["rec_accuracy"], 4) for n, s in summaries.items()},
        "accepted_precision": {n: round(s["rec_precision"], 4) for n, s in summaries.items()},
        "baseline_effort_fraction": {n: {k: round(v, 4) for k, v in s["baselines"].items()}
                                     for n, s in summaries.items()},
    }))


if __name__ == "__main__":
    main()
