"""Label propagation on FiftyOne collections: seeds in, calibrated labels out.

:func:`propagate_labels` reads the seed labels of a view and the embeddings
of its samples (or of their object patches), propagates the seeds over the
kNN graph of the embeddings with a method of
:mod:`dinoprop.propagation_methods`, and writes one label with a calibrated
confidence per target. The run is recorded on the dataset like any FiftyOne
run (``dataset.list_runs()``, ``load_run_results()``, ``delete_run()``) and
its :class:`PropagationResults` estimate the accuracy of the labels it wrote.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

import numpy as np

import fiftyone.core.runs as fors

from dinoprop import propagation_methods as pm
from dinoprop.core import (
    TAG_PREFIX,
    DinopropError,
    check_vector_field,
    require_field,
    load_embeddings,
    progress_bar,
    require_label_field,
    validate_samples,
)

#: Tag of samples whose propagated label is below the review threshold.
NEEDS_REVIEW_TAG = TAG_PREFIX + "needs_review"

#: Name of the saved view listing samples to review, least confident first.
REVIEW_QUEUE_VIEW = "dinoprop review queue"

#: The run type recorded in the run config (``dataset.list_runs(type=...)``
#: lists runs of any type; this tells dinoprop's apart).
RUN_TYPE = "dinoprop_propagation"

#: Precision that the recommended threshold aims for by default.
DEFAULT_TARGET_PRECISION = 0.95

# Graphs of recent runs, reused when a view and its embeddings are unchanged
# (re-running after a human corrects or adds seeds skips the kNN search).
_GRAPH_CACHE: dict = {}
_GRAPH_CACHE_SIZE = 4


class PropagationResults(fors.RunResults):
    """The results of :func:`propagate_labels`, saved with the run.

    Reload them in any process with ``dataset.load_run_results(run_key)``.

    Attributes:
        info: the numbers of :meth:`summary`
        classes: the class names, in score order
        seed_ids: the IDs of the seeds used (samples, or labels for objects)
        oof_labels: the seeds' class indices, aligned with ``oof_probs``
        oof_probs: calibrated out-of-fold class probabilities of the seeds
            (empty when the seeds were too few to cross-validate)
    """

    def summary(self) -> dict:
        """Returns the JSON-serialisable numbers an App result panel shows.

        Keys: ``method``, ``num_seeds``, ``num_classes``, ``num_propagated``,
        ``num_needs_review``, ``estimated_accuracy``,
        ``recommended_threshold``, ``coverage_at_threshold``, ``ece``,
        ``review_threshold``, ``temperature``, ``seconds``, ``run_key``,
        ``output_field``, ``label_field``. Estimates are None when the seeds
        are too few to cross-validate (fewer than 2 per class).
        """
        return dict(self.info)

    def evaluate(
        self,
        gt_field: Optional[str] = None,
        target_precision: float = DEFAULT_TARGET_PRECISION,
    ) -> dict:
        """Estimates (or, with ``gt_field``, measures) the labels' quality.

        Without ``gt_field``, the estimate comes from k-fold
        cross-validation over the seeds (run by :func:`propagate_labels`):
        each seed is predicted by the method fitted on the other folds, and
        the calibrated out-of-fold confidences give accuracy against
        coverage and the threshold reaching ``target_precision``. With
        ``gt_field``, the propagated labels are scored against that field.

        Args:
            gt_field: an optional field with true labels of the targets: a
                Classification field, or for object runs a Detections field
                whose detections share IDs with the label field's
            target_precision: the precision the threshold must reach

        Returns:
            a dict with ``source`` (``"cross_validation"`` or the field),
            ``num_evaluated``, ``accuracy``, ``ece``, ``threshold``,
            ``coverage_at_threshold``, ``precision_at_threshold``,
            ``target_precision`` and ``accuracy_vs_coverage`` (a list of
            ``[coverage, accuracy]`` pairs, most confident first)

        Raises:
            DinopropError: if the seeds were too few to cross-validate and
                no ``gt_field`` is given, or ``gt_field`` is invalid
        """
        if not 0 < target_precision <= 1:
            raise DinopropError(
                "target_precision must be in (0, 1]; got %r" % target_precision
            )
        if gt_field is None:
            if not self.oof_probs:
                raise DinopropError(
                    "The seeds were too few to cross-validate (fewer than 2 "
                    "per class): add seeds, or pass gt_field"
                )
            probs = np.asarray(self.oof_probs, dtype=np.float64)
            confidence = probs.max(axis=1)
            correct = probs.argmax(axis=1) == np.asarray(self.oof_labels)
            source = "cross_validation"
        else:
            confidence, correct = self._against_truth(gt_field)
            source = gt_field
        return _quality_report(confidence, correct, target_precision, source)

    def _against_truth(self, gt_field):
        samples = self.samples
        output_field = self.config.output_field
        if self.config.label_type == "detections":
            require_label_field(samples, gt_field, (_fol().Detections,))
            truth = dict(
                zip(
                    _flatten(samples.values(gt_field + ".detections.id")),
                    _flatten(samples.values(gt_field + ".detections.label")),
                )
            )
            keys, preds, confs = (
                _flatten(samples.values(output_field + ".detections." + p))
                for p in ("source_id", "label", "confidence")
            )
        else:
            require_label_field(samples, gt_field, (_fol().Classification,))
            keys, truths, preds, confs = samples.values(
                ["id", gt_field + ".label", output_field + ".label",
                 output_field + ".confidence"]
            )
            truth = dict(zip(keys, truths))
        rows = [
            (c, p == truth[k])
            for k, p, c in zip(keys, preds, confs)
            if p is not None and truth.get(k) is not None
        ]
        if not rows:
            raise DinopropError(
                "No propagated label has a true label in '%s' to compare "
                "with" % gt_field
            )
        confidence, correct = (np.asarray(v) for v in zip(*rows))
        return confidence.astype(np.float64), correct.astype(bool)


def propagate_labels(
    samples: Any,
    label_field: str,
    embeddings: str = "dinoprop_embedding",
    output_field: Optional[str] = None,
    method: str = "auto",
    k: int = 10,
    seed_tag: Optional[str] = None,
    confidence_threshold: Optional[float] = None,
    store_scores: bool = False,
    run_key: Optional[str] = None,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    progress: Union[None, bool, Callable] = None,
) -> PropagationResults:
    """Propagates a few seed labels to every other sample (or object).

    Seeds are the samples of ``samples`` whose ``label_field`` holds a
    :class:`fiftyone.core.labels.Classification` (with ``seed_tag``, only
    those whose sample carries that tag); targets are all other samples
    with an embedding. Each target gets a
    ``Classification(label, confidence)`` in ``output_field``; seeds get
    None there, and ``label_field`` is never modified.

    When ``label_field`` is a :class:`fiftyone.core.labels.Detections`
    field whose detections carry patch embeddings (the attribute named
    ``embeddings``, as :func:`dinoprop.compute_embeddings` writes with
    ``patches_field``), labeled boxes are the seeds, and every other box
    gets a copy in the ``output_field`` Detections with the propagated
    label and confidence (``source_id`` names the box it copies).

    Confidences are calibrated by temperature scaling fitted on
    cross-validated seed predictions (at least 2 seeds per class are
    needed for that). Targets below the review threshold are tagged
    ``dinoprop:needs_review`` and listed, least confident first, by the
    saved view ``"dinoprop review queue"``.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the Classification (or Detections) field of the seeds
        embeddings: the field (or, for objects, the label attribute)
            holding the embeddings
        output_field: where the propagated labels go; defaults to
            ``"<label_field>_propagated"``
        method: ``"auto"`` (chosen by cross-validation on the seeds; the
            default is graph-smoothed logistic regression on graph-augmented
            features), ``"knn"``, ``"diffusion"``, ``"linear"`` or
            ``"graph_linear"``
        k: the number of neighbours of the kNN graph (and of the ``knn``
            vote)
        seed_tag: only seeds carrying this tag (on the sample, or for
            objects on the detection) are used
        confidence_threshold: targets below this confidence need review;
            defaults to the recommended threshold
        store_scores: whether to store every class's log-probability in
            the ``logits`` of each propagated label
        run_key: the run key; defaults to ``"dinoprop_<output_field>"``
        target_precision: the precision the recommended threshold aims for
        progress: None (FiftyOne's default), a bool, or a progress callback

    Returns:
        a :class:`PropagationResults`

    Raises:
        DinopropError: for invalid input (no seeds, a single class, seeds
            without embeddings, a wrong field type, ``output_field`` equal
            to ``label_field``); nothing is written then
    """
    start = time.time()
    fol = _fol()
    validate_samples(samples)
    output_field = output_field or label_field + "_propagated"
    run_key = run_key or "dinoprop_" + "".join(
        c if c.isalnum() else "_" for c in output_field
    )
    label_type = _check_arguments(
        samples, label_field, embeddings, output_field, method, k,
        confidence_threshold, target_precision, run_key,
    )
    objects = label_type is fol.Detections
    with progress_bar(4, progress, iters_str="steps") as bar:
        if objects:
            data = _object_data(samples, label_field, embeddings, seed_tag, k)
        else:
            data = _sample_data(samples, label_field, embeddings, seed_tag, k)
        bar.update()
        classes, seed_labels = np.unique(data["seed_labels"], return_inverse=True)
        problem = pm.Problem(
            pm.center_and_normalize(data["embeddings"]),
            data["graph"],
            len(classes),
            knn_k=k,
        )
        outcome = pm.propagate(problem, data["seed_idx"], seed_labels, method=method)
        bar.update()
        targets = np.setdiff1d(np.arange(len(data["ids"])), data["seed_idx"])
        probs = outcome.probs[targets]
        confidence = probs.max(axis=1).astype(np.float64)
        calibrated = outcome.oof_probs is not None
        recommended, coverage, _ = pm.threshold_for_precision(
            confidence, target_precision
        )
        review_threshold = (
            recommended if confidence_threshold is None else confidence_threshold
        )
        needs_review = confidence < review_threshold
        writer = _write_objects if objects else _write_samples
        num_review_samples = writer(
            samples, data, output_field, targets, classes, probs,
            needs_review, store_scores,
        )
        bar.update()
        info = {
            "method": outcome.method,
            "num_seeds": int(len(data["seed_idx"])),
            "num_classes": int(len(classes)),
            "num_propagated": int(len(targets)),
            "num_needs_review": int(num_review_samples),
            "estimated_accuracy": _cv_accuracy(outcome),
            "recommended_threshold": float(recommended) if calibrated else None,
            "coverage_at_threshold": float(coverage) if calibrated else None,
            "review_threshold": float(review_threshold),
            "ece": _cv_ece(outcome),
            "temperature": float(outcome.temperature),
            "cv_accuracy_by_method": outcome.cv_accuracy,
            "seconds": 0.0,
            "run_key": run_key,
            "label_field": label_field,
            "output_field": output_field,
        }
        results = _save_run(
            samples, run_key, info, classes, data, seed_labels, outcome,
            label_field=label_field,
            embeddings=embeddings,
            output_field=output_field,
            requested_method=method,
            k=k,
            seed_tag=seed_tag,
            confidence_threshold=confidence_threshold,
            target_precision=target_precision,
            label_type="detections" if objects else "classification",
            start=start,
        )
        bar.update()
    return results


# ------------------------------------------------------------ validation


def _fol():
    import fiftyone.core.labels as fol

    return fol


def _check_arguments(
    samples, label_field, embeddings, output_field, method, k,
    confidence_threshold, target_precision, run_key,
):
    """Validates everything that needs no embeddings; returns the label type."""
    fol = _fol()
    if method not in pm.METHODS:
        raise DinopropError(
            "Unknown method %r; choose one of %s" % (method, ", ".join(pm.METHODS))
        )
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DinopropError("k must be a positive integer; got %r" % (k,))
    if output_field == label_field:
        raise DinopropError(
            "output_field must differ from label_field ('%s'): human labels "
            "are never overwritten" % label_field
        )
    if output_field == embeddings:
        raise DinopropError(
            "output_field must differ from the embeddings field '%s'" % embeddings
        )
    if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
        raise DinopropError(
            "confidence_threshold must be in [0, 1]; got %r" % confidence_threshold
        )
    if not 0 < target_precision <= 1:
        raise DinopropError(
            "target_precision must be in (0, 1]; got %r" % target_precision
        )
    if not run_key.isidentifier():
        raise DinopropError(
            "run_key must be a valid Python identifier; got %r" % run_key
        )
    label_type = require_label_field(
        samples, label_field, (fol.Classification, fol.Detections)
    )
    if samples.get_field(output_field) is not None:
        require_label_field(samples, output_field, (label_type,))
    return label_type


def _check_seeds(labels, has_embedding, what):
    """Raises unless the seeds have embeddings and at least two classes."""
    if len(labels) == 0:
        raise DinopropError(
            "No seeds: no %s. Annotate a few per class first "
            "(dinoprop.suggest_seeds tells you which)" % what
        )
    missing = int(np.sum(~has_embedding))
    if missing:
        raise DinopropError(
            "%d of the %d seeds have no embedding; run "
            "dinoprop.compute_embeddings on them first" % (missing, len(labels))
        )
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise DinopropError(
            "All seeds have the same class (%s); label seeds of at least two "
            "classes" % distinct[0]
        )


# ------------------------------------------------------------- samples


def _sample_data(samples, label_field, embeddings, seed_tag, k):
    require_field(
        samples, embeddings,
        "an embeddings field (run dinoprop.compute_embeddings first)",
    )
    check_vector_field(samples, embeddings)
    ids, labels, tags = samples.values(["id", label_field + ".label", "tags"])
    embedded = set(samples.exists(embeddings).values("id"))
    is_seed = [
        lab is not None and (seed_tag is None or seed_tag in (t or []))
        for lab, t in zip(labels, tags)
    ]
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
    sample_ids, vectors, graph = _graph(samples, embeddings, k)
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
    }


def _graph(samples, embeddings, k):
    """The kNN graph of the view, reused when nothing it depends on changed."""
    from dinoprop.graph import sample_knn_graph

    key = (
        samples._root_dataset._doc.id,
        str(samples.view()._serialize(include_uuids=False)),  # the stages only
        embeddings,
        int(k),
    )
    ids, vectors = load_embeddings(samples, embeddings)
    cached = _GRAPH_CACHE.get(key)
    if (
        cached is not None
        and np.array_equal(cached[0], ids)
        and np.array_equal(cached[1], vectors)
    ):
        return cached
    ids, vectors, neighbors, sims = sample_knn_graph(
        samples, embeddings, k, loaded=(ids, vectors)
    )
    entry = (ids, vectors, pm.Graph(neighbors, sims))
    if len(_GRAPH_CACHE) >= _GRAPH_CACHE_SIZE:
        _GRAPH_CACHE.pop(next(iter(_GRAPH_CACHE)))
    _GRAPH_CACHE[key] = entry
    return entry


def _write_samples(
    samples, data, output_field, targets, classes, probs, needs_review,
    store_scores,
):
    """Writes target labels and clears seeds' outputs; returns #to review."""
    fol = _fol()
    ids = data["ids"]
    values = {sid: None for sid in ids[data["seed_idx"]]}
    best = probs.argmax(axis=1)
    for row, node in enumerate(targets):
        label = fol.Classification(
            label=str(classes[best[row]]),
            confidence=float(probs[row, best[row]]),
        )
        if store_scores:
            label.logits = np.log(np.clip(probs[row], 1e-12, None)).astype(float)
        values[ids[node]] = label
    samples.set_values(output_field, values, key_field="id")
    review_ids = list(ids[targets[needs_review]])
    _mark_for_review(samples, review_ids, output_field + ".confidence")
    return len(review_ids)


def _mark_for_review(samples, review_ids, sort_key):
    """Tags the samples to review and saves the review queue view.

    Args:
        samples: the collection
        review_ids: the IDs of the samples to review
        sort_key: the field path or expression ranking them, ascending
    """
    samples.untag_samples(NEEDS_REVIEW_TAG)
    if review_ids:
        samples.select(review_ids).tag_samples(NEEDS_REVIEW_TAG)
    queue = samples.match_tags(NEEDS_REVIEW_TAG).sort_by(sort_key)
    samples._root_dataset.save_view(
        REVIEW_QUEUE_VIEW,
        queue,
        description="Samples whose propagated label needs review, least "
        "confident first (written by dinoprop.propagate_labels)",
        overwrite=True,
    )


# ------------------------------------------------------------- objects


def _flatten(nested):
    """Flattens per-sample lists of per-label values (None lists skipped)."""
    return [v for values in nested for v in (values or [])]


def _as_vector(value):
    """A label attribute's embedding as an array (undeclared ones are bytes)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        import fiftyone.core.utils as fou

        return fou.deserialize_numpy_array(value)
    return np.asarray(value, np.float32)


def _object_data(samples, label_field, embeddings, seed_tag, k):
    from dinoprop.graph import knn_search

    path = label_field + ".detections."
    sample_ids, det_ids, labels, tags, vectors = samples.values(
        ["id", path + "id", path + "label", path + "tags", path + embeddings]
    )
    owner = np.array(
        [sid for sid, dets in zip(sample_ids, det_ids) for _ in (dets or [])]
    )
    det_ids, labels, tags, vectors = (
        _flatten(v) for v in (det_ids, labels, tags, vectors)
    )
    vectors = [_as_vector(v) for v in vectors]
    has_embedding = np.array([v is not None for v in vectors], bool)
    is_seed = np.array(
        [
            lab is not None and (seed_tag is None or seed_tag in (t or []))
            for lab, t in zip(labels, tags)
        ],
        bool,
    )
    where = "object in '%s' has a label%s" % (
        label_field,
        "" if seed_tag is None else " and the tag '%s'" % seed_tag,
    )
    _check_seeds(
        [lab for lab, s in zip(labels, is_seed) if s], has_embedding[is_seed], where
    )
    keep = np.flatnonzero(has_embedding)
    if len(keep) == int(is_seed.sum()):
        raise DinopropError(
            "Every object with an embedding is a seed: there is nothing to "
            "propagate to"
        )
    matrix = np.stack([np.asarray(vectors[i], np.float32) for i in keep])
    neighbors, sims = knn_search(matrix, k)
    seed_idx = np.flatnonzero(is_seed[keep])
    return {
        "ids": np.array(det_ids)[keep],
        "owners": owner[keep],
        "embeddings": matrix,
        "graph": pm.Graph(neighbors, sims),
        "seed_idx": seed_idx,
        "seed_labels": np.array([labels[i] for i in keep[seed_idx]]),
        "label_field": label_field,
    }


def _write_objects(
    samples, data, output_field, targets, classes, probs, needs_review,
    store_scores,
):
    """Writes a Detections copy of every target box; returns #to review."""
    from fiftyone import ViewField as F

    fol = _fol()
    predicted = {}
    best = probs.argmax(axis=1)
    for row, node in enumerate(targets):
        predicted[data["ids"][node]] = (row, best[row])
    sample_ids, detections = samples.values(
        ["id", data["label_field"] + ".detections"]
    )
    values = {}
    for sid, dets in zip(sample_ids, detections):
        out = []
        for det in dets or []:
            if det.id not in predicted:
                continue
            row, cls = predicted[det.id]
            copy = fol.Detection(
                label=str(classes[cls]),
                confidence=float(probs[row, cls]),
                bounding_box=det.bounding_box,
                source_id=det.id,
            )
            if store_scores:
                copy.logits = np.log(np.clip(probs[row], 1e-12, None)).astype(float)
            out.append(copy)
        values[sid] = fol.Detections(detections=out)
    samples.set_values(output_field, values, key_field="id")
    review_ids = sorted(set(data["owners"][targets[needs_review]]))
    confidences = F(output_field + ".detections.confidence")
    _mark_for_review(samples, review_ids, confidences.min())
    return len(review_ids)


# ----------------------------------------------------------------- runs


def _cv_accuracy(outcome):
    if outcome.oof_probs is None:
        return None
    return float((outcome.oof_probs.argmax(1) == outcome.oof_labels).mean())


def _cv_ece(outcome):
    if outcome.oof_probs is None:
        return None
    return pm.expected_calibration_error(
        outcome.oof_probs.max(1), outcome.oof_probs.argmax(1) == outcome.oof_labels
    )


def _save_run(
    samples, run_key, info, classes, data, seed_labels, outcome, start, **params
):
    """Records the run and its results on the dataset."""
    config = samples.init_run(
        method=outcome.method, run_type=RUN_TYPE, **params
    )
    samples.register_run(run_key, config, overwrite=True)
    oof = outcome.oof_probs
    info["seconds"] = round(time.time() - start, 3)
    results = PropagationResults(
        samples,
        config,
        run_key,
        info=info,
        classes=[str(c) for c in classes],
        seed_ids=[str(i) for i in data["ids"][data["seed_idx"]]],
        oof_labels=[] if oof is None else [int(v) for v in outcome.oof_labels],
        oof_probs=[] if oof is None else np.round(oof, 5).tolist(),
    )
    samples.save_run_results(run_key, results, overwrite=True)
    return results


def _quality_report(confidence, correct, target_precision, source):
    """Accuracy, calibration and auto-accept figures of scored predictions."""
    threshold, coverage, precision = pm.threshold_for_precision(
        confidence, target_precision, correct
    )
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    curve = [
        [round(float(q), 2), round(float(hits[max(int(q * len(order)) - 1, 0)]), 4)]
        for q in np.linspace(0.1, 1.0, 10)
    ]
    return {
        "source": source,
        "num_evaluated": int(len(confidence)),
        "accuracy": float(np.mean(correct)),
        "ece": pm.expected_calibration_error(confidence, correct),
        "target_precision": float(target_precision),
        "threshold": threshold,
        "coverage_at_threshold": coverage,
        "precision_at_threshold": precision,
        "accuracy_vs_coverage": curve,
    }
