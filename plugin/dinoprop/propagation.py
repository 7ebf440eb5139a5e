"""Label propagation on FiftyOne collections: seeds in, calibrated labels out.

:func:`propagate_labels` reads the seed labels of a view and the embeddings
of its samples (or of their object patches), propagates the seeds over the
kNN graph of the embeddings with a method of
:mod:`dinoprop.propagation_methods`, and writes one label with a calibrated
confidence per target. The run is recorded on the dataset like any FiftyOne
run (``dataset.list_runs()``, ``load_run_results()``, ``rename_run()``, and
``delete_run()``, which removes what the run wrote) and its
:class:`PropagationResults` estimate the accuracy of the labels it wrote.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import numpy as np

import fiftyone.core.runs as fors

from dinoprop import propagation_methods as pm
from dinoprop.label_schema import enable_annotation
from dinoprop.label_states import accepted_unedited_ids
from dinoprop.core import (
    TAG_PREFIX,
    DinopropError,
    check_field_name,
    check_vector_field,
    decode_vector,
    require_field,
    load_embeddings,
    progress_bar,
    require_label_field,
    validate_samples,
)

logger = logging.getLogger(__name__)

#: Tag of samples whose propagated label is below the review threshold.
NEEDS_REVIEW_TAG = TAG_PREFIX + "needs_review"

#: Name of the saved view listing samples to review, least confident first.
REVIEW_QUEUE_VIEW = "dinoprop review queue"

#: The run type recorded in the run config (``dataset.list_runs(type=...)``
#: lists runs of any type; this tells dinoprop's apart).
RUN_TYPE = "dinoprop_propagation"

#: Attributes of every propagated Classification: the most likely classes,
#: most likely first (the label itself, then the alternatives), and their
#: calibrated probabilities (rounded to 4 decimals).
TOP_LABELS_ATTRIBUTE = "dinoprop_top_labels"
TOP_CONFIDENCES_ATTRIBUTE = "dinoprop_top_confidences"

#: How many classes those attributes hold.
NUM_TOP_CLASSES = 4

#: Precision that the recommended threshold aims for by default.
DEFAULT_TARGET_PRECISION = 0.95

# Graphs of recent runs, reused when a view and its embeddings are unchanged
# (re-running after a human corrects or adds seeds skips the kNN search).
_GRAPH_CACHE: dict = {}
_GRAPH_CACHE_SIZE = 4


class PropagationRunConfig(fors.RunConfig):
    """The recorded parameters of a :func:`propagate_labels` run.

    ``dataset.get_run_info(run_key).config`` holds ``label_field``,
    ``output_field``, ``embeddings``, ``requested_method``, ``k``,
    ``seed_tag``, ``confidence_threshold``, ``target_precision``,
    ``label_type`` and ``method`` (the method used).
    """


class PropagationRun(fors.Run):
    """A :func:`propagate_labels` run as FiftyOne manages it.

    ``dataset.delete_run(run_key)`` removes what the run wrote, as deleting
    a FiftyOne Brain run does: its output field (unless another run writes
    the same field), and, when the review queue is this run's (every run
    saves it, so it belongs to the newest run), the saved view and the
    ``dinoprop:needs_review`` tags.
    """

    def get_fields(self, samples, key):
        return [self.config.output_field]

    def cleanup(self, samples, key):
        dataset = samples._root_dataset
        output = self.config.output_field
        # every run saves the queue, so it is the newest run's
        if dataset.has_saved_view(REVIEW_QUEUE_VIEW) and _newest_run(dataset) == key:
            dataset.delete_saved_view(REVIEW_QUEUE_VIEW)
            dataset.untag_samples(NEEDS_REVIEW_TAG)
        others = [k for k in _propagation_runs(dataset, output) if k != key]
        if not others and dataset.get_field(output) is not None:
            dataset.delete_sample_field(output)


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

        Keys: ``method``, ``num_seeds``, ``num_classes``, ``num_propagated``
        (targets: samples, or boxes for object runs), ``num_needs_review``
        (samples with the review tag; for object runs, samples with at
        least one box below the threshold), ``estimated_accuracy``,
        ``recommended_threshold`` (the lowest confidence whose accepted
        targets reach the target precision by their calibrated
        confidences), ``coverage_at_threshold`` (the fraction of targets
        it accepts), ``num_flipped`` (targets whose class differs from the
        label an earlier run wrote there; None for object runs), ``ece``,
        ``review_threshold``, ``temperature`` and
        ``temperature_spread`` (the standard deviation of its logarithm,
        which the confidences are averaged over), ``seconds``,
        ``run_key``, ``output_field``, ``label_field`` and ``note`` (why
        nothing can be accepted, or None). Estimates are None when the
        seeds are too few to cross-validate (fewer than 2 per class).
        """
        return dict(self.info, run_key=self.key or self.info.get("run_key"))

    def evaluate(
        self,
        gt_field: Optional[str] = None,
        target_precision: float = DEFAULT_TARGET_PRECISION,
    ) -> dict:
        """Estimates (or, with ``gt_field``, measures) the labels' quality.

        Without ``gt_field``, the estimate comes from k-fold
        cross-validation over the seeds (run by :func:`propagate_labels`):
        each seed is predicted by the method fitted on the other folds, and
        the calibrated out-of-fold confidences give the accuracy, the
        calibration error and accuracy against coverage. The threshold is
        then the lowest confidence whose accepted targets reach
        ``target_precision`` by their calibrated confidences (the
        calibration is the one fitted by the cross-validation), with the
        fraction of targets it accepts: the same figures as
        :meth:`summary`'s ``recommended_threshold`` and
        ``coverage_at_threshold``. With ``gt_field``, the propagated labels
        are scored against that field and the threshold is the lowest that
        reaches ``target_precision`` on the truth.

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
            correct = probs.argmax(axis=1) == np.asarray(self.oof_labels)
            report = _quality_report(
                probs.max(axis=1), correct, target_precision, "cross_validation"
            )
            threshold, coverage, precision = pm.threshold_for_precision(
                self._target_confidences(), target_precision
            )
            report.update(
                threshold=threshold,
                coverage_at_threshold=coverage,
                precision_at_threshold=precision,
            )
            return report
        confidence, correct = self._against_truth(gt_field)
        return _quality_report(confidence, correct, target_precision, gt_field)

    def _target_confidences(self) -> np.ndarray:
        """The calibrated confidences this run wrote on its targets."""
        path = self.config.output_field + (
            ".detections.confidence"
            if self.config.label_type == "detections"
            else ".confidence"
        )
        values = self.samples.values(path)
        if self.config.label_type == "detections":
            values = _flatten(values)
        return np.array([v for v in values if v is not None], np.float64)

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
    overwrite: bool = False,
    progress: Union[None, bool, Callable] = None,
) -> PropagationResults:
    """Propagates a few seed labels to every other sample (or object).

    Seeds are the samples of ``samples`` whose ``label_field`` holds a
    :class:`fiftyone.core.labels.Classification` (with ``seed_tag``, only
    those whose sample carries that tag), except labels that
    :func:`dinoprop.accept_propagated_labels` wrote and no human has
    corrected since: those are the method's own output, not evidence.
    Targets are all other samples with an embedding. Each target gets a
    ``Classification(label, confidence)`` in ``output_field`` whose
    attributes ``dinoprop_top_labels`` and ``dinoprop_top_confidences``
    hold its 4 most likely classes and their probabilities (what the App's
    triage panel offers as alternatives); seeds get None there, and the
    labels of ``label_field`` are never modified. A re-run writes only the
    labels that changed. Both fields get label schemas
    (:func:`dinoprop.review.enable_annotation`), so the App's Annotate tab
    edits ``label_field`` with the full class list and shows the
    propagated field read-only.

    When ``label_field`` is a :class:`fiftyone.core.labels.Detections`
    field whose detections carry patch embeddings (the attribute named
    ``embeddings``, as :func:`dinoprop.compute_embeddings` writes with
    ``patches_field``), labeled boxes are the seeds, and every other box
    gets a copy in the ``output_field`` Detections with the propagated
    label and confidence (``source_id`` names the box it copies).

    Confidences are calibrated by temperature scaling fitted on
    cross-validated seed predictions (at least 2 seeds per class are
    needed for that), averaged over how uncertain that fit is, so a few
    dozen seeds do not promise more than they can vouch for. Targets below
    the review threshold are tagged ``dinoprop:needs_review`` and listed,
    least confident first, by the saved view ``"dinoprop review queue"``
    (samples leave it once their ``label_field`` holds a label). When no
    threshold reaches ``target_precision`` (too few seeds to vouch for it,
    or too hard a problem), every target is marked for review and the
    summary's ``note`` (also logged as a warning) says why.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the Classification (or Detections) field of the seeds
        embeddings: the field (or, for objects, the label attribute)
            holding the embeddings
        output_field: where the propagated labels go, a top-level field;
            defaults to ``"<label_field>_propagated"``. An existing field is
            only replaced if an earlier propagation wrote it, or with
            ``overwrite=True``
        method: ``"auto"`` (chosen by cross-validation on the seeds; the
            default is graph-smoothed logistic regression on graph-augmented
            features), ``"knn"``, ``"diffusion"``, ``"linear"`` or
            ``"graph_linear"``; the method an ``auto`` run chose (its
            summary's ``method``, e.g. ``"graph_linear@0.8"``) is accepted
            too
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
        overwrite: whether ``output_field`` may replace an existing label
            field that no propagation run wrote
        progress: None (FiftyOne's default), a bool, or a progress callback

    Returns:
        a :class:`PropagationResults`

    Raises:
        DinopropError: for invalid input (no seeds, a single class, seeds
            without embeddings, a wrong field type, an ``output_field``
            equal to ``label_field``, nested, or holding other labels, a
            ``run_key`` of another kind of run); nothing is written then
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
        confidence_threshold, target_precision, run_key, overwrite,
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
            confidence_threshold
            if confidence_threshold is not None
            else recommended if calibrated else 1.0
        )
        note = _threshold_note(
            outcome, confidence, coverage, target_precision, confidence_threshold
        )
        if note:
            logger.warning(note)
        needs_review = confidence < review_threshold
        writer = _write_objects if objects else _write_samples
        num_review_samples, num_flipped = writer(
            samples, data, output_field, targets, classes, probs,
            needs_review, store_scores,
        )
        if not objects:
            enable_annotation(samples, label_field, output_field=output_field)
        bar.update()
        info = {
            "method": outcome.method,
            "num_seeds": int(len(data["seed_idx"])),
            "num_classes": int(len(classes)),
            "num_propagated": int(len(targets)),
            "num_needs_review": int(num_review_samples),
            "num_flipped": num_flipped,
            "estimated_accuracy": _cv_accuracy(outcome),
            "recommended_threshold": float(recommended) if calibrated else None,
            "coverage_at_threshold": float(coverage) if calibrated else None,
            "review_threshold": float(review_threshold),
            "ece": _cv_ece(outcome),
            "temperature": float(outcome.temperature),
            "temperature_spread": float(outcome.temperature_spread),
            "cv_accuracy_by_method": outcome.cv_accuracy,
            "seconds": 0.0,
            "run_key": run_key,
            "label_field": label_field,
            "output_field": output_field,
            "note": note,
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


def _threshold_note(outcome, confidence, coverage, target_precision, chosen):
    """Why no target can be accepted at the target precision, or None."""
    if outcome.oof_probs is None:
        return (
            "Too few seeds to calibrate the confidences (cross-validation "
            "needs 2 seeds in each of at least 2 classes): no threshold is "
            "recommended%s" % ("" if chosen is not None else
                               " and every target is marked for review")
        )
    if coverage > 0:
        return None
    checked = len(outcome.oof_labels)
    top = float(confidence.max(initial=0.0))
    cap = 1.0 - (1.0 - 1.0 / outcome.probs.shape[1]) * pm.laplace_shrink(checked)
    limit = (
        "the most %d cross-validated seeds can vouch for" % checked
        if top >= cap - 1e-4
        else "the seeds do not separate the classes more surely"
    )
    return (
        "No threshold reaches the target precision of %.0f%%: the most "
        "confident labels are estimated at %.1f%%, %s. %sAdd seeds "
        "(dinoprop.suggest_seeds picks them) or lower target_precision"
        % (
            100 * target_precision, 100 * top, limit,
            "" if chosen is not None else "Every target is marked for review. ",
        )
    )


def propagation_run_key(samples: Any, output_field: str) -> Optional[str]:
    """The key of the propagation run that wrote ``output_field``, or None.

    Args:
        samples: a FiftyOne dataset or view (its dataset's runs are searched)
        output_field: a field name

    Returns:
        a run key of ``samples``' dataset, or None
    """
    keys = _propagation_runs(samples._root_dataset, output_field)
    return keys[0] if keys else None


def _propagation_runs(dataset, output_field=None):
    """The keys of the propagation runs (that wrote ``output_field``, if
    given)."""
    keys = []
    for key in dataset.list_runs():
        config = dataset.get_run_info(key).config
        if getattr(config, "run_type", None) == RUN_TYPE and (
            output_field is None
            or getattr(config, "output_field", None) == output_field
        ):
            keys.append(key)
    return keys


def _newest_run(dataset):
    """The key of the most recently started propagation run, or None."""
    started = [(dataset.get_run_info(k).timestamp, k) for k in _propagation_runs(dataset)]
    return max(started)[1] if started else None


def check_output_field(
    samples: Any, label_field: str, output_field: str, overwrite: bool = False
) -> None:
    """Checks that propagated labels may be written to ``output_field``.

    It must be a top-level field other than ``label_field``; if it exists it
    must hold the label type of ``label_field`` and have been written by an
    earlier propagation (or ``overwrite`` must be True), so that no human
    labels and no other predictions are replaced.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the seed label field
        output_field: the field the propagated labels would go to
        overwrite: whether an existing field no propagation wrote may be
            replaced

    Raises:
        DinopropError: if the field may not be written, saying why
    """
    check_field_name(output_field, "output_field")
    if output_field == label_field:
        raise DinopropError(
            "output_field must differ from label_field ('%s'): human labels "
            "are never overwritten" % label_field
        )
    if samples.get_field(output_field) is None:
        return
    label_type = require_label_field(samples, label_field, _label_types())
    require_label_field(samples, output_field, (label_type,))
    if not overwrite and propagation_run_key(samples, output_field) is None:
        raise DinopropError(
            "Field '%s' already holds labels that no propagation run wrote; "
            "choose another output_field, or pass overwrite=True to replace "
            "them" % output_field
        )


def _label_types():
    fol = _fol()
    return fol.Classification, fol.Detections


def _check_arguments(
    samples, label_field, embeddings, output_field, method, k,
    confidence_threshold, target_precision, run_key, overwrite,
):
    """Validates everything that needs no embeddings; returns the label type."""
    if method not in pm.METHODS and method not in pm.AUTO_CANDIDATES:
        raise DinopropError(
            "Unknown method %r; choose one of %s" % (method, ", ".join(pm.METHODS))
        )
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DinopropError("k must be a positive integer; got %r" % (k,))
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
    dataset = samples._root_dataset
    if run_key in dataset.list_runs():
        run_type = getattr(dataset.get_run_info(run_key).config, "run_type", None)
        if run_type != RUN_TYPE:
            raise DinopropError(
                "run_key '%s' names another kind of run on this dataset; "
                "choose another run_key" % run_key
            )
    label_type = require_label_field(samples, label_field, _label_types())
    check_output_field(samples, label_field, output_field, overwrite)
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
    ids, labels, is_seed = _sample_seeds(samples, label_field, seed_tag)
    embedded = {str(i) for i in samples.exists(embeddings).values("_id", _raw=True)}
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
        "label_field": label_field,
    }


def _sample_seeds(samples, label_field, seed_tag):
    """Sample IDs, their labels, and which of them are seeds."""
    paths = ["_id", label_field + ".label"] + (["tags"] if seed_tag else [])
    columns = samples.values(paths, _raw=True)  # no per-value conversion
    ids = [str(i) for i in columns[0]]
    labels = columns[1]
    tags = columns[2] if seed_tag else [None] * len(ids)
    machine = accepted_unedited_ids(samples, label_field)
    is_seed = [
        sid not in machine and _is_seed(lab, t, seed_tag)
        for sid, lab, t in zip(ids, labels, tags)
    ]
    return ids, labels, is_seed


def _is_seed(label, tags, seed_tag):
    """Whether a label (of a sample or a box) is a seed: labeled, and
    carrying ``seed_tag`` when one is required."""
    return label is not None and (seed_tag is None or seed_tag in (tags or []))


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
    """Writes target labels and clears seeds' outputs; returns (#to review,
    #labels whose class changed)."""
    from dinoprop.label_writes import write_classifications

    ids = data["ids"]
    top = np.argsort(-probs, axis=1, kind="stable")[:, :NUM_TOP_CLASSES]
    top_probs = np.take_along_axis(probs, top, axis=1).astype(np.float64)
    names = np.asarray(classes).astype(str)
    written = write_classifications(
        samples,
        output_field,
        ids[targets],
        names[top[:, 0]].tolist(),
        top_probs[:, 0],
        {
            TOP_LABELS_ATTRIBUTE: names[top].tolist(),
            TOP_CONFIDENCES_ATTRIBUTE: np.round(top_probs, 4).tolist(),
        },
        clear_ids=ids[data["seed_idx"]],
        vectors=(
            {"logits": np.log(np.clip(probs, 1e-12, None))} if store_scores else None
        ),
    )
    review_ids = list(ids[targets[needs_review]])
    _mark_for_review(
        samples, review_ids, output_field, output_field + ".confidence",
        data["label_field"],
    )
    return len(review_ids), written["num_flipped"]


def _mark_for_review(samples, review_ids, output_field, sort_key, unlabeled_in=None):
    """Tags the samples to review and saves the review queue view.

    Args:
        samples: the collection
        review_ids: the IDs of the samples to review
        output_field: the field of the propagated labels
        sort_key: the field path or expression ranking them, ascending
        unlabeled_in: an optional label field: samples that have a label
            there (a human's, or an accepted one) leave the queue
    """
    from dinoprop.label_writes import retag

    retag(samples, NEEDS_REVIEW_TAG, review_ids)  # writes only changed tags
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


# ------------------------------------------------------------- objects


def _flatten(nested):
    """Flattens per-sample lists of per-label values (None lists skipped)."""
    return [v for values in nested for v in (values or [])]


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
    vectors = [None if v is None else decode_vector(v) for v in vectors]
    has_embedding = np.array([v is not None for v in vectors], bool)
    if not has_embedding.any():
        raise DinopropError(
            "No object in '%s' has an embedding in its attribute '%s'; run "
            "dinoprop.compute_embeddings(..., patches_field='%s') first, or "
            "pass the attribute holding the patch embeddings as embeddings="
            % (label_field, embeddings, label_field)
        )
    is_seed = np.array(
        [_is_seed(lab, t, seed_tag) for lab, t in zip(labels, tags)],
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
    # the labels are built here, so FiftyOne need not validate each one
    samples.set_values(output_field, values, key_field="id", validate=False)
    review_ids = sorted(set(data["owners"][targets[needs_review]]))
    confidences = F(output_field + ".detections.confidence")
    _mark_for_review(samples, review_ids, output_field, confidences.min())
    return len(review_ids), None


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
    config = PropagationRunConfig(method=outcome.method, run_type=RUN_TYPE, **params)
    dataset = samples._root_dataset
    if run_key in dataset.list_runs() and not isinstance(
        dataset.get_run_info(run_key).config, PropagationRunConfig
    ):  # recorded by an older dinoprop: same run, older config class
        fors.Run.delete_run(dataset, run_key, cleanup=False)
    # the outputs were just written: replacing the record must not clean up
    samples.register_run(run_key, config, overwrite=True, cleanup=False)
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
