"""Propagation over samples: seeds, the cached kNN graph, writing labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from dinoprop import propagation_methods as pm
from dinoprop.bulk_reads import gc_paused, raw_values
from dinoprop.core import (
    DinopropError,
    check_vector_field,
    load_embeddings,
    require_field,
    require_label_field,
)
from dinoprop.label_states import accepted_unedited_ids
from dinoprop.propagation.common import (
    CONFIDENCE_TOLERANCE,
    NEEDS_REVIEW_TAG,
    NUM_TOP_CLASSES,
    REVIEW_QUEUE_VIEW,
    TOP_CONFIDENCES_ATTRIBUTE,
    TOP_LABELS_ATTRIBUTE,
    _check_seeds,
    _flatten,
    _fol,
    _is_seed,
    _label_types,
)

# Graphs of recent runs, reused when a view and its embeddings are unchanged
# (re-running after a human corrects or adds seeds skips the kNN search).
_GRAPH_CACHE: dict = {}
_GRAPH_CACHE_SIZE = 4


def _sample_data(samples, label_field, embeddings, seed_tag, k, graph_engine):
    require_field(
        samples, embeddings,
        "an embeddings field (run dinoprop.compute_embeddings first)",
    )
    check_vector_field(samples, embeddings)
    ids, labels, is_seed = _sample_seeds(samples, label_field, seed_tag)
    loaded = load_embeddings(samples, embeddings)
    embedded = set(loaded[0].tolist())
    seed_ids = [i for i, s in zip(ids, is_seed) if s]
    seed_labels = [lab for lab, s in zip(labels, is_seed) if s]
    where = " has a label in '%s'%s" % (
        label_field,
        "" if seed_tag is None else " and the tag '%s'" % seed_tag,
    )
    _check_seeds(
        seed_labels,
        np.array([i in embedded for i in seed_ids], bool),
        "sample" + where,
    )
    sample_ids, vectors, graph = sample_graph(
        samples, embeddings, k, loaded, **graph_engine
    )
    if len(sample_ids) == len(seed_ids):
        raise DinopropError(
            "Every sample with an embedding is a seed: there is nothing to "
            "propagate to"
        )
    position = {sid: i for i, sid in enumerate(sample_ids)}
    return {
        "ids": sample_ids,
        "embeddings": vectors,
        "graph": graph,
        "seed_idx": np.array([position[s] for s in seed_ids], np.int64),
        "seed_labels": np.array(seed_labels),
        "label_field": label_field,
    }


@gc_paused()
def _sample_seeds(samples, label_field, seed_tag):
    """The IDs and labels of the samples with a label in ``label_field``,
    and which of them are seeds.

    The database picks those samples (``exists``): the few labeled samples
    of a large view come back, not one document per sample (1M samples,
    1,000 labeled: 0.4 s against 1.8 s reading every sample).
    """
    paths = ["_id", label_field + ".label"] + (["tags"] if seed_tag else [])
    columns = raw_values(samples.exists(label_field + ".label"), paths)
    ids = [str(i) for i in columns[0]]
    labels = columns[1]
    tags = columns[2] if seed_tag else [None] * len(ids)
    machine = accepted_unedited_ids(samples, label_field)
    is_seed = [
        sid not in machine and _is_seed(lab, t, seed_tag)
        for sid, lab, t in zip(ids, labels, tags)
    ]
    return ids, labels, is_seed


def count_seeds(
    samples: Any, label_field: str, seed_tag: Optional[str] = None
) -> dict:
    """The seeds :func:`propagate_labels` would use, counted per class.

    Args:
        samples: a FiftyOne dataset or view
        label_field: a Classification or Detections field
        seed_tag: only seeds carrying this tag (on the sample, or for
            objects on the detection)

    Returns:
        ``{class: number of seeds}``
    """
    from collections import Counter

    if samples.get_field(label_field) is None:
        return {}
    if require_label_field(samples, label_field, _label_types()) is _fol().Detections:
        path = label_field + ".detections."
        labels, tags = (
            _flatten(v) for v in samples.values([path + "label", path + "tags"])
        )
        seeds = [lab for lab, t in zip(labels, tags) if _is_seed(lab, t, seed_tag)]
    else:
        _, labels, is_seed = _sample_seeds(samples, label_field, seed_tag)
        seeds = [lab for lab, s in zip(labels, is_seed) if s]
    return dict(Counter(seeds))


def sample_graph(samples, embeddings, k, loaded=None, **engine):
    """The kNN graph of the view, reused when nothing it depends on changed
    (``loaded``: the view's :func:`load_embeddings`, if already read;
    ``engine``: the ``engine``, ``ray_address`` and ``num_workers`` of
    :func:`dinoprop.similarity.sample_knn_graph`, which search the same
    graph wherever it runs, so the reuse ignores them)."""
    from dinoprop.similarity import sample_knn_graph

    key = (
        samples._root_dataset._doc.id,
        str(samples.view()._serialize(include_uuids=False)),  # the stages only
        embeddings,
        int(k),
    )
    ids, vectors = loaded or load_embeddings(samples, embeddings)
    digest = _digest(vectors)
    cached = _GRAPH_CACHE.get(key)
    if cached is not None and np.array_equal(cached[0], ids) and cached[1] == digest:
        return ids, vectors, cached[2]
    ids, vectors, neighbors, sims = sample_knn_graph(
        samples, embeddings, k, loaded=(ids, vectors), **engine
    )
    graph = pm.Graph(neighbors, sims)
    if len(_GRAPH_CACHE) >= _GRAPH_CACHE_SIZE:
        _GRAPH_CACHE.pop(next(iter(_GRAPH_CACHE)))
    _GRAPH_CACHE[key] = (ids, digest, graph)
    return ids, vectors, graph


def _digest(vectors: np.ndarray) -> str:
    """A digest of ``vectors`` (shape, type and bytes): the graph cache
    keeps it instead of the vectors themselves (1.5 GB per cached graph
    at 1M 384-d samples)."""
    import hashlib

    vectors = np.ascontiguousarray(vectors)
    # SHA-256 runs on the CPU's SHA extensions where it has them: 1.5 GB
    # in 0.9 s here against 1.5 s for BLAKE2b
    digest = hashlib.sha256(repr((vectors.shape, vectors.dtype.str)).encode())
    digest.update(memoryview(vectors).cast("B"))
    return digest.hexdigest()


@dataclass
class SettledLabels:
    """The Classifications a run gives its targets (rows aligned with them),
    with the stored label kept wherever it barely moved.

    Attributes:
        top: ``N x NUM_TOP_CLASSES`` class indices, most likely first
        top_confidences: their probabilities (rounded to 4 decimals)
        confidence: the confidence of each label (the stored one where kept)
        write: which labels are (re)written
        stored: the labels stored in the output field
            (:func:`dinoprop.stored_labels.read_stored_labels`)
        rows: each target's row in ``stored`` (-1: none)
    """

    top: np.ndarray
    top_confidences: np.ndarray
    confidence: np.ndarray
    write: np.ndarray
    stored: Any
    rows: np.ndarray


@gc_paused()
def settle_labels(
    samples, data, output_field, targets, classes, probs, tolerance=CONFIDENCE_TOLERANCE
) -> SettledLabels:
    """The targets' new labels; a stored label whose class and alternatives
    are unchanged and whose confidences moved by at most ``tolerance`` is
    kept as it is (``tolerance=0``: every label is rewritten)."""
    from dinoprop.stored_labels import read_stored_labels

    top = top_classes(probs, NUM_TOP_CLASSES)
    top_probs = np.take_along_axis(probs, top, axis=1).astype(np.float64)
    stored = read_stored_labels(samples, output_field, top.shape[1], _ATTRIBUTES)
    settled = SettledLabels(
        top=top,
        top_confidences=np.round(top_probs, 4),
        confidence=top_probs[:, 0],
        write=np.ones(len(targets), bool),
        stored=stored,
        rows=stored.rows(data["ids"][targets]),
    )
    if tolerance > 0:
        _keep_unmoved(settled, classes, tolerance)
    return settled


#: The attributes of a propagated Classification holding its ranked
#: classes and their probabilities.
_ATTRIBUTES = (TOP_LABELS_ATTRIBUTE, TOP_CONFIDENCES_ATTRIBUTE)


def _keep_unmoved(settled, classes, tolerance):
    """Marks the labels that barely moved as kept and gives them their
    stored confidences. Alternatives whose probability is within
    ``tolerance`` of 0 both before and after may come in any order (they
    are all as unlikely)."""
    stored = settled.stored
    targets = np.flatnonzero(settled.rows >= 0)
    targets = targets[stored.comparable[settled.rows[targets]]]
    rows = settled.rows[targets]
    codes = stored.codes(np.asarray(classes).astype(str))
    old_conf = stored.confidence[rows]
    old_top_conf = stored.top_confidences[rows]
    new_top_conf = settled.top_confidences[targets]
    negligible = (new_top_conf <= tolerance) & (old_top_conf <= tolerance)
    unmoved = (
        ((codes[settled.top[targets]] == stored.top_labels[rows]) | negligible).all(axis=1)
        & (np.abs(settled.confidence[targets] - old_conf) <= tolerance)
        & (np.abs(new_top_conf - old_top_conf) <= tolerance).all(axis=1)
    )
    kept = targets[unmoved]
    settled.write[kept] = False
    settled.confidence[kept] = old_conf[unmoved]
    settled.top_confidences[kept] = old_top_conf[unmoved]


@gc_paused()
def _write_samples(samples, data, output_field, targets, classes, settled, probs, needs_review):
    """Writes the target labels to (re)write and clears seeds' outputs;
    ``probs``: the targets' probabilities whose logarithms are stored too,
    or None. Returns (#to review, #labels whose class changed)."""
    from dinoprop.label_writes import utc_now, write_classifications
    from dinoprop.stored_labels import columns_of, remember_written

    stored = settled.stored
    rows = np.flatnonzero(settled.write)
    names = np.asarray(classes).astype(str)
    top = settled.top[rows]
    at = settled.rows[rows]
    label_ids, previous = _previous_labels(stored, at)
    codes = stored.codes(names)
    flipped = int(((previous >= 0) & (previous != codes[top[:, 0]])).sum())
    seeds = stored.rows(data["ids"][data["seed_idx"]])
    seeds = seeds[seeds >= 0]
    cleared = seeds[stored.label[seeds] >= 0]  # seeds with a propagated label
    now = utc_now()
    labels = names[top[:, 0]]
    write_classifications(
        samples,
        output_field,
        data["ids"][targets[rows]],
        labels.tolist(),
        settled.confidence[rows],
        {
            TOP_LABELS_ATTRIBUTE: names[top].tolist(),
            TOP_CONFIDENCES_ATTRIBUTE: settled.top_confidences[rows].tolist(),
        },
        clear_ids=stored.sample_ids[cleared],
        vectors=(
            None if probs is None
            else {"logits": np.log(np.clip(probs[rows], 1e-12, None))}
        ),
        label_ids=label_ids,
        now=now,
    )
    review_ids = list(data["ids"][targets[needs_review]])
    _mark_for_review(
        samples, review_ids, output_field, output_field + ".confidence",
        data["label_field"], now=now,
    )
    placed = at >= 0
    remember_written(
        stored,
        columns_of(
            names, top[placed], settled.top_confidences[rows][placed],
            settled.confidence[rows][placed], label_ids[placed],
        ),
        at[placed],
        cleared,
        now,
    )
    return len(review_ids), flipped


def _previous_labels(stored, rows):
    """The label IDs to write at ``rows`` of ``stored`` (the stored ones,
    new ones where none) and the stored class codes there (-1: none)."""
    from bson import ObjectId

    from dinoprop.stored_labels import NO_ID

    placed = rows >= 0
    label_ids = np.full(len(rows), NO_ID, "V12")
    previous = np.full(len(rows), -1, np.int32)
    label_ids[placed] = stored.label_ids[rows[placed]]
    previous[placed] = stored.label[rows[placed]]
    fresh = np.flatnonzero(label_ids == np.void(NO_ID))
    label_ids[fresh] = np.frombuffer(b"".join(ObjectId().binary for _ in fresh), "V12")
    return label_ids, previous


def top_classes(probs: np.ndarray, num: int, chunk: int = 65_536) -> np.ndarray:
    """The ``num`` most likely classes of each row, best first (ties in
    class order), found ``chunk`` rows at a time so that no ``N x C``
    index array is held (at 1M samples and 100 classes: 800 MB).

    Each row's ``num + 1`` most likely classes are partitioned out and
    only they are sorted (1M x 100, 4 classes: 1.0 s against 2.7 s for
    sorting whole rows); rows whose ``num``-th and ``num + 1``-th
    probabilities tie (uniform rows, say) are sorted whole, so the ties
    still go in class order.

    Args:
        probs: ``N x C`` probabilities
        num: classes per row (at most ``C``)
        chunk: rows ranked at once

    Returns:
        an ``N x num`` int64 array of class indices
    """
    return np.concatenate([
        _top_of_block(-probs[start:start + chunk], num)
        for start in range(0, max(len(probs), 1), chunk)
    ])


def _top_of_block(costs: np.ndarray, num: int) -> np.ndarray:
    """The ``num`` lowest columns of each row of ``costs``, lowest first,
    ties in column order (what a stable ``argsort`` gives)."""
    if num >= costs.shape[1]:
        return np.argsort(costs, axis=1, kind="stable")[:, :num]
    candidates = np.sort(np.argpartition(costs, num, axis=1)[:, : num + 1], axis=1)
    values = np.take_along_axis(costs, candidates, axis=1)
    order = np.argsort(values, axis=1, kind="stable")  # ties keep column order
    top = np.take_along_axis(candidates, order, axis=1)
    ranked = np.take_along_axis(values, order, axis=1)
    tied = np.flatnonzero(ranked[:, num - 1] == ranked[:, num])
    top = top[:, :num]
    if len(tied):
        top[tied] = np.argsort(costs[tied], axis=1, kind="stable")[:, :num]
    return top


def _mark_for_review(
    samples, review_ids, output_field, sort_key, unlabeled_in=None, now=None
):
    """Tags the samples to review and saves the review queue view.

    Args:
        samples: the collection
        review_ids: the IDs of the samples to review
        output_field: the field of the propagated labels
        sort_key: the field path or expression ranking them, ascending
        unlabeled_in: an optional label field: samples that have a label
            there (a human's, or an accepted one) leave the queue
        now: the ``last_modified_at`` of the samples retagged (default: now)
    """
    from dinoprop.label_writes import retag

    retag(samples, NEEDS_REVIEW_TAG, review_ids, now=now)  # writes only changed tags
    queue = samples.match_tags(NEEDS_REVIEW_TAG)
    if unlabeled_in is not None:
        queue = queue.exists(unlabeled_in, False)
    queue = queue.sort_by(sort_key)
    samples._root_dataset.save_view(
        REVIEW_QUEUE_VIEW,
        queue,
        description="Samples whose propagated label needs review, least "
        "confident first (written by dinoprop.propagate_labels into '%s')"
        % output_field,
        overwrite=True,
    )
