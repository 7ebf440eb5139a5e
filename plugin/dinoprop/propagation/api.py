"""``propagate_labels``: validate, read, propagate, write, record."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import numpy as np

from dinoprop import propagation_methods as pm
from dinoprop.core import (
    ANNOTATE_NEXT_TAG,
    DinopropError,
    check_field_name,
    check_int,
    check_number,
    progress_bar,
    require_label_field,
    validate_samples,
)
from dinoprop.label_schema import try_enable_annotation
from dinoprop.propagation.common import (
    CONFIDENCE_TOLERANCE,
    DEFAULT_TARGET_PRECISION,
    RUN_TYPE,
    _fol,
    _label_types,
)
from dinoprop.propagation.objects import _object_data, _write_objects
from dinoprop.propagation.runs import (
    WRITING,
    PropagationResults,
    _begin_run,
    _cv_accuracy,
    _cv_ece,
    _finish_run,
    _results_fields,
    propagation_run_key,
)
from dinoprop.propagation.samples import _sample_data, _write_samples, settle_labels

logger = logging.getLogger(__name__)


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
    target_accuracy: float = pm.DEFAULT_TARGET_ACCURACY,
    overwrite: bool = False,
    progress: Union[None, bool, Callable] = None,
    engine: str = "local",
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
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
    labels that changed: a label whose class and alternatives are the same
    and whose confidences moved by at most
    :data:`~dinoprop.propagation.common.CONFIDENCE_TOLERANCE` (0.001) is
    kept as stored, and the run's thresholds, review queue and stop plan
    use that stored confidence (``summary()["num_kept"]`` counts them;
    with ``store_scores`` every label is rewritten). Both fields get label schemas
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

    The summary's ``stop_plan`` says what finishing the dataset now would
    take: accept the most confident labels, as many as keep the whole
    dataset (seeds, accepted and hand-labeled samples) at
    ``target_accuracy`` by their calibrated confidences, and label the
    rest by hand; its ``cost`` is the human labels that makes in all.
    Runs under the same ``run_key`` keep the history of that cost, from
    which ``stop_plan`` forecasts what the next batch of suggested labels
    would save and recommends when to stop labeling seeds
    (:func:`dinoprop.propagation_methods.stopping_forecast`); the plan of
    a run that recommends stopping accepts no more labels than the
    trend's cost allows, so one run's bolder calibration does not break
    the promise (:func:`dinoprop.propagation_methods.plan_stop`).

    Samples that :func:`dinoprop.suggest_seeds` suggested (they carry its
    tag ``dinoprop:annotate_next``) and a human labeled since the last run
    under the same ``run_key`` are scored as that run would have scored
    them, and these checked predictions, handed on from run to run, join
    the calibration (``summary()["num_checked_predictions"]`` counts
    them): the loop asks for the samples the propagation is least sure
    of, so the held-out seeds alone make the targets look less certain
    than they are (:class:`dinoprop.propagation_methods.CheckedPredictions`).

    The run is recorded, with ``summary()["status"] == "writing"``, before
    any label is written, and marked ``"complete"`` once every label is.
    A run that is interrupted (killed, or failing while writing) therefore
    still owns its output field: :func:`dinoprop.review.accept_propagated_labels`
    and :meth:`PropagationResults.evaluate` refuse the half-written field,
    :func:`dinoprop.review.loop_status` says so in its ``note``, repeating
    the call completes it (no ``overwrite`` needed), and
    ``dataset.delete_run(run_key)`` removes it.

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
            summary's ``method``, e.g. ``"graph_linear@0.5"``) is accepted
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
        target_accuracy: the accuracy the whole labeled dataset must reach
            when the team stops (the ``stop_plan``)
        overwrite: whether ``output_field`` may replace an existing label
            field that no propagation run wrote
        progress: None (FiftyOne's default), a bool, or a progress callback
        engine: where the kNN graph of samples is searched when no
            similarity run caches it: ``"local"`` (this process) or
            ``"ray"`` (a Ray cluster, needing ``pip install
            'fiftyone-dinoprop[scale]'``: the IVF index is trained here
            and the rows searched by Ray actors, giving the same graph;
            views under :data:`dinoprop.graph.APPROXIMATE_MIN_NODES`
            samples are searched exactly here). Propagation itself runs in
            this process; graphs of objects are always searched here
        ray_address: with ``engine="ray"``, the cluster's address (e.g.
            ``"ray://head:10001"``); None uses ``RAY_ADDRESS``, a cluster
            started on this machine, or a new local one
        num_workers: with ``engine="ray"``, the searching actors (default
            one per node of the cluster)

    Returns:
        a :class:`PropagationResults`

    Raises:
        DinopropError: for invalid input (no seeds, a single class, seeds
            without embeddings, embeddings holding NaN or infinite values,
            a non-integer ``k``, a wrong field type, an ``output_field``
            equal to ``label_field``, nested, or holding other labels, a
            ``run_key`` of another kind of run, bad engine options,
            ``engine="ray"`` for objects, a Ray cluster that cannot be
            reached); nothing is written then
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
    _check_fraction(target_accuracy, "target_accuracy")
    objects = label_type is fol.Detections
    graph_engine = _check_engine(engine, ray_address, num_workers, objects)
    with progress_bar(4, progress, iters_str="steps") as bar:
        if objects:
            data = _object_data(samples, label_field, embeddings, seed_tag, k)
        else:
            data = _sample_data(
                samples, label_field, embeddings, seed_tag, k, graph_engine
            )
        bar.update()
        classes, seed_labels = np.unique(data["seed_labels"], return_inverse=True)
        problem = pm.Problem(
            pm.center_and_normalize(data.pop("embeddings"), copy=False),
            data["graph"],
            len(classes),
            knn_k=k,
        )
        previous = _previous_results(samples, run_key)
        seed_ids = [str(i) for i in data["ids"][data["seed_idx"]]]
        outcome = pm.propagate(
            problem, data["seed_idx"], seed_labels, method=method,
            **_checked_predictions(previous, seed_ids, classes, None if objects else samples),
        )
        bar.update()
        targets = np.setdiff1d(np.arange(len(data["ids"])), data["seed_idx"])
        probs = outcome.probs[targets]
        if objects:
            confidence = probs.max(axis=1).astype(np.float64)
        else:  # with scores stored, every label is rewritten (its logits moved)
            settled = settle_labels(
                samples, data, output_field, targets, classes, probs,
                tolerance=0.0 if store_scores else CONFIDENCE_TOLERANCE,
            )
            confidence = settled.confidence
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
        stop = pm.plan_stop(
            confidence, len(data["seed_idx"]), _stop_history(previous), target_accuracy,
        ) if calibrated else None
        needs_review = confidence < review_threshold
        info = {
            "method": outcome.method,
            "num_seeds": int(len(data["seed_idx"])),
            "num_classes": int(len(classes)),
            "num_propagated": int(len(targets)),
            "num_needs_review": None,
            "num_flipped": None,
            "num_kept": None,
            "estimated_accuracy": _cv_accuracy(outcome),
            "recommended_threshold": float(recommended) if calibrated else None,
            "coverage_at_threshold": float(coverage) if calibrated else None,
            "review_threshold": float(review_threshold),
            "ece": _cv_ece(outcome),
            "temperature": float(outcome.temperature),
            "temperature_spread": float(outcome.temperature_spread),
            "cv_accuracy_by_method": outcome.cv_accuracy,
            "num_checked_predictions": len(outcome.checked or ()),
            "seconds": 0.0,
            "run_key": run_key,
            "label_field": label_field,
            "output_field": output_field,
            "note": note,
            "stop_plan": stop,
            "stop_advice": stop["advice"] if stop else None,
        }
        fields = _results_fields(classes, data, outcome)
        config = _begin_run(
            samples, run_key, info, fields,
            method=outcome.method,
            label_field=label_field,
            embeddings=embeddings,
            output_field=output_field,
            requested_method=method,
            k=k,
            seed_tag=seed_tag,
            confidence_threshold=confidence_threshold,
            target_precision=target_precision,
            target_accuracy=target_accuracy,
            label_type="detections" if objects else "classification",
        )
        if objects:
            info["num_needs_review"], info["num_flipped"] = _write_objects(
                samples, data, output_field, targets, classes, probs,
                needs_review, store_scores,
            )
        else:
            info["num_needs_review"], info["num_flipped"] = _write_samples(
                samples, data, output_field, targets, classes, settled,
                probs if store_scores else None, needs_review,
            )
            info["num_kept"] = int(len(targets) - settled.write.sum())
            try_enable_annotation(samples, label_field, output_field=output_field)
        bar.update()
        results = _finish_run(samples, run_key, config, info, fields, start)
        bar.update()
    return results


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
    cap = 1.0 - (1.0 - 1.0 / outcome.probs.shape[1]) * outcome.shrink
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


def _previous_results(samples, run_key):
    """The results of the run this one replaces, or None (none, or an
    older or broken record: the loop's history restarts)."""
    dataset = samples._root_dataset
    if run_key not in dataset.list_runs():
        return None
    try:
        return dataset.load_run_results(run_key, cache=False)
    except Exception:
        return None


def _stop_history(previous):
    """The ``[num_human, cost]`` history of the run this one replaces."""
    info = getattr(previous, "info", None) or {}
    history = [list(p) for p in (info.get("stop_plan") or {}).get("history", [])]
    # an interrupted run's own point is the one this run measures again
    return history[:-1] if info.get("status") == WRITING else history


def _checked_predictions(previous, seed_ids, classes, samples):
    """What a run hands on to the next for its calibration.

    The seeds labeled since the ``previous`` run (not among its
    ``seed_ids``) that :func:`dinoprop.suggest_seeds` suggested (they carry
    its tag) are to be scored as that run would have scored them,
    and the predictions earlier runs made for seeds before they were
    labeled (its ``checked_ids`` and ``checked_probs``) are carried over to the
    current seeds and classes: samples no longer labeled drop out, and a
    sample whose label a human changed is checked against its new label
    (:class:`dinoprop.propagation_methods.CheckedPredictions`).

    Args:
        previous: the previous run's results (None for a first run)
        seed_ids: the IDs of this run's seeds, in seed order
        classes: this run's classes, in column order
        samples: the samples of the run, whose tags say which new seeds
            were suggested (None for objects, which are not suggested):
            only those predictions are checked, as the loop asked for them
            by the scores alone, never by whether they were right

    Returns:
        the ``checked`` and ``new_seeds`` keyword arguments of
        :func:`dinoprop.propagation_methods.propagate`
    """
    previous_ids = getattr(previous, "seed_ids", None)
    if not previous_ids:
        return {}
    earlier = set(previous_ids)
    position = {sid: i for i, sid in enumerate(seed_ids)}
    new_ids = [sid for sid in seed_ids if sid not in earlier]
    suggested = (
        set(samples.select(new_ids).match_tags(ANNOTATE_NEXT_TAG).values("id"))
        if samples is not None and new_ids else set()
    )
    new_seeds = np.array([position[sid] for sid in new_ids if sid in suggested], np.int64)
    carried_ids = list(getattr(previous, "checked_ids", None) or [])
    if not carried_ids:
        return {"new_seeds": new_seeds}
    carried = pm.CheckedPredictions(
        np.arange(len(carried_ids)), np.asarray(previous.checked_probs, np.float32)
    ).remapped(
        [position.get(sid, -1) for sid in carried_ids],
        list(previous.classes), [str(c) for c in classes],
    )
    return {"checked": carried, "new_seeds": new_seeds}


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


def _check_engine(engine, ray_address, num_workers, objects):
    """Checks the graph engine options; returns them as keyword arguments
    of :func:`dinoprop.similarity.sample_knn_graph`."""
    from dinoprop.graph_distributed import check_engine

    check_engine(engine, ray_address, num_workers)
    if objects and engine != "local":
        raise DinopropError(
            "engine='ray' searches graphs of samples; the graph of objects "
            "is searched exactly in this process: leave engine='local'"
        )
    return {"engine": engine, "ray_address": ray_address, "num_workers": num_workers}


def _check_fraction(value, name):
    """Raises unless ``value`` is a number in (0, 1]."""
    check_number(value, name, 0, 1, low_open=True)


def _check_arguments(
    samples, label_field, embeddings, output_field, method, k,
    confidence_threshold, target_precision, run_key, overwrite,
):
    """Validates everything that needs no embeddings; returns the label type."""
    if method not in pm.METHODS and method not in pm.AUTO_CANDIDATES:
        raise DinopropError(
            "Unknown method %r; choose one of %s" % (method, ", ".join(pm.METHODS))
        )
    check_int(k, "k")
    if output_field == embeddings:
        raise DinopropError(
            "output_field must differ from the embeddings field '%s'" % embeddings
        )
    if confidence_threshold is not None:
        check_number(confidence_threshold, "confidence_threshold", 0, 1)
    _check_fraction(target_precision, "target_precision")
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
