"""Propagation runs as FiftyOne runs: config, cleanup, results, records."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

import fiftyone.core.runs as fors

from dinoprop import propagation_methods as pm
from dinoprop.core import DinopropError, check_number, require_label_field
from dinoprop.propagation.common import (
    DEFAULT_TARGET_PRECISION,
    NEEDS_REVIEW_TAG,
    REVIEW_QUEUE_VIEW,
    RUN_TYPE,
    _flatten,
    _fol,
)


#: ``summary()["status"]`` of a run still writing its labels, or whose
#: writing was interrupted (the output field may mix old and new labels)
WRITING = "writing"

#: ``summary()["status"]`` of a run that wrote all its labels
COMPLETE = "complete"


class PropagationRunConfig(fors.RunConfig):
    """The recorded parameters of a :func:`propagate_labels` run.

    ``dataset.get_run_info(run_key).config`` holds ``label_field``,
    ``output_field``, ``embeddings``, ``requested_method``, ``k``,
    ``seed_tag``, ``confidence_threshold``, ``target_precision``,
    ``target_accuracy``, ``label_type`` and ``method`` (the method used).
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
        others = [k for k in propagation_runs(dataset, output) if k != key]
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
        checked_ids: the IDs of seeds an earlier run predicted before they
            were labeled (the :data:`MAX_CHECKED_PREDICTIONS` most recent)
        checked_probs: those predictions' uncalibrated class
            probabilities, columns in ``classes`` order; the next run
            fits its calibration on them too
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
        label an earlier run wrote there; None for object runs),
        ``num_kept`` (targets whose stored label was left as it was
        because it moved by at most ``CONFIDENCE_TOLERANCE``; None for
        object runs), ``ece``,
        ``review_threshold``, ``temperature`` and
        ``temperature_spread`` (the standard deviation of its logarithm,
        which the confidences are averaged over),
        ``num_checked_predictions`` (earlier runs' predictions for
        suggested samples that a human has labeled since, which the
        temperature is fitted on beside the held-out seeds), ``seconds``,
        ``run_key``, ``output_field``, ``label_field``, ``status``
        (:data:`COMPLETE`, or :data:`WRITING` while the labels are being
        written or after an interruption), ``note`` (why
        nothing can be accepted, or None) and ``stop_plan``: what finishing
        the dataset now would take, as
        :func:`dinoprop.propagation_methods.stop_plan` computes it
        (``target_accuracy``, ``threshold``, ``num_accepted``,
        ``num_to_label``, ``num_human``, ``cost``, ``estimated_errors``,
        ``estimated_accuracy``), with the loop's ``history`` of
        ``[num_human, cost]`` pairs (each run's own plan), the forecast of
        :func:`dinoprop.propagation_methods.stopping_forecast`
        (``next_batch``, ``next_batch_saving``, ``trend_cost``,
        ``recommend_stop``), ``num_held_back`` (the labels a recommended
        finish leaves to a human because the run's cost was below the
        trend, :func:`dinoprop.propagation_methods.plan_stop`) and an
        ``advice`` sentence, also the top-level ``stop_advice`` (None when
        the seeds are too few to calibrate). Estimates are None when the
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
        check_number(target_precision, "target_precision", 0, 1, low_open=True)
        check_run_complete(self.samples, self.config.output_field)
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


def propagation_run_key(samples: Any, output_field: str) -> Optional[str]:
    """The key of the propagation run that wrote ``output_field``, or None.

    Args:
        samples: a FiftyOne dataset or view (its dataset's runs are searched)
        output_field: a field name

    Returns:
        a run key of ``samples``' dataset, or None
    """
    keys = propagation_runs(samples._root_dataset, output_field)
    return keys[0] if keys else None


def propagation_runs(dataset: Any, output_field: Optional[str] = None) -> list:
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


def run_is_complete(dataset: Any, run_key: str) -> bool:
    """Whether a propagation run finished writing its labels.

    Runs recorded before dinoprop tracked this count as complete.
    """
    return results_are_complete(dataset.load_run_results(run_key, cache=False))


def results_are_complete(results: Any) -> bool:
    """Whether loaded propagation results (None when a run saved none)
    belong to a run that finished writing its labels."""
    info = getattr(results, "info", None)
    return info is not None and info.get("status", COMPLETE) == COMPLETE


def unfinished_run_message(samples: Any, output_field: str) -> Optional[str]:
    """Why ``output_field`` cannot be trusted yet, or None.

    Args:
        samples: a FiftyOne dataset or view
        output_field: a field propagated labels are written to

    Returns:
        a sentence naming the propagation run writing ``output_field``
        that is still running or was interrupted, and how to complete or
        remove it; None when every such run finished
    """
    dataset = samples._root_dataset
    for key in propagation_runs(dataset, output_field):
        if not run_is_complete(dataset, key):
            return (
                "The propagation run '%s' has not finished writing its labels "
                "into '%s' (it is still running, or it was interrupted), so "
                "the field may mix its labels with older ones. Run "
                "dinoprop.propagate_labels again to complete it, or "
                "dataset.delete_run('%s') to remove them"
                % (key, output_field, key)
            )
    return None


def check_run_complete(samples: Any, output_field: str) -> None:
    """Refuses to read an output field whose propagation run did not finish.

    Raises:
        DinopropError: with :func:`unfinished_run_message`, if a
            propagation run writing ``output_field`` is still running or
            was interrupted
    """
    message = unfinished_run_message(samples, output_field)
    if message:
        raise DinopropError(message)


def newest_run_key(samples: Any, label_field: Optional[str] = None) -> Optional[str]:
    """The newest propagation run (of ``label_field``, if given), or None.

    The dataset's record is reloaded first, so runs another process made or
    replaced are seen.
    """
    dataset = samples._root_dataset
    dataset.reload()
    runs = []
    for key in propagation_runs(dataset):
        info = dataset.get_run_info(key)
        if label_field is None or getattr(info.config, "label_field", None) == label_field:
            if getattr(info.config, "label_type", "classification") == "classification":
                runs.append((info.timestamp, key))
    return max(runs)[1] if runs else None


def _newest_run(dataset):
    """The key of the most recently started propagation run, or None."""
    started = [(dataset.get_run_info(k).timestamp, k) for k in propagation_runs(dataset)]
    return max(started)[1] if started else None


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


def _begin_run(samples, run_key, info, results_fields, **params):
    """Records the run as :data:`WRITING` before any label is written.

    An interruption then leaves a run that says so: the output field may
    be re-written by a re-run (no ``overwrite`` needed), readers of the
    field refuse it (:func:`check_run_complete`), and ``delete_run``
    removes it all. The record leaves out the seeds' out-of-fold scores
    (only a complete run's :meth:`PropagationResults.evaluate` reads them;
    at 1,000 seeds and 100 classes they take half a second to save), but
    keeps the seeds and checked predictions the next run builds on.
    Returns the recorded config.
    """
    config = PropagationRunConfig(run_type=RUN_TYPE, **params)
    dataset = samples._root_dataset
    if run_key in dataset.list_runs() and not isinstance(
        dataset.get_run_info(run_key).config, PropagationRunConfig
    ):  # recorded by an older dinoprop: same run, older config class
        fors.Run.delete_run(dataset, run_key, cleanup=False)
    # replacing the record must not clean up: the outputs are rewritten next
    samples.register_run(run_key, config, overwrite=True, cleanup=False)
    fields = dict(results_fields, oof_labels=[], oof_probs=[])
    _save_results(samples, run_key, config, dict(info, status=WRITING), fields)
    return config


def _finish_run(samples, run_key, config, info, results_fields, start):
    """Records the run as :data:`COMPLETE`; returns its results."""
    info["seconds"] = round(time.time() - start, 3)
    return _save_results(
        samples, run_key, config, dict(info, status=COMPLETE), results_fields
    )


#: The most checked predictions a run hands on to the next (the most
#: recent are kept): at 100 classes, 5,000 of them take about 6 MB in the
#: run's results, saved twice per run.
MAX_CHECKED_PREDICTIONS = 5000


def _results_fields(classes, data, outcome):
    """What the results store besides ``info``: the classes, the seeds,
    their cross-validated scores and the checked predictions (as float32
    values, which JSON keeps exactly: the next run fits on what this one
    did)."""
    oof = outcome.oof_probs
    seed_ids = [str(i) for i in data["ids"][data["seed_idx"]]]
    checked = outcome.checked
    if checked is not None:
        recent = slice(-MAX_CHECKED_PREDICTIONS, None)
        checked_ids = [seed_ids[i] for i in checked.positions[recent]]
        checked_probs = checked.probs[recent].astype(np.float32).tolist()
    else:
        checked_ids, checked_probs = [], []
    return dict(
        classes=[str(c) for c in classes],
        seed_ids=seed_ids,
        checked_ids=checked_ids,
        checked_probs=checked_probs,
        oof_labels=[] if oof is None else [int(v) for v in outcome.oof_labels],
        oof_probs=[] if oof is None else np.round(oof, 5).tolist(),
    )


def _save_results(samples, run_key, config, info, fields):
    results = PropagationResults(samples, config, run_key, info=info, **fields)
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
