"""suggest_seeds: coverage without seeds, informative picks with seeds."""

import numpy as np
import pytest

import dinoprop
from dinoprop import propagation_methods as pm
from dinoprop.core import DinopropError
from dinoprop.graph import knn_search
from dinoprop.seeds import ANNOTATE_NEXT_TAG, k_center_greedy, suggest


def _clusters(num_classes, per_class, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * 3
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centers[labels] + rng.normal(size=(len(labels), dim)) * spread
    return pm.center_and_normalize(x), labels


def test_k_center_covers_every_cluster_without_seeds():
    x, labels = _clusters(num_classes=8, per_class=50)
    neighbors, sims = knn_search(x, 10)
    picks = suggest(x, pm.Graph(neighbors, sims), np.array([], np.int64), [], 8)
    assert len(picks) == 8 == len(set(picks))
    assert sorted(labels[picks]) == list(range(8))


def test_k_center_continues_from_existing_centers():
    x, labels = _clusters(num_classes=5, per_class=40)
    existing = np.flatnonzero(labels < 3)[::40]  # one per cluster 0, 1, 2
    picks = k_center_greedy(x, existing, 2)
    assert sorted(labels[picks]) == [3, 4]


@pytest.mark.parametrize("num_seeds", [0, 1, 6])
def test_duplicate_images_never_give_duplicate_suggestions(num_seeds):
    x, labels = _clusters(num_classes=3, per_class=10)
    x, labels = np.vstack([x, x]), np.concatenate([labels, labels])  # every image twice
    neighbors, sims = knn_search(x, 10)
    seed_idx = np.arange(0, 60, 10)[:num_seeds]
    picks = suggest(x, pm.Graph(neighbors, sims), seed_idx, list(labels[seed_idx]), 59)
    assert len(picks) == len(set(picks.tolist())) == 60 - num_seeds - (num_seeds == 0)
    assert not set(picks.tolist()) & set(seed_idx.tolist())


def test_with_seeds_suggestions_are_uncertain_and_spread():
    """With seeds, picks are less certain than typical samples, and apart."""
    x, labels = _clusters(num_classes=4, per_class=100, spread=3.0, seed=1)
    neighbors, sims = knn_search(x, 10)
    graph = pm.Graph(neighbors, sims)
    seeds = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(4)])
    picks = suggest(x, graph, seeds, list(labels[seeds]), 8)
    assert len(picks) == 8 == len(set(picks)) and not set(picks) & set(seeds)
    probs = pm.propagate(
        pm.Problem(x, graph, 4), seeds, labels[seeds], method="graph_linear"
    ).probs
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    assert margin[picks].mean() < np.median(margin)
    # spread: picks are farther apart than the same number of most
    # uncertain samples, which crowd the same confusion
    crowd = np.argsort(margin)[:8]
    assert _mean_pairwise_distance(x[picks]) > _mean_pairwise_distance(x[crowd])


def _mean_pairwise_distance(points):
    sims = points @ points.T
    return float((1 - sims[np.triu_indices(len(points), 1)]).mean())


def test_suggest_seeds_tags_samples_without_seeds(embedded_dataset):
    dataset = embedded_dataset
    dataset.limit(2).tag_samples(ANNOTATE_NEXT_TAG)  # a stale suggestion
    ids = dinoprop.suggest_seeds(dataset, 3)
    assert len(ids) == 3 == len(set(ids))
    tagged = dataset.match_tags(ANNOTATE_NEXT_TAG).values("id")
    assert sorted(tagged) == sorted(ids)
    # coverage: the three colour clusters are each represented
    truth = dict(zip(*dataset.values(["id", "ground_truth.label"])))
    assert len({truth[i] for i in ids}) == 3


def test_suggest_seeds_with_labels_skips_seeds(embedded_dataset):
    dataset = embedded_dataset
    seeds = set(dataset.exists("label").values("id"))
    ids = dinoprop.suggest_seeds(dataset, 5, label_field="label", tag="next")
    assert len(ids) == 5 and not set(ids) & seeds
    assert sorted(dataset.match_tags("next").values("id")) == sorted(ids)
    assert len(dataset.match_tags(ANNOTATE_NEXT_TAG)) == 0


def test_suggest_seeds_asks_for_at_most_the_unlabeled(embedded_dataset):
    ids = dinoprop.suggest_seeds(embedded_dataset, 100, label_field="label")
    assert len(ids) == 18


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 0}, "count"),
        ({"count": 3, "label_field": "filepath"}, "expected a"),
        ({"count": 3, "embeddings": "missing"}, "does not exist"),
        ({"count": 3, "k": 0}, "k must"),
        ({"count": True}, "count must be a positive integer; got True"),
        ({"count": 3, "k": True}, "k must be a positive integer; got True"),
    ],
)
def test_suggest_seeds_bad_input(embedded_dataset, kwargs, message):
    with pytest.raises(DinopropError, match=message):
        dinoprop.suggest_seeds(embedded_dataset, **kwargs)
    assert len(embedded_dataset.match_tags(ANNOTATE_NEXT_TAG)) == 0


def test_suggest_seeds_names_non_finite_embeddings(embedded_dataset):
    dataset = embedded_dataset
    broken = dataset.limit(2)
    dim = len(dataset.first().dinoprop_embedding)
    broken.set_values("dinoprop_embedding", [np.full(dim, np.nan), np.full(dim, np.inf)])
    with pytest.raises(DinopropError, match=r"2 of the 24 embeddings .* NaN or infinite") as e:
        dinoprop.suggest_seeds(dataset, count=3)
    assert broken.first().id in str(e.value)
    assert len(dataset.match_tags(ANNOTATE_NEXT_TAG)) == 0
