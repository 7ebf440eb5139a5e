"""Label propagation: methods on arrays, the FiftyOne run, objects, errors."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fiftyone as fo

import dinoprop
from dinoprop import propagation_methods as pm
from dinoprop import review
from dinoprop.core import DinopropError, l2_normalize
from dinoprop.propagation.common import CONFIDENCE_TOLERANCE
from dinoprop.graph import knn_search


# ------------------------------------------------------------ array level


def _clusters(num_classes=4, per_class=60, dim=12, spread=0.6, seed=0):
    """Gaussian clusters on the sphere, with labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * 2
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centers[labels] + rng.normal(size=(len(labels), dim)) * spread
    return x.astype(np.float32), labels


def _problem(x, num_classes, k=10):
    neighbors, sims = knn_search(x, k)
    return pm.Problem(pm.center_and_normalize(x), pm.Graph(neighbors, sims), num_classes)


def _seeds(labels, per_class, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
         for c in np.unique(labels)]
    )


@pytest.mark.parametrize("method", pm.METHODS)
def test_each_method_is_accurate_on_clustered_data(method):
    x, labels = _clusters()
    problem = _problem(x, 4)
    seeds = _seeds(labels, 3)
    result = pm.propagate(problem, seeds, labels[seeds], method=method)
    targets = np.setdiff1d(np.arange(len(labels)), seeds)
    accuracy = (result.probs[targets].argmax(1) == labels[targets]).mean()
    assert accuracy > 0.95
    assert result.probs.shape == (len(labels), 4)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-4)



def test_the_last_scoring_frees_the_graph_features_and_scores_the_same():
    x, labels = _clusters()
    seeds = _seeds(labels, 3)
    kept, freed = _problem(x, 4), _problem(x, 4)
    expected = kept.scores("graph_linear", seeds, labels[seeds])
    got = freed.scores("graph_linear", seeds, labels[seeds], last=True)
    np.testing.assert_array_equal(got, expected)
    assert kept._xg is not None and freed._xg is None and not freed._linear_cache

def test_diffusion_follows_the_graph_where_prototypes_fail():
    """Two interleaved half-moons: only graph methods follow the manifold."""
    from sklearn.datasets import make_moons

    x, labels = make_moons(400, noise=0.04, random_state=0)
    # on the sphere around a far origin, cosine neighbours are Euclidean ones
    x = np.hstack([x, np.full((len(x), 1), 20.0)]).astype(np.float32)
    neighbors, sims = knn_search(x, 10)
    problem = pm.Problem(pm.center_and_normalize(x), pm.Graph(neighbors, sims), 2)
    seeds = np.concatenate(
        [np.flatnonzero(labels == c)[[0, 100, 199]] for c in (0, 1)]
    )
    diff = problem.scores("diffusion", seeds, labels[seeds])
    lin = problem.scores("linear", seeds, labels[seeds])
    assert (diff.argmax(1) == labels).mean() > 0.95
    assert (diff.argmax(1) == labels).mean() > (lin.argmax(1) == labels).mean()


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8, 0.95])
def test_score_smoothing_reaches_its_tolerance_at_every_strength(alpha):
    from dinoprop.propagation_methods.methods import SMOOTHING_TOLERANCE, smooth_scores

    x, labels = _clusters(num_classes=5, per_class=80, spread=1.2)
    graph = _problem(x, 5).graph
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=len(labels)).astype(np.float32)
    seeds = _seeds(labels, 3)
    default = smooth_scores(graph, probs, seeds, labels[seeds], alpha=alpha)
    exact = smooth_scores(graph, probs, seeds, labels[seeds], alpha=alpha, maxiter=500)
    assert np.abs(default - exact).max() <= SMOOTHING_TOLERANCE
    fewer = smooth_scores(graph, probs, seeds, labels[seeds], alpha=alpha, maxiter=1)
    assert np.abs(fewer - exact).max() > np.abs(default - exact).max()


def test_diffusion_is_class_balanced():
    """A class with many more seeds must not flood the other class."""
    x, labels = _clusters(num_classes=2, per_class=100)
    problem = _problem(x, 2)
    seeds = np.concatenate(
        [np.flatnonzero(labels == 0)[:40], np.flatnonzero(labels == 1)[:2]]
    )
    probs = problem.scores("diffusion", seeds, labels[seeds])
    assert (probs.argmax(1) == labels).mean() > 0.95


def test_auto_keeps_default_unless_another_method_is_clearly_better():
    x, labels = _clusters(seed=3)
    problem = _problem(x, 4)
    seeds = _seeds(labels, 6)
    result = pm.propagate(problem, seeds, labels[seeds], method="auto")
    assert result.method in pm.AUTO_CANDIDATES
    assert set(result.cv_accuracy) == set(pm.AUTO_CANDIDATES)
    best = max(result.cv_accuracy.values())
    # never worse than the best candidate by more than the noise allowance
    assert result.cv_accuracy[result.method] >= best - 0.1
    assert result.num_folds == 5


def _noisy_predictions(num, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, num)
    logits = rng.normal(size=(num, 3))
    logits[np.arange(num), labels] += 1.0
    return pm.softmax(logits * 6), labels


def test_calibration_fixes_overconfidence():
    """Temperature scaling moves confidences toward the observed accuracy."""
    overconfident, labels = _noisy_predictions(400)
    temperature = pm.fit_temperature(overconfident, labels)
    assert temperature > 2
    calibrated = pm.calibrate(overconfident, temperature)
    correct = overconfident.argmax(1) == labels
    before = pm.expected_calibration_error(overconfident.max(1), correct)
    after = pm.expected_calibration_error(calibrated.max(1), correct)
    assert after < before / 2
    assert after < 0.08
    # argmax is unchanged by temperature scaling
    np.testing.assert_array_equal(calibrated.argmax(1), overconfident.argmax(1))


def test_temperature_spread_reflects_how_many_seeds_checked_it():
    """A temperature fitted on 40 seeds is looser than one fitted on 4,000,
    by about sqrt(100)."""
    spreads = []
    for num in (40, 4000):
        probs, labels = _noisy_predictions(num)
        spreads.append(pm.temperature_spread(probs, labels))
    assert spreads[0] > 0 and spreads[1] > 0
    assert 5 < spreads[0] / spreads[1] < 20


def test_uncertain_temperature_tempers_the_top_confidences():
    """Averaging over a loose temperature lowers the most confident
    predictions, keeps every predicted class, and spread 0 is plain
    temperature scaling."""
    probs, labels = _noisy_predictions(40)
    temperature = pm.fit_temperature(probs, labels)
    spread = pm.temperature_spread(probs, labels)
    plain = pm.calibrate(probs, temperature, shrink=0.02)
    averaged = pm.calibrate(probs, temperature, shrink=0.02, log_spread=spread)
    by_formula = 0.98 * pm.softmax(np.log(np.clip(probs, 1e-6, None)), temperature) + 0.02 / 3
    np.testing.assert_allclose(plain, by_formula, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(averaged.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(averaged.argmax(1), probs.argmax(1))
    top = plain.max(1) > 0.75
    assert top.any()
    assert np.all(averaged.max(1)[top] < plain.max(1)[top])


def test_propagation_is_calibrated_by_cross_validation():
    x, labels = _clusters(num_classes=5, per_class=120, spread=1.6, seed=1)
    problem = _problem(x, 5)
    seeds = _seeds(labels, 10)
    result = pm.propagate(problem, seeds, labels[seeds])
    targets = np.setdiff1d(np.arange(len(labels)), seeds)
    conf = result.probs[targets].max(1)
    correct = result.probs[targets].argmax(1) == labels[targets]
    assert 0.6 < correct.mean() < 1.0  # a problem with real uncertainty
    assert pm.expected_calibration_error(conf, correct) < 0.1
    assert result.oof_probs.shape == (len(seeds), 5)


def test_new_seeds_are_scored_as_the_run_before_them_would_have():
    x, labels = _clusters(num_classes=4, per_class=60, spread=1.2)
    problem = _problem(x, 4)
    seeds = np.concatenate([_seeds(labels[:180], 6), [200, 201]])  # class 3 only new
    new = np.array([3, 9, 15, 18, 19])  # classes 0, 1, 2, 3, 3
    result = pm.propagate(problem, seeds, labels[seeds], method="graph_linear", new_seeds=new)
    # seeds of a class the other seeds lack could not have been predicted
    np.testing.assert_array_equal(result.checked.positions, new[:3])
    others = np.setdiff1d(np.arange(len(seeds)), new)
    before = problem.scores("graph_linear", seeds[others], labels[seeds][others])
    np.testing.assert_allclose(
        result.checked.probs, np.maximum(before[seeds[new[:3]]], 1e-6), rtol=1e-5, atol=1e-7
    )
    # what was handed in is handed on, the new predictions after it
    again = pm.propagate(
        problem, seeds, labels[seeds], method="graph_linear",
        checked=result.checked, new_seeds=np.array([0]),
    )
    np.testing.assert_array_equal(again.checked.positions, [3, 9, 15, 0])


def test_checked_predictions_follow_their_seeds_and_classes():
    checked = pm.CheckedPredictions(
        np.array([0, 1, 2]), np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]], np.float32)
    )
    later = checked.remapped([4, -1, 0], ["a", "b"], ["a", "c", "b"])
    np.testing.assert_array_equal(later.positions, [4, 0])
    np.testing.assert_allclose(later.probs, [[0.7, 0, 0.3], [0.6, 0, 0.4]])


def test_a_checked_prediction_of_a_class_its_run_did_not_know_is_left_out():
    x, labels = _clusters(num_classes=3, per_class=60, spread=1.2)
    problem = _problem(x, 3)
    seeds = _seeds(labels, 6)

    def temperature(checked):
        return pm.propagate(problem, seeds, labels[seeds], method="graph_linear", checked=checked).temperature

    of = labels[seeds]
    confident = np.full((2, 3), 0.01, np.float32)
    confident[0, of[0]] = confident[1, of[1]] = 0.98
    known = pm.CheckedPredictions(np.array([0, 1]), confident)
    blind = confident.copy()
    blind[1] = 0.5
    blind[1, of[1]] = 0.0  # its run had no column for this seed's class
    assert temperature(known) != temperature(None)
    assert temperature(pm.CheckedPredictions(np.array([0, 1]), blind)) == temperature(
        pm.CheckedPredictions(np.array([0]), confident[:1])
    )


def test_one_seed_per_class_cannot_be_cross_validated():
    x, labels = _clusters()
    seeds = _seeds(labels, 1)
    result = pm.propagate(_problem(x, 4), seeds, labels[seeds])
    assert result.oof_probs is None and result.num_folds == 0
    assert result.method == pm.AUTO_CANDIDATES[0]


def test_top_classes_sorted_in_chunks_equal_a_full_sort():
    from dinoprop.propagation.samples import top_classes

    probs = np.random.default_rng(0).dirichlet(np.ones(6), 50).astype(np.float32)
    probs[::5, 1] = probs[::5, 2]  # ties keep class order
    probs[1::5] = 1 / 6  # uniform rows: every class ties
    probs[2::5, 3:] = 0.0  # ties across the 4th and 5th class
    probs[3::5, [0, 4, 5]] = probs[3::5, [2]]  # 4 classes tie at the top
    # many ties at every rank, where a partial sort scrambles tied classes
    coarse = np.round(np.random.default_rng(1).random((300, 20)) * 3) / 3
    for scores in (probs, coarse):
        full = np.argsort(-scores, axis=1, kind="stable")
        for num in (1, 3, 4, 6):
            assert np.array_equal(top_classes(scores, num, chunk=7), full[:, :num]), num
    assert top_classes(probs[:0], 4).shape == (0, 4)


def test_threshold_for_precision():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0], bool)
    threshold, coverage, precision = pm.threshold_for_precision(confidence, 0.95, correct)
    assert threshold == 0.9 and coverage == 0.5 and precision == 1.0
    # without truth, calibrated confidence is the promised precision
    threshold, coverage, _ = pm.threshold_for_precision(confidence, 0.9)
    assert threshold == 0.8 and coverage == pytest.approx(4 / 6)
    assert pm.threshold_for_precision(confidence, 1.0, ~correct)[1] == 0.0


def test_cross_validation_on_large_graphs_uses_the_seed_neighbourhood():
    x, labels = _clusters(num_classes=3, per_class=400, seed=2)
    problem = _problem(x, 3)
    seeds = _seeds(labels, 4)
    small = pm.propagate(problem, seeds, labels[seeds], cv_max_nodes=200)
    assert small.num_folds == 4
    targets = np.setdiff1d(np.arange(len(labels)), seeds)
    assert (small.probs[targets].argmax(1) == labels[targets]).mean() > 0.95


class _FixedScores:
    """A stand-in Problem whose candidates are right on a fixed share of
    nodes: ``good`` and ``close`` on all, ``bad`` on none."""

    def __init__(self, labels, num_classes):
        self.labels, self.num_classes = labels, num_classes
        self.calls = []

    def scores(self, name, seed_idx, seed_labels):
        self.calls.append(name)
        truth = self.labels if name != "bad" else (self.labels + 1) % self.num_classes
        return pm.one_hot(truth, self.num_classes)


def test_large_graph_cross_validation_drops_clearly_worse_candidates():
    """With ``prune`` (cross-validation on a large graph's subgraph), a
    candidate clearly worse than the default after a fold runs no more
    folds and is not chosen; without it every candidate runs every fold."""
    labels = np.repeat(np.arange(4), 25)
    folds = pm._seed_folds(labels, 5, 0)
    candidates = ["good", "close", "bad"]
    seed_idx = np.arange(len(labels))
    full = pm._out_of_fold(_FixedScores(labels, 4), seed_idx, labels, folds, candidates)
    assert all(len(p) == len(labels) for p in full.values())
    problem = _FixedScores(labels, 4)
    pruned = pm._out_of_fold(problem, seed_idx, labels, folds, candidates, prune=True)
    assert problem.calls.count("bad") == 1 and problem.calls.count("close") == 5
    assert len(pruned["bad"]) == len(folds[0])
    np.testing.assert_array_equal(pruned["good"], full["good"])
    held_out = labels[np.concatenate(folds)]
    assert pm._choose(pruned, held_out, candidates) == "good"


def test_auto_on_a_large_graph_reports_every_candidate():
    x, labels = _clusters(num_classes=3, per_class=400, seed=2)
    problem = _problem(x, 3)
    seeds = _seeds(labels, 10)
    result = pm.propagate(problem, seeds, labels[seeds], cv_max_nodes=300)
    assert set(result.cv_accuracy) == set(pm.AUTO_CANDIDATES)
    assert result.cv_accuracy[result.method] >= max(result.cv_accuracy.values()) - 0.1
    assert len(result.oof_labels) == len(seeds)


def test_affinity_is_sparse_and_symmetric():
    x, _ = _clusters()
    neighbors, sims = knn_search(x, 5)
    w = pm.affinity_matrix(neighbors, sims)
    assert w.nnz <= 2 * 5 * len(x)
    assert abs(w - w.T).max() < 1e-6
    assert w.diagonal().max() == 0


def test_graph_products_match_scipy():
    """The multi-core product and the in-place graph features give what
    the plain scipy formulas give."""
    x, _ = _clusters()
    x = pm.center_and_normalize(x)
    neighbors, sims = knn_search(x, 5)
    graph = pm.Graph(neighbors, sims)
    s_norm = pm.normalized_affinity(pm.affinity_matrix(neighbors, sims))
    parallel = pm.ParallelSparse(s_norm)
    np.testing.assert_allclose(parallel @ x, s_norm @ x, rtol=1e-5, atol=1e-6)
    graph._s_norm = parallel  # as on graphs of PARALLEL_MIN_NODES nodes
    smoothed = x
    for _ in range(2):
        smoothed = 0.5 * smoothed + 0.5 * (s_norm @ smoothed)
    expected = l2_normalize(np.hstack([x, l2_normalize(smoothed)]))
    np.testing.assert_allclose(pm.graph_features(x, graph), expected, rtol=1e-5, atol=1e-6)



def test_graph_features_hold_one_smoothed_copy_and_act_as_the_dense_array():
    """The propagation keeps N x D smoothed floats beside x, not an N x 2D
    copy, and its rows and products are those of the dense features."""
    x, labels = _clusters()
    problem = _problem(x, 4)
    features, dense = problem.xg, pm.graph_features(problem.x, problem.graph)
    assert features.shape == dense.shape
    assert features.x is problem.x and features.smoothed.nbytes == problem.x.nbytes
    rows = np.array([5, 0, 17])
    np.testing.assert_allclose(features[rows], dense[rows], rtol=1e-5, atol=1e-6)
    weights = np.random.default_rng(0).normal(size=(dense.shape[1], 3)).astype(np.float32)
    features.BLOCK_ROWS = 7  # several blocks, the last one short
    np.testing.assert_allclose(features @ weights, dense @ weights, rtol=1e-4, atol=1e-5)

# ---------------------------------------------------------- FiftyOne run


def test_propagate_labels_end_to_end(embedded_dataset):
    import fiftyone as fo

    dataset = embedded_dataset
    human_before = dataset.values("label", _allow_missing=True)
    human_before = [None if v is None else v.to_dict() for v in human_before]
    results = dinoprop.propagate_labels(dataset, "label", confidence_threshold=1.0)

    summary = results.summary()
    for key in (
        "method", "num_seeds", "num_classes", "num_propagated",
        "num_needs_review", "estimated_accuracy", "recommended_threshold",
        "coverage_at_threshold", "ece", "seconds", "run_key", "output_field",
    ):
        assert key in summary
    assert summary["num_seeds"] == 6 and summary["num_classes"] == 3
    assert summary["num_propagated"] == 18
    assert summary["output_field"] == "label_propagated"

    # outputs: a Classification with confidence on every target, None on seeds
    seeds, predicted, truth = dataset.values(
        ["label", "label_propagated", "ground_truth.label"]
    )
    accuracy = []
    for seed, pred, gt in zip(seeds, predicted, truth):
        if seed is not None:
            assert pred is None
            continue
        assert isinstance(pred, fo.Classification)
        assert 0.0 <= pred.confidence <= 1.0
        accuracy.append(pred.label == gt)
    assert np.mean(accuracy) > 0.9

    # human labels untouched
    after = [None if v is None else v.to_dict() for v in dataset.values("label")]
    assert after == human_before

    # review tags and the saved view, ascending confidence
    tagged = dataset.match_tags(dinoprop.propagation.NEEDS_REVIEW_TAG)
    assert len(tagged) == summary["num_needs_review"] == 18
    queue = dataset.load_saved_view("dinoprop review queue")
    confidences = queue.values("label_propagated.confidence")
    assert confidences == sorted(confidences)
    assert len(confidences) == 18

    # the run is recorded and reloads
    run_key = summary["run_key"]
    assert run_key in dataset.list_runs()
    info = dataset.get_run_info(run_key)
    assert info.config.label_field == "label" and info.config.k == 10
    dataset.clear_cache()
    loaded = dataset.load_run_results(run_key, cache=False)
    assert isinstance(loaded, dinoprop.propagation.PropagationResults)
    assert loaded.summary() == summary
    assert sorted(loaded.seed_ids) == sorted(dataset.exists("label").values("id"))

    # evaluate: from cross-validation, and against the truth
    estimate = results.evaluate()
    assert estimate["source"] == "cross_validation"
    assert estimate["num_evaluated"] == 6
    truth_eval = results.evaluate(gt_field="ground_truth")
    assert truth_eval["num_evaluated"] == 18
    assert truth_eval["accuracy"] == pytest.approx(np.mean(accuracy))
    assert 0 <= truth_eval["coverage_at_threshold"] <= 1
    assert len(truth_eval["accuracy_vs_coverage"]) == 10

    # renaming is reflected in the summary; deleting removes what it wrote
    dataset.rename_run(run_key, "renamed")
    assert dataset.load_run_results("renamed").summary()["run_key"] == "renamed"
    dataset.delete_run("renamed")
    assert dataset.list_runs() == []
    assert "label_propagated" not in dataset.get_field_schema()
    assert not dataset.has_saved_view("dinoprop review queue")
    assert len(dataset.match_tags(dinoprop.propagation.NEEDS_REVIEW_TAG)) == 0
    assert dataset.count("label") == 6  # human labels stay


def test_deleting_runs_removes_the_review_queue_with_the_newest(embedded_dataset):
    """The queue is the newest run's: deleting an older run keeps it, and
    deleting the newest removes it, even after its description was edited
    in the App."""
    dataset = embedded_dataset
    older = dinoprop.propagate_labels(
        dataset, "label", output_field="first", confidence_threshold=1.0, run_key="older"
    )
    dinoprop.propagate_labels(
        dataset, "label", output_field="second", confidence_threshold=1.0, run_key="newer"
    )
    queued = len(dataset.match_tags(dinoprop.propagation.NEEDS_REVIEW_TAG))
    assert queued == older.summary()["num_propagated"]
    dataset.delete_run("older")
    assert dataset.has_saved_view("dinoprop review queue")
    assert len(dataset.match_tags(dinoprop.propagation.NEEDS_REVIEW_TAG)) == queued
    dataset.update_saved_view_info("dinoprop review queue", {"description": "mine"})
    dataset.delete_run("newer")
    assert not dataset.has_saved_view("dinoprop review queue")
    assert len(dataset.match_tags(dinoprop.propagation.NEEDS_REVIEW_TAG)) == 0


def test_results_reload_in_a_fresh_process(embedded_dataset):
    dataset = embedded_dataset
    dataset.persistent = True
    try:
        results = dinoprop.propagate_labels(dataset, "label", method="knn")
        script = textwrap.dedent(
            """
            import fiftyone as fo
            dataset = fo.load_dataset(%r)
            results = dataset.load_run_results(%r)
            print(type(results).__name__, results.summary()["num_propagated"])
            print(results.evaluate(gt_field="ground_truth")["num_evaluated"])
            """
            % (dataset.name, results.key)
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True,
            check=True, timeout=120,
        ).stdout.splitlines()
        assert out[-2:] == ["PropagationResults 18", "18"]
    finally:
        dataset.persistent = False


def test_rerun_after_correction_updates_outputs_and_tags(embedded_dataset, monkeypatch):
    import fiftyone as fo

    from dinoprop import graph

    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label", confidence_threshold=1.0)
    assert len(dataset.match_tags("dinoprop:needs_review")) == 18
    # a human labels one more sample: it becomes a seed, its output clears
    target = dataset.match(fo.ViewField("label") == None).first()  # noqa: E711
    target["label"] = fo.Classification(label=target.ground_truth.label)
    target.save()

    def no_search(*args, **kwargs):
        raise AssertionError("the graph was searched again")

    monkeypatch.setattr(graph, "knn_search", no_search)  # the graph is reused
    results = dinoprop.propagate_labels(dataset, "label", confidence_threshold=0.0)
    assert results.summary()["num_seeds"] == 7
    assert dataset[target.id]["label_propagated"] is None
    assert len(dataset.match_tags("dinoprop:needs_review")) == 0
    assert len(dataset.list_runs()) == 1


def test_a_changed_embedding_is_not_answered_from_the_graph_cache(embedded_dataset, monkeypatch):
    from dinoprop import graph

    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    sample = dataset.first()
    sample["dinoprop_embedding"] = -sample["dinoprop_embedding"]
    sample.save()
    searches = []
    search = graph.knn_search
    monkeypatch.setattr(graph, "knn_search", lambda *a, **kw: searches.append(1) or search(*a, **kw))
    dinoprop.propagate_labels(dataset, "label", overwrite=True)
    assert searches  # the graph of the new vectors was searched
    searches.clear()
    dinoprop.propagate_labels(dataset, "label", overwrite=True)
    assert not searches  # and is reused while they stay the same


def test_center_and_normalize_copies_unless_told_not_to():
    x = np.random.default_rng(0).normal(3.0, 1.0, size=(50, 8)).astype(np.float32)
    raw = x.copy()
    unit = pm.center_and_normalize(x)
    assert np.array_equal(x, raw)  # the caller's array is untouched
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    expected = (raw - raw.mean(0)) / np.linalg.norm(raw - raw.mean(0), axis=1, keepdims=True)
    assert np.allclose(unit, expected, atol=1e-6)
    in_place = pm.center_and_normalize(x, copy=False)
    assert in_place is x and np.allclose(x, unit, atol=1e-7)


def test_propagate_labels_reads_the_embeddings_once(embedded_dataset, monkeypatch):
    reads = []
    for cls in (fo.Dataset, fo.DatasetView):  # values() and raw_values() end here
        def counted(self, *args, _aggregate=cls._aggregate, **kwargs):
            stages = str(self.view()._serialize(include_uuids=False))
            if "dinoprop_embedding" in str(args) + str(kwargs) + stages:
                reads.append(kwargs.get("pipeline"))
            return _aggregate(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_aggregate", counted)
    from dinoprop import vector_reads

    def counted_batches(samples, paths, _raw_batches=vector_reads.raw_batches):
        reads.append(paths)  # the raw BSON route of load_embeddings
        return _raw_batches(samples, paths)

    monkeypatch.setattr(vector_reads, "raw_batches", counted_batches)
    dinoprop.propagate_labels(embedded_dataset, "label")
    assert len(reads) == 1, reads  # one scan over the samples with embeddings
    assert embedded_dataset.count("label_propagated") == 18


def test_the_seeds_are_read_from_the_labeled_samples_only(embedded_dataset, monkeypatch):
    from dinoprop.propagation import samples as propagation_samples

    read = []
    raw_values = propagation_samples.raw_values

    def counted(view, paths):
        columns = raw_values(view, paths)
        if "label.label" in paths:
            read.append(len(columns[0]))
        return columns

    monkeypatch.setattr(propagation_samples, "raw_values", counted)
    results = dinoprop.propagate_labels(embedded_dataset, "label")
    labeled = embedded_dataset.count("label")
    assert read == [labeled] and labeled < len(embedded_dataset)
    assert results.summary()["num_seeds"] == labeled


def test_seed_tag_view_and_store_scores(embedded_dataset):
    dataset = embedded_dataset
    verified = dataset.exists("label").limit(4)
    verified.tag_samples("verified")
    view = dataset.match_tags("other", bool=False)
    results = dinoprop.propagate_labels(
        view, "label", seed_tag="verified", output_field="pred",
        store_scores=True, method="linear", run_key="mine",
    )
    assert results.summary()["num_seeds"] == 4
    assert results.summary()["num_propagated"] == 20
    assert dataset.list_runs() == ["mine"]
    preds = [p for p in dataset.values("pred") if p is not None]
    assert len(preds[0].logits) == len(results.classes)
    assert np.exp(preds[0].logits).sum() == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------- objects


@pytest.fixture(params=["declared", "undeclared"])
def detection_dataset(request, image_items):
    """Images with boxes; some boxes labeled; clustered patch embeddings.

    Parametrised: the embedding attribute declared in the schema (as
    compute_embeddings does) or not (FiftyOne then returns raw bytes).
    """
    import fiftyone as fo

    rng = np.random.default_rng(0)
    centers = {"cat": rng.normal(size=8) * 3, "dog": rng.normal(size=8) * 3}
    dataset = fo.Dataset()
    samples = []
    count = 0
    for i, (path, _) in enumerate(image_items[:12]):
        dets, truth = [], []
        for j in range(3):
            cls = "cat" if (i + j) % 2 else "dog"
            vector = centers[cls] + rng.normal(size=8) * 0.5
            labeled = count < 8 and j == 0
            count += labeled
            det = fo.Detection(
                label=cls if labeled else None,
                bounding_box=[0.1 * j, 0.1, 0.2, 0.2],
                dinoprop_embedding=vector.astype(np.float32),
            )
            dets.append(det)
            truth.append(fo.Detection(label=cls, bounding_box=det.bounding_box))
            truth[-1]._id = det._id
        samples.append(
            fo.Sample(filepath=path, boxes=fo.Detections(detections=dets),
                      truth=fo.Detections(detections=truth))
        )
    dataset.add_samples(samples)
    if request.param == "declared":
        dataset.add_dynamic_sample_fields()
    yield dataset
    dataset.delete()


def test_object_labels_propagate_from_labeled_boxes(detection_dataset):
    import fiftyone as fo

    dataset = detection_dataset
    before = [d.to_dict() for d in dataset.values("boxes")]
    results = dinoprop.propagate_labels(dataset, "boxes", confidence_threshold=0.99)
    summary = results.summary()
    assert summary["num_seeds"] == 8 and summary["num_propagated"] == 28
    outputs = dataset.values("boxes_propagated")
    assert all(isinstance(o, fo.Detections) for o in outputs)
    assert sum(len(o.detections) for o in outputs) == 28
    for dets in outputs:
        for det in dets.detections:
            assert det.source_id and 0 <= det.confidence <= 1
    evaluation = results.evaluate(gt_field="truth")
    assert evaluation["num_evaluated"] == 28 and evaluation["accuracy"] > 0.9
    assert [d.to_dict() for d in dataset.values("boxes")] == before
    queue = dataset.load_saved_view("dinoprop review queue")
    mins = [min(d.confidence for d in o.detections) for o in queue.values("boxes_propagated")]
    assert mins == sorted(mins)


def test_objects_with_unembedded_seed_are_rejected(detection_dataset):
    dataset = detection_dataset
    sample = dataset.first()
    sample.boxes.detections[0].dinoprop_embedding = None
    sample.save()
    with pytest.raises(DinopropError, match="no embedding"):
        dinoprop.propagate_labels(dataset, "boxes")
    with pytest.raises(DinopropError, match="No object in 'boxes' has an embedding"):
        dinoprop.propagate_labels(dataset, "boxes", embeddings="embedings")
    assert "boxes_propagated" not in dataset.get_field_schema()


# ------------------------------------------------------------- bad input


def _assert_untouched(dataset):
    assert "label_propagated" not in dataset.get_field_schema()
    assert dataset.list_runs() in ([], ["mine"])
    assert dataset.count("ground_truth") == len(dataset)
    assert len(dataset.match_tags("dinoprop:needs_review")) == 0
    assert not dataset.has_saved_view("dinoprop review queue")


@pytest.mark.parametrize(
    "prepare, kwargs, message",
    [
        (lambda d: d.set_values("label", [None] * len(d)), {}, "No seeds"),
        (
            lambda d: d.set_values(
                "label", [None if v is None else v.__class__(label="red")
                          for v in d.values("label")]
            ),
            {},
            "same class",
        ),
        (
            lambda d: d.exists("label").limit(1).set_values(
                "dinoprop_embedding", [None]
            ),
            {},
            "no embedding",
        ),
        (lambda d: None, {"label_field": "filepath"}, "expected a"),
        (lambda d: None, {"output_field": "label"}, "must differ"),
        (lambda d: None, {"output_field": "label.nested"}, "top-level"),
        (lambda d: None, {"output_field": "$where"}, "top-level"),
        (lambda d: None, {"output_field": "ground_truth"}, "no propagation run wrote"),
        (
            lambda d: d.register_run("mine", d.init_run(method="other")),
            {"run_key": "mine"},
            "another kind of run",
        ),
        (lambda d: None, {"method": "magic"}, "Unknown method"),
        (lambda d: None, {"embeddings": "missing"}, "does not exist"),
        (lambda d: None, {"seed_tag": "nobody"}, "No seeds"),
        (lambda d: None, {"k": True}, "k must be a positive integer; got True"),
        (lambda d: None, {"target_precision": True}, "target_precision must be"),
        (
            lambda d: d.exists("label", False).limit(3).set_values(
                "dinoprop_embedding", [np.full(16, np.nan)] * 3
            ),
            {},
            r"3 of the 24 embeddings in 'dinoprop_embedding' hold NaN or infinite",
        ),
    ],
)
def test_bad_input_raises_and_writes_nothing(embedded_dataset, prepare, kwargs, message):
    dataset = embedded_dataset
    prepare(dataset)
    kwargs = {"label_field": "label", **kwargs}
    with pytest.raises(DinopropError, match=message):
        dinoprop.propagate_labels(dataset, **kwargs)
    _assert_untouched(dataset)


def test_existing_output_of_another_type_is_rejected(embedded_dataset):
    dataset = embedded_dataset
    dataset.set_values("label_propagated", [1] * len(dataset))
    with pytest.raises(DinopropError, match="label_propagated"):
        dinoprop.propagate_labels(dataset, "label")
    assert dataset.list_runs() == []


def test_overwrite_replaces_a_field_no_propagation_wrote(embedded_dataset):
    dataset = embedded_dataset
    dataset.clone_sample_field("ground_truth", "old_predictions")
    dinoprop.propagate_labels(
        dataset, "label", output_field="old_predictions", overwrite=True
    )
    assert dataset.count("old_predictions") == 18  # seeds cleared, targets written
    # once a propagation wrote it, re-running needs no overwrite
    dinoprop.propagate_labels(dataset, "label", output_field="old_predictions")


def test_unreachable_precision_is_explained_and_thresholds_agree(embedded_dataset):
    dataset = embedded_dataset  # 2 seeds per class: 6 cross-validated seeds
    results = dinoprop.propagate_labels(dataset, "label")
    summary = results.summary()
    # 6 checked seeds cannot vouch for 95% precision: nothing is accepted,
    # every target is queued for review, and the summary says why
    assert summary["recommended_threshold"] == 1.0
    assert summary["coverage_at_threshold"] == 0.0
    assert summary["num_needs_review"] == 18
    assert "6 cross-validated seeds" in summary["note"]
    assert "Add seeds" in summary["note"]
    estimate = results.evaluate()
    assert estimate["threshold"] == summary["recommended_threshold"]
    assert estimate["coverage_at_threshold"] == summary["coverage_at_threshold"]

    # a reachable target: the same threshold from summary and evaluate
    results = dinoprop.propagate_labels(dataset, "label", target_precision=0.8)
    summary = results.summary()
    assert summary["note"] is None and 0 < summary["coverage_at_threshold"] <= 1
    estimate = results.evaluate(target_precision=0.8)
    assert estimate["threshold"] == pytest.approx(summary["recommended_threshold"])
    assert estimate["coverage_at_threshold"] == pytest.approx(
        summary["coverage_at_threshold"]
    )
    assert estimate["num_evaluated"] == 6  # accuracy still from the seeds


def test_accepted_labels_are_not_seeds_until_a_human_corrects_them(embedded_dataset):
    from dinoprop.review import accept_propagated_labels, undo_accept

    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label", confidence_threshold=1.0)
    queue = dataset.load_saved_view("dinoprop review queue")
    queued = set(queue.values("id"))
    accepted = accept_propagated_labels(dataset, "label_propagated", "label", 0.0)
    assert accepted.num_accepted == 18
    # accepted samples leave the review queue
    assert queued and dataset.load_saved_view("dinoprop review queue").count() == 0

    rerun = dinoprop.propagate_labels(dataset, "label", confidence_threshold=1.0)
    assert rerun.summary()["num_seeds"] == 6  # accepted labels are no seeds
    assert rerun.summary()["num_propagated"] == 18

    # a human corrects one accepted label: it becomes a seed, and undo keeps it
    corrected = dataset.select(accepted.sample_ids[0]).first()
    corrected.label.label = "corrected"
    corrected.save()
    rerun = dinoprop.propagate_labels(dataset, "label", confidence_threshold=1.0)
    assert rerun.summary()["num_seeds"] == 7
    undone = undo_accept(dataset, "label", accepted.batch)
    assert (undone["num_reverted"], undone["num_kept_corrected"]) == (17, 1)
    assert dataset[corrected.id].label.label == "corrected"
    assert dataset.count("label") == 7
    # the reverted samples are back in the queue
    queue = dataset.load_saved_view("dinoprop review queue")
    assert set(queue.values("id")) == queued - {corrected.id}


def test_runs_recorded_by_an_older_config_class_are_replaced(embedded_dataset):
    from dinoprop.propagation import RUN_TYPE, PropagationRunConfig

    dataset = embedded_dataset
    old = dataset.init_run(method="knn", run_type=RUN_TYPE, output_field="label_propagated")
    dataset.register_run("dinoprop_label_propagated", old)
    dinoprop.propagate_labels(dataset, "label")
    config = dataset.get_run_info("dinoprop_label_propagated").config
    assert isinstance(config, PropagationRunConfig)
    assert dataset.count("label_propagated") == 18


def test_the_note_names_what_limits_the_confidence():
    from dinoprop.propagation.api import _threshold_note

    outcome = pm.Propagation(
        probs=np.full((4, 2), 0.5), method="knn",
        oof_probs=np.full((40, 2), 0.5), oof_labels=np.zeros(40, int),
        shrink=pm.laplace_shrink(40),
    )
    capped = np.array([1 - 0.5 / 42, 0.6])  # at the cap of 40 checked seeds
    assert "40 cross-validated seeds" in _threshold_note(outcome, capped, 0.0, 0.999, None)
    unsure = np.array([0.7, 0.6])
    note = _threshold_note(outcome, unsure, 0.0, 0.95, None)
    assert "do not separate the classes" in note and "70.0%" in note
    assert _threshold_note(outcome, unsure, 0.5, 0.95, None) is None


_KILLED_WHILE_WRITING = """
import os, signal
import fiftyone as fo
import dinoprop
import dinoprop.label_writes as writes

original = writes.write_classifications

def write_half_then_die(samples, field, ids, labels, confidences, attributes, **kwargs):
    half = len(ids) // 2
    original(samples, field, list(ids)[:half], list(labels)[:half],
             list(confidences)[:half], {n: v[:half] for n, v in attributes.items()})
    os.kill(os.getpid(), signal.SIGKILL)

writes.write_classifications = write_half_then_die
dinoprop.propagate_labels(fo.load_dataset(%r), "label", method=%r)
"""


def _propagate_and_die_while_writing(dataset, method):
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_WRITING % (dataset.name, method)],
        capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == -9, child.stderr
    dataset.reload()


def _labels(dataset, field):
    return dataset.values(field + ".label"), dataset.values(field + ".confidence")


def _assert_same_labels(dataset, field, other):
    """The same classes, and confidences that differ by at most what a
    re-run leaves as stored (CONFIDENCE_TOLERANCE)."""
    (labels, confidences), (their_labels, theirs) = _labels(dataset, field), _labels(dataset, other)
    assert labels == their_labels
    assert [c is None for c in confidences] == [c is None for c in theirs]
    assert np.allclose(
        [c for c in confidences if c is not None], [c for c in theirs if c is not None],
        rtol=0, atol=CONFIDENCE_TOLERANCE,
    )


@pytest.mark.parametrize("earlier_method", [None, "knn"])
def test_a_propagation_killed_while_writing_says_so_and_a_rerun_completes_it(
    embedded_dataset, earlier_method
):
    dataset = embedded_dataset
    dataset.persistent = True  # the child process must see it
    try:
        if earlier_method:  # the field already holds another method's labels
            first = dinoprop.propagate_labels(dataset, "label", method=earlier_method)
        _propagate_and_die_while_writing(dataset, "linear")
        key = "dinoprop_label_propagated"
        assert dataset.list_runs() == [key]  # recorded before any label was written
        assert dataset.get_run_info(key).config.method == "linear"
        results = dataset.load_run_results(key, cache=False)
        assert results.summary()["status"] == "writing"
        # readers of the mixed field refuse it, or flag it
        with pytest.raises(DinopropError, match="interrupted"):
            review.accept_propagated_labels(dataset, "label_propagated", "label")
        with pytest.raises(DinopropError, match="interrupted"):
            results.evaluate(gt_field="ground_truth")
        assert "interrupted" in review.loop_status(dataset, "label")["note"]
        # a plain rerun (no overwrite) completes it: the labels of a clean run
        rerun = dinoprop.propagate_labels(dataset, "label", method="linear")
        assert rerun.summary()["status"] == "complete"
        dinoprop.propagate_labels(dataset, "label", method="linear", output_field="clean")
        _assert_same_labels(dataset, "label_propagated", "clean")
        review.accept_propagated_labels(dataset, "label_propagated", "label", 0.99)
        # the interrupted run's cost point is measured again, not counted twice
        history = rerun.summary()["stop_plan"]["history"]
        assert len(history) == (2 if earlier_method else 1)
        if earlier_method:
            assert history[0] == first.summary()["stop_plan"]["history"][0]
    finally:
        dataset.persistent = False


def test_deleting_an_interrupted_run_removes_what_it_wrote(embedded_dataset):
    dataset = embedded_dataset
    dataset.persistent = True
    try:
        _propagate_and_die_while_writing(dataset, "knn")
        assert dataset.count("label_propagated") == 9  # half of the 18 targets
        dataset.delete_run("dinoprop_label_propagated")
        assert dataset.get_field("label_propagated") is None
        assert dataset.list_runs() == []
    finally:
        dataset.persistent = False


def _stored_outputs(dataset, field="label_propagated"):
    """Every sample's propagated label as stored (without its ID) and tags."""
    return [
        None if label is None else {k: v for k, v in label.to_dict().items() if k != "_id"}
        for label in dataset.values(field)
    ], dataset.values("tags")


def test_rerun_stores_what_a_full_write_of_the_same_seeds_stores(embedded_dataset):
    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    target = dataset.match(fo.ViewField("label") == None).first()  # noqa: E711
    target["label"] = fo.Classification(label=target.ground_truth.label)
    target.save()
    dinoprop.propagate_labels(dataset, "label")  # rewrites what changed
    written = dataset.values("last_modified_at")
    dinoprop.propagate_labels(dataset, "label")  # nothing changed: writes nothing
    assert dataset.values("last_modified_at") == written
    stored = _stored_outputs(dataset)
    # the same run history (its checked predictions), every label written anew
    dataset.delete_sample_field("label_propagated")
    dataset.untag_samples("dinoprop:needs_review")
    dinoprop.propagate_labels(dataset, "label")
    assert _stored_outputs(dataset) == stored


def test_a_rerun_keeps_labels_that_barely_moved_and_reports_what_it_stores(embedded_dataset):
    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    ids, stored = dataset.values(["id", "label_propagated.confidence"])
    targets = [i for i, c in enumerate(stored) if c is not None]
    nudged = {ids[i]: stored[i] - CONFIDENCE_TOLERANCE / 2 for i in targets[:4]}
    moved = {ids[i]: stored[i] - 3 * CONFIDENCE_TOLERANCE for i in targets[4:8]}
    for values in (nudged, moved):
        dataset.set_values("label_propagated.confidence", values, key_field="id")
    before = dict(zip(ids, dataset.values("last_modified_at")))

    summary = dinoprop.propagate_labels(dataset, "label").summary()

    confidence = dict(zip(*dataset.values(["id", "label_propagated.confidence"])))
    after = dict(zip(ids, dataset.values("last_modified_at")))
    assert summary["num_kept"] == len(targets) - len(moved)
    assert all(confidence[i] == c and after[i] == before[i] for i, c in nudged.items())
    assert all(abs(confidence[i] - stored[ids.index(i)]) < 1e-9 for i in moved)
    assert all(after[i] > before[i] for i in moved)
    # what the run reports is what is stored: its plan and review queue count the stored values
    plan = summary["stop_plan"]
    values = [c for c in confidence.values() if c is not None]
    assert sum(c >= plan["threshold"] for c in values) == plan["num_accepted"]
    review_tagged = dataset.match_tags("dinoprop:needs_review").count()
    assert review_tagged == sum(c < summary["review_threshold"] for c in values)

    # with scores stored every label is rewritten: the nudged ones get their computed values back
    rewritten = dinoprop.propagate_labels(dataset, "label", store_scores=True).summary()
    assert rewritten["num_kept"] == 0
    assert [dataset[i].label_propagated.confidence for i in nudged] == [
        stored[ids.index(i)] for i in nudged
    ]


def test_negligible_alternatives_may_change_order_but_likely_ones_may_not():
    from bson import ObjectId

    from dinoprop.propagation.samples import _ATTRIBUTES, SettledLabels, _keep_unmoved
    from dinoprop.stored_labels import _columns

    classes = np.array(["a", "b", "c", "d"])
    stored = [
        (0.9991, [0.9991, 0.0002, 0.0002], ["a", "c", "b"]),  # noise reordered
        (0.9991, [0.9991, 0.0004, 0.0002], ["a", "d", "b"]),  # other classes, as unlikely
        (0.7004, [0.7004, 0.1996, 0.1], ["a", "c", "b"]),  # the likely alternatives swapped
    ]
    docs = [
        {"_id": ObjectId(), "out": dict(zip(
            ("_id", "label", "confidence", *_ATTRIBUTES[::-1]),
            (ObjectId(), "a", confidence, confidences, names),
        ))}
        for confidence, confidences, names in stored
    ]
    settled = SettledLabels(
        top=np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]]),
        top_confidences=np.array([[0.9995, 0.0003, 0.0002]] * 2 + [[0.7, 0.2, 0.1]]),
        confidence=np.array([0.9995, 0.9995, 0.7]),
        write=np.ones(3, bool),
        stored=_columns(docs, "out", 3, _ATTRIBUTES),
        rows=np.arange(3),
    )
    _keep_unmoved(settled, classes, tolerance=1e-3)
    assert settled.write.tolist() == [False, False, True]
    assert settled.confidence.tolist() == [0.9991, 0.9991, 0.7]
    assert settled.top_confidences[0].tolist() == [0.9991, 0.0002, 0.0002]
