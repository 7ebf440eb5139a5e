"""Which samples to annotate next: coverage first, then informative ones.

:func:`suggest_seeds` picks the samples whose labels would help label
propagation most. Without seeds (or with seeds of a single class) it covers
the embedding space with k-center greedy selection (Sener & Savarese,
2018), starting from any existing seeds. Once there are seeds of two or
more classes, it propagates them and picks samples that are uncertain AND
lie in dense regions (their label will spread to many neighbours), keeping
the picks apart from each other so one batch does not ask about the same
thing twice.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np

from dinoprop import propagation_methods as pm
from dinoprop.core import (  # noqa: F401 (ANNOTATE_NEXT_TAG: public here too)
    ANNOTATE_NEXT_TAG,
    DinopropError,
    check_int,
    progress_bar,
    validate_samples,
)

#: Candidates considered per suggestion: the most informative
#: ``POOL_FACTOR * count`` samples form the pool that k-center selection
#: spreads the suggestions over.
POOL_FACTOR = 5

#: The pool factor while no class has two seeds: the propagation cannot be
#: cross-validated yet, so its uncertainty is not trusted and suggestions
#: cover the densest regions instead, from a wider pool.
COVERAGE_POOL_FACTOR = 20



def suggest_seeds(
    samples: Any,
    count: int,
    label_field: Optional[str] = None,
    embeddings: str = "dinoprop_embedding",
    tag: str = ANNOTATE_NEXT_TAG,
    k: int = 10,
    progress: Union[None, bool, Callable] = None,
) -> list:
    """Suggests the samples to annotate next and tags them.

    Args:
        samples: a FiftyOne dataset or view
        count: how many samples to suggest
        label_field: the Classification field holding the seeds so far;
            None (or a field with no labels yet) means no seeds. It gets a
            label schema (:func:`dinoprop.review.enable_annotation`), so
            the suggested samples can be labeled in the App's Annotate tab
        embeddings: the field holding the embeddings
        tag: the tag put on the suggested samples (removed first from the
            other samples of ``samples``)
        k: the number of neighbours of the kNN graph
        progress: None (FiftyOne's default), a bool, or a progress callback

    Returns:
        the IDs of the suggested samples, most useful first (fewer than
        ``count`` when fewer unlabeled samples have embeddings)

    Raises:
        DinopropError: for a non-positive ``count`` or ``k``, a missing or
            wrong embeddings or label field; nothing is written then
    """
    import fiftyone.core.labels as fol

    from dinoprop.core import require_label_field
    from dinoprop.label_schema import try_enable_annotation
    from dinoprop.label_writes import retag
    from dinoprop.propagation import sample_graph

    validate_samples(samples)
    check_int(count, "count")
    check_int(k, "k")
    if not tag or not isinstance(tag, str):
        raise DinopropError("tag must be a non-empty string; got %r" % (tag,))
    labels = {}
    if label_field is not None:
        require_label_field(samples, label_field, (fol.Classification,))
        ids, values = samples.values(["id", label_field + ".label"])
        labels = {i: v for i, v in zip(ids, values) if v is not None}
    with progress_bar(3, progress, iters_str="steps") as bar:
        sample_ids, vectors, graph = sample_graph(samples, embeddings, k)
        bar.update()
        seed_idx = np.array(
            [i for i, sid in enumerate(sample_ids) if sid in labels], np.int64
        )
        seed_names = [labels[sample_ids[i]] for i in seed_idx]
        stored = (
            _stored_probabilities(samples, label_field, sample_ids, seed_idx, seed_names)
            if label_field is not None and len(set(seed_names)) >= 2
            else None
        )
        chosen = suggest(
            pm.center_and_normalize(vectors), graph, seed_idx, seed_names, count,
            probs=stored,
        )
        bar.update()
        suggested = [str(sample_ids[i]) for i in chosen]
        retag(samples, tag, suggested)  # writes only the tags that change
        if label_field is not None:
            try_enable_annotation(samples, label_field)
        bar.update()
    return suggested


def suggest(
    x: np.ndarray,
    graph: "pm.Graph",
    seed_idx: np.ndarray,
    seed_labels: list,
    count: int,
    probs: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Array-level :func:`suggest_seeds`: node indices to annotate next.

    Args:
        x: ``N x D`` unit-norm features
        graph: the kNN :class:`dinoprop.propagation_methods.Graph`
        seed_idx: the nodes labeled so far
        seed_labels: their labels (any hashable values)
        count: how many nodes to suggest
        probs: the calibrated ``N x C`` class probabilities of a
            propagation of exactly these seeds (columns in sorted class
            order), if one was just run; otherwise the seeds are
            propagated here

    Returns:
        up to ``count`` node indices, not seeds, most useful first
    """
    seed_idx = np.asarray(seed_idx, np.int64)
    count = min(count, x.shape[0] - len(np.unique(seed_idx)))
    if count <= 0:
        return np.empty(0, np.int64)
    if len(set(seed_labels)) < 2:
        return k_center_greedy(x, seed_idx, count)
    return uncertain_dense(x, graph, seed_idx, seed_labels, count, probs)


def k_center_greedy(x: np.ndarray, centers: np.ndarray, count: int) -> np.ndarray:
    """Greedy k-center selection: each pick is the node farthest from all
    picks (and from the existing ``centers``) so far.

    With no existing center, the first pick is the node closest to the
    mean of the data (the most typical one) rather than an outlier.

    Args:
        x: ``N x D`` unit-norm features
        centers: node indices already covered (may be empty)
        count: how many nodes to pick

    Returns:
        ``count`` node indices, in pick order
    """
    nearest = _distance_to_nearest(x, x[centers])
    nearest[centers] = -np.inf  # never picked (duplicates of them may be)
    picks = []
    while len(picks) < count:
        if picks or len(centers):
            pick = int(np.argmax(nearest))
        else:  # the most typical node, not an outlier
            pick = int(np.argmax(x @ x.mean(axis=0)))
        picks.append(pick)
        nearest = np.minimum(nearest, 1.0 - x @ x[pick])
        nearest[pick] = -np.inf
    return np.array(picks, np.int64)


def uncertain_dense(
    x: np.ndarray,
    graph: "pm.Graph",
    seed_idx: np.ndarray,
    seed_labels: list,
    count: int,
    probs: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Uncertain nodes in dense regions, kept apart from each other.

    A node's score is its uncertainty under the current propagation
    (``1 - margin`` between its two most likely classes) times its local
    density (mean similarity to its graph neighbours): labeling it both
    resolves a confusion and settles its many neighbours. The best-scoring
    nodes form a pool; k-center greedy selection over the pool (weighted by
    score, the seeds counting as covered) then spreads the batch so it
    does not ask about the same confusion twice. While no class has two seeds, the
    propagation cannot be checked, so the score is density alone
    (coverage of the densest regions).

    ``probs`` are the current propagation's probabilities (as for
    :func:`suggest`); by default the seeds are propagated with
    ``graph_linear``.

    Returns:
        ``count`` node indices, best first
    """
    classes, labels = np.unique(np.asarray(seed_labels), return_inverse=True)
    if probs is None:
        problem = pm.Problem(x, graph, len(classes))
        probs = pm.propagate(problem, seed_idx, labels, method="graph_linear").probs
    top2 = np.sort(probs, axis=1)[:, -2:]
    uncertainty = 1.0 - (top2[:, 1] - top2[:, 0])
    density = np.clip(graph.sims, 0.0, None).mean(axis=1)
    if not pm.can_cross_validate(labels):
        score, factor = density, COVERAGE_POOL_FACTOR
    else:
        score, factor = uncertainty * density, POOL_FACTOR
    pool_size = min(factor * count, x.shape[0])
    order = np.argsort(-score, kind="stable")
    pool = order[~np.isin(order, seed_idx)][:pool_size]
    # k-center greedy within the pool, the seeds counting as covered
    pool_x, pool_score = x[pool], score[pool]
    nearest = _distance_to_nearest(pool_x, x[seed_idx])
    picks = []
    taken = np.zeros(len(pool), bool)
    for _ in range(min(count, len(pool))):
        gain = np.where(taken, -np.inf, nearest * pool_score)
        best = int(np.argmax(gain))
        picks.append(int(pool[best]))
        taken[best] = True
        nearest = np.minimum(nearest, 1.0 - pool_x @ pool_x[best])
    return np.array(picks, np.int64)


def _stored_probabilities(samples, label_field, sample_ids, seed_idx, seed_names):
    """The newest propagation's class probabilities, if it used these seeds.

    A propagation run stores every target's most likely classes and their
    calibrated probabilities (:data:`dinoprop.propagation.TOP_LABELS_ATTRIBUTE`);
    when the newest run of ``label_field`` used exactly the current seeds,
    with the same classes, and labeled every other sample, those give the uncertainty that
    :func:`uncertain_dense` needs without propagating again (the loop
    propagates, then suggests). The probability mass beyond the stored
    classes is spread over the others.

    Returns:
        an ``N x C`` array aligned with ``sample_ids`` (classes sorted),
        or None when the newest run is missing or stale
    """
    from dinoprop.propagation import (
        TOP_CONFIDENCES_ATTRIBUTE,
        TOP_LABELS_ATTRIBUTE,
        newest_run_key,
    )
    from dinoprop.propagation.runs import results_are_complete

    run_key = newest_run_key(samples, label_field)
    if run_key is None:
        return None
    dataset = samples._root_dataset
    results = dataset.load_run_results(run_key, cache=False)
    if not results_are_complete(results):
        return None  # interrupted: its stored probabilities are partial
    seed_ids = set(np.asarray(sample_ids)[seed_idx].tolist())
    classes = list(results.classes)
    if set(results.seed_ids) != seed_ids or classes != sorted(set(seed_names)):
        return None  # the seeds, or their classes, changed since the run
    output = results.config.output_field
    ids, tops, confs = samples.values(
        ["id", output + "." + TOP_LABELS_ATTRIBUTE, output + "." + TOP_CONFIDENCES_ATTRIBUTE]
    )
    stored = {sid: (names, values) for sid, names, values in zip(ids, tops, confs)}
    column = {c: j for j, c in enumerate(classes)}
    probs = np.zeros((len(sample_ids), len(classes)), np.float32)
    is_seed = np.zeros(len(sample_ids), bool)
    is_seed[seed_idx] = True
    for i, sid in enumerate(sample_ids):
        if is_seed[i]:
            continue
        names, values = stored.get(sid, (None, None))
        if not names or any(n not in column for n in names):
            return None  # a target the run did not label: stale
        rest = max(1.0 - float(sum(values)), 0.0)
        others = len(classes) - len(names)
        if others:
            probs[i] = rest / others
        probs[i, [column[n] for n in names]] = values
    return probs


def _distance_to_nearest(
    points: np.ndarray, centers: np.ndarray, block: int = 1024
) -> np.ndarray:
    """Cosine distance of each unit-norm point to its nearest center.

    Centers are compared in blocks so memory stays ``num_points x block``;
    with no center every distance is infinite.
    """
    nearest = np.full(points.shape[0], np.inf, np.float32)
    for start in range(0, centers.shape[0], block):
        distances = 1.0 - points @ centers[start : start + block].T
        nearest = np.minimum(nearest, distances.min(axis=1))
    return nearest
