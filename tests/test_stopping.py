"""When to stop labeling: the stop plan, its forecast, representative
calibration, and suggestions that reuse a fresh propagation."""

import numpy as np
import pytest

import dinoprop
from dinoprop import propagation_methods as pm
from dinoprop import seeds as sd
from dinoprop.core import DinopropError
from dinoprop.graph import knn_search
from dinoprop.propagation_methods import auto


# ------------------------------------------------------------ the plan


def test_stop_plan_accepts_the_most_confident_within_the_error_budget():
    confidence = np.array([0.99] * 80 + [0.9] * 10 + [0.5] * 10)
    # 100 targets + 100 human labels: budget 5% of 200 = 10 errors
    plan = pm.stop_plan(confidence, num_human=100, target_accuracy=0.95, margin_sigmas=0)
    # 80 x 0.01 + 10 x 0.1 = 1.8 errors fit; the 0.5s would add 5 more: 6.8 fit too
    assert plan.num_accepted == 100 and plan.threshold == 0.5
    assert plan.cost == 100 and plan.num_to_label == 0
    assert plan.estimated_errors == pytest.approx(6.8)
    assert plan.estimated_accuracy == pytest.approx(1 - 6.8 / 200)

    # with 20 human labels the budget is 6 errors: the 0.5s no longer fit
    tight = pm.stop_plan(confidence, num_human=20, margin_sigmas=0)
    assert tight.num_accepted == 90 and tight.threshold == 0.9
    assert tight.num_to_label == 10 and tight.cost == 30


def test_stop_plan_keeps_a_margin_and_never_splits_equal_confidences():
    confidence = np.full(1000, 0.95)
    # expected errors 50 = the budget exactly; with a margin, none fit, and
    # a tie group is never cut in the middle
    plan = pm.stop_plan(confidence, num_human=0)
    assert plan.num_accepted == 0 and plan.threshold == 1.0 and plan.cost == 1000
    loose = pm.stop_plan(confidence, num_human=0, margin_sigmas=0)
    assert loose.num_accepted == 1000
    empty = pm.stop_plan(np.array([]), num_human=5)
    assert empty.num_accepted == 0 and empty.cost == 5


def test_forecast_waits_for_a_trend_then_recommends_stopping_when_flat():
    falling = [[20 + 40 * i, 2000 - 100 * i] for i in range(6)]
    assert pm.stopping_forecast(falling[:5])["next_batch_saving"] is None
    forecast = pm.stopping_forecast(falling)
    assert forecast["next_batch_saving"] == 100.0 and forecast["trend_cost"] == 1500.0
    assert forecast["recommend_stop"] is False and forecast["stop_reason"] is None

    # flat on average, but within the noise of its runs: one low run is no
    # evidence that the cost stopped falling
    noisy = falling + [[260 + 40 * i, c] for i, c in enumerate([1500, 1380, 1520, 1490, 1510, 1480])]
    forecast = pm.stopping_forecast(noisy)
    assert forecast["next_batch_saving"] < 0 < forecast["next_batch_saving"] + forecast["saving_stderr"]
    assert forecast["recommend_stop"] is False

    # rising beyond the noise: the batches no longer pay
    rising = falling + [[260 + 40 * i, c] for i, c in enumerate([1500, 1530, 1530, 1570, 1580, 1600])]
    forecast = pm.stopping_forecast(rising)
    assert forecast["next_batch_saving"] + forecast["saving_stderr"] <= 0
    assert forecast["recommend_stop"] is True and forecast["stop_reason"] == "no_saving"

    # rising, but this run jumped above the trend: one more batch, not a stop
    spike = rising[:-1] + [[460, 1700]]
    forecast = pm.stopping_forecast(spike)
    assert forecast["next_batch_saving"] <= 0 and forecast["recommend_stop"] is False

    # a re-run with the same labels replaces that point; fewer labels restart
    assert pm.stopping_forecast(falling + [[220, 1500]])["next_batch_saving"] == 100.0
    assert pm.stopping_forecast(falling + [[20, 2000]])["next_batch_saving"] is None


def test_forecast_stops_when_the_labels_left_fit_in_one_batch():
    # 2 runs, no trend yet: 1000 human labels and 30 left to label by hand
    forecast = pm.stopping_forecast([[960, 1100], [1000, 1030]])
    assert forecast["next_batch_saving"] is None
    assert forecast["recommend_stop"] is True and forecast["stop_reason"] == "one_batch_left"
    assert pm.stopping_forecast([[960, 1100], [1000, 1041]])["recommend_stop"] is False
    assert pm.stopping_forecast([[1000, 1030]])["recommend_stop"] is False  # no batch size yet


def test_a_recommended_finish_keeps_to_the_trend_not_to_a_lucky_run():
    confidence = np.linspace(0.999, 0.99, 900).tolist() + [0.5] * 200
    confidence = np.array(confidence)
    alone = pm.stop_plan(confidence, num_human=500)
    # the cost rose by 40 a batch until this run's bold plan came in below the line
    history = [[300 + 40 * i, alone.cost - 160 + 40 * i] for i in range(5)]
    plan = pm.plan_stop(confidence, 500, history)
    assert plan["recommend_stop"] is True and plan["stop_reason"] == "no_saving"
    assert plan["cost"] >= plan["trend_cost"] > alone.cost
    assert plan["num_held_back"] == alone.num_accepted - plan["num_accepted"] > 0
    assert plan["num_accepted"] + plan["num_to_label"] == len(confidence)
    assert plan["estimated_accuracy"] > alone.estimated_accuracy
    # the run's own cost is what the loop's history keeps
    assert plan["history"][-1] == [500, alone.cost]
    assert "labels fewer than this run alone would accept: its cost is below the trend" in plan["advice"]

    # a cap inside a group of equal confidences keeps the whole group
    tied = np.array([0.995] * 900 + [0.5] * 200)
    tied_plan = pm.plan_stop(tied, 500, [[300 + 40 * i, 540 + 40 * i] for i in range(5)])
    assert tied_plan["trend_cost"] > 700 and tied_plan["num_accepted"] == 900

    # not recommended: the plan is the run's own
    rising = [[300 + 40 * i, alone.cost + 400 - 40 * i] for i in range(5)]
    own = pm.plan_stop(confidence, 500, rising)
    assert own["recommend_stop"] is False and own["num_held_back"] == 0
    assert own["cost"] == alone.cost and own["threshold"] == alone.threshold


def test_a_recommended_finish_keeps_a_larger_reserve():
    rng = np.random.default_rng(0)
    confidence = np.clip(rng.beta(12, 1, 2000), 0.3, 0.999)
    alone = pm.stop_plan(confidence, num_human=500)
    # the cost has stayed flat: the next batch saves nothing, and this run
    # is on the line
    history = [[300 + 40 * i, alone.cost] for i in range(5)]
    plan = pm.plan_stop(confidence, 500, history)
    assert plan["recommend_stop"] is True and plan["trend_cost"] <= alone.cost
    reserved = pm.stop_plan(confidence, 500, margin_sigmas=pm.FINISH_MARGIN_SIGMAS)
    assert plan["num_accepted"] == reserved.num_accepted < alone.num_accepted
    assert plan["num_held_back"] == alone.num_accepted - reserved.num_accepted
    assert plan["estimated_accuracy"] > alone.estimated_accuracy >= 0.95
    assert "a finish keeps 2 standard deviations of its error count in reserve" in plan["advice"]


def test_advice_names_the_finish_and_the_forecast():
    plan = pm.stop_plan(np.array([0.99] * 50 + [0.6] * 50), num_human=10).to_dict()
    keep = pm.stop_advice(plan, {"next_batch": 40, "next_batch_saving": 12.0, "saving_stderr": 3.0})
    assert keep.startswith("Keep labeling") and "save 12 (+/- 3) labels" in keep
    assert "accept the %d labels" % plan["num_accepted"] in keep
    stop = pm.stop_advice(plan, {"next_batch": 40, "next_batch_saving": -3.0, "recommend_stop": True})
    assert stop.startswith("Stop labeling seeds: the last batches saved nothing")
    last = pm.stop_advice(plan, {"next_batch": 40, "recommend_stop": True, "stop_reason": "one_batch_left"})
    assert "fit in one more batch" in last
    noisy = pm.stop_advice(plan, {"next_batch": 40, "next_batch_saving": -3.0, "saving_stderr": 9.0})
    assert noisy.startswith("Label one more batch") and "-3 +/- 9 labels" in noisy
    above = pm.stop_advice(plan, {"next_batch": 40, "next_batch_saving": -30.0, "saving_stderr": 9.0})
    assert above.startswith("Label one more batch") and "above their trend" in above


# ------------------------------------------------- representative seeds


def test_nearest_seed_counts_split_the_graph_between_seeds():
    # a chain 0-1-2-...-9: seeds at 0 and 9 share it half and half
    num = 10
    neighbors = np.array([[max(i - 1, 0), min(i + 1, num - 1)] for i in range(num)])
    sims = np.full((num, 2), 0.9, np.float32)
    graph = pm.Graph(neighbors, sims)
    assert pm.nearest_seed_counts(graph, np.array([0, 9])).tolist() == [5, 5]
    assert pm.nearest_seed_counts(graph, np.array([0, 3])).tolist() == [2, 8]


def test_weighted_temperature_fit_equals_the_fit_on_the_weighted_seeds():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, 200)
    labels = np.where(rng.random(200) < 0.6, probs.argmax(1), rng.integers(0, 4, 200))
    weights = np.where(np.arange(200) < 100, 1.0, 0.0)
    assert pm.fit_temperature(probs, labels, weights) == pytest.approx(
        pm.fit_temperature(probs[:100], labels[:100]), rel=1e-3
    )
    assert pm.effective_count(weights) == pytest.approx(100)
    # fewer effective seeds leave the temperature looser
    assert pm.temperature_spread(probs, labels, weights) > pm.temperature_spread(probs, labels)


def _crowded_seeds(seed=0):
    """Two classes; one confused region where most seeds crowd (as
    uncertainty sampling puts them) and a large easy region with few."""
    rng = np.random.default_rng(seed)
    easy = np.concatenate([rng.normal(-3, 0.7, (400, 2)), rng.normal(3, 0.7, (400, 2))])
    easy_y = np.repeat([0, 1], 400)
    hard = rng.normal(0, 0.7, (200, 2))
    hard_y = rng.integers(0, 2, 200)
    x = np.hstack([np.vstack([easy, hard]), np.zeros((1000, 1)) + 1]).astype(np.float32)
    y = np.concatenate([easy_y, hard_y])
    seeds = np.concatenate([rng.choice(400, 4, replace=False), 400 + rng.choice(400, 4, replace=False),
                            800 + rng.choice(200, 60, replace=False)])
    return x, y, seeds


def test_crowded_seeds_stand_for_less_of_the_data():
    x, y, seeds = _crowded_seeds()
    neighbors, sims = knn_search(x, 10)
    weights = pm.seed_weights(pm.Graph(neighbors, sims), seeds)
    assert weights[:8].mean() > 3 * weights[8:].mean()


def test_weighting_crowded_seeds_brings_the_estimated_errors_near_the_truth(monkeypatch):
    # seeds crowding a confused corner, as active learning puts them: fitted
    # on them equally, the calibration sees the easy bulk as uncertain
    x, y, seeds = _crowded_seeds()
    neighbors, sims = knn_search(x, 10)
    problem = pm.Problem(pm.center_and_normalize(x), pm.Graph(neighbors, sims), 2)
    targets = np.setdiff1d(np.arange(len(y)), seeds)

    def estimated_and_true_errors():
        probs = pm.propagate(problem, seeds, y[seeds]).probs[targets]
        return (1.0 - probs.max(axis=1)).sum(), (probs.argmax(axis=1) != y[targets]).sum()

    weighted, true = estimated_and_true_errors()
    monkeypatch.setattr(auto, "seed_weights", lambda graph, idx: np.ones(len(idx)))
    uniform, same_true = estimated_and_true_errors()
    assert same_true == true  # the weights move confidences, not labels
    assert true < weighted < uniform
    assert weighted - true < 0.6 * (uniform - true)


def _uncertain_clusters(seed):
    """Five overlapping clusters, 3 seeds each, and the 40 samples
    ``suggest`` asks about next, appended to the seeds."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, 12)) * 2
    y = np.repeat(np.arange(5), 120)
    x = (centers[y] + rng.normal(size=(len(y), 12)) * 1.6).astype(np.float32)
    first = np.concatenate([rng.choice(np.flatnonzero(y == c), 3, replace=False) for c in range(5)])
    neighbors, sims = knn_search(x, 10)
    problem = pm.Problem(pm.center_and_normalize(x), pm.Graph(neighbors, sims), 5)
    asked = sd.suggest(problem.x, problem.graph, first, list(y[first]), 40)
    return problem, y, np.concatenate([first, asked]), np.arange(len(first), len(first) + 40)


def test_checked_predictions_bring_the_estimated_errors_nearer_the_truth():
    # the loop asks about the samples it is least sure of, so the held-out
    # seeds make the targets look less certain than they are; the asked
    # samples, scored as the run before them scored them, say how often
    # predictions like theirs are right
    gaps = []
    for seed in range(8):
        problem, y, seeds, asked = _uncertain_clusters(seed)
        targets = np.setdiff1d(np.arange(len(y)), seeds)
        estimated = []
        for checked in ({}, {"new_seeds": asked}):
            probs = pm.propagate(problem, seeds, y[seeds], **checked).probs[targets]
            estimated.append((1.0 - probs.max(axis=1)).sum())
            true = (probs.argmax(axis=1) != y[targets]).sum()  # the same either way
        gaps.append(np.abs(np.array(estimated) - true))
    without, checked = np.array(gaps).T
    assert (checked < without).sum() >= 6
    assert checked.sum() < 0.8 * without.sum()


def _label_with_truth(dataset, ids):
    for sample in dataset.select(ids):
        sample["label"] = sample.ground_truth.copy()
        sample.save()


def test_each_run_checks_its_predictions_for_the_suggested_samples_labeled_next(embedded_dataset):
    dataset = embedded_dataset
    first = dinoprop.propagate_labels(dataset, "label", method="graph_linear")
    assert first.summary()["num_checked_predictions"] == 0 and first.checked_ids == []
    predicted = dict(zip(*dataset.values(["id", "label_propagated.label"])))
    suggested = dinoprop.suggest_seeds(dataset, 3, "label", progress=False)
    unasked = next(i for i, label in predicted.items() if label and i not in suggested)
    _label_with_truth(dataset, suggested + [unasked])
    second = dinoprop.propagate_labels(dataset, "label", method="graph_linear")
    # only the suggestions: the loop asked for them by the scores alone
    assert sorted(second.checked_ids) == sorted(suggested)
    assert second.summary()["num_checked_predictions"] == 3
    # each is what the propagation predicted before the human labeled it
    assert [second.classes[int(np.argmax(p))] for p in second.checked_probs] == [
        predicted[i] for i in second.checked_ids
    ]
    # a sample unlabeled again drops out; the others are handed on
    sample = dataset[suggested[0]]
    sample["label"] = None
    sample.save()
    third = dinoprop.propagate_labels(dataset, "label", method="graph_linear")
    assert sorted(third.checked_ids) == sorted(suggested[1:])
    reloaded = dataset.load_run_results(third.key, cache=False)
    assert reloaded.checked_ids == third.checked_ids
    assert reloaded.summary()["num_checked_predictions"] == 2


def test_summary_plans_the_stop_and_the_history_grows(embedded_dataset):
    dataset = embedded_dataset
    summary = dinoprop.propagate_labels(dataset, "label").summary()
    plan = summary["stop_plan"]
    assert plan["num_human"] == 6 and plan["num_accepted"] + plan["num_to_label"] == 18
    assert plan["cost"] == 6 + plan["num_to_label"]
    assert plan["history"] == [[6, plan["cost"]]]
    assert plan["next_batch_saving"] is None and plan["recommend_stop"] is False
    assert plan["advice"].startswith("Stopping now would")

    # the plan's threshold accepts exactly the plan's labels
    confidences = [c for c in dataset.values("label_propagated.confidence") if c is not None]
    assert sum(c >= plan["threshold"] for c in confidences) == plan["num_accepted"]

    # more human labels: the history carries over under the same run key
    truth = dataset.values("ground_truth")
    unlabeled = [s.id for s in dataset.select_fields("label") if s.label is None][:3]
    dataset.select(unlabeled).set_values(
        "label", [t for s, t in zip(dataset.values("id"), truth) if s in unlabeled]
    )
    again = dinoprop.propagate_labels(dataset, "label").summary()["stop_plan"]
    assert [h[0] for h in again["history"]] == [6, 9]
    reloaded = dataset.load_run_results(summary["run_key"], cache=False).summary()
    assert reloaded["stop_plan"]["history"] == again["history"]


def test_target_accuracy_is_checked(embedded_dataset):
    with pytest.raises(DinopropError, match="target_accuracy"):
        dinoprop.propagate_labels(embedded_dataset, "label", target_accuracy=1.5)
    assert "label_propagated" not in embedded_dataset.get_field_schema()


def test_suggestions_reuse_a_fresh_propagation(embedded_dataset, monkeypatch):
    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    calls = []
    real = pm.propagate
    monkeypatch.setattr(sd.pm, "propagate", lambda *a, **k: calls.append(1) or real(*a, **k))

    picks = dinoprop.suggest_seeds(dataset, 4, "label")
    assert calls == []  # the run had just propagated these seeds
    # the stored probabilities suggest what a fresh propagation suggests
    monkeypatch.setattr(sd, "_stored_probabilities", lambda *a: None)
    assert dinoprop.suggest_seeds(dataset, 4, "label") == picks
    assert calls == [1]

    # a new label makes the run stale: the seeds are propagated anew
    dataset.select(picks[:1]).set_values("label", dataset.select(picks[:1]).values("ground_truth"))
    monkeypatch.undo()
    monkeypatch.setattr(sd.pm, "propagate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert len(dinoprop.suggest_seeds(dataset, 4, "label")) == 4
    assert calls == [1, 1]
