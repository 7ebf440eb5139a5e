"""The annotation loop at a glance, and live re-propagation.

:func:`loop_status` is what the App's loop panel shows: how many samples
are in each label state, seeds per class, the newest propagation run's
estimates, its estimated precision against coverage, and what a given
threshold would accept. :func:`repropagate` re-runs the newest propagation
with its own settings (the kNN graph is reused, and only labels that moved
are rewritten), and :func:`repropagate_if_due` does so once enough new
human labels have come in.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import numpy as np

from dinoprop import propagation_methods as pm
from dinoprop.core import DinopropError, check_int
from dinoprop.propagation.runs import newest_run_key, unfinished_run_message
from dinoprop.label_states import (
    ACCEPTED,
    CONFIRMED,
    HUMAN,
    PROPAGATED,
    SEED_STATES,
    UNLABELED,
    sample_states,
    seed_expression,
)

#: Re-propagate after this many new human labels by default.
DEFAULT_EVERY = 10

#: Points of the accuracy-vs-coverage curve.
CURVE_POINTS = 50


class LoopStatus(dict):
    """What :func:`loop_status` returns: a JSON-serialisable dict.

    Keys:

    - ``label_field``, ``output_field``, ``run_key`` (None before any run)
    - ``counts``: samples per label state (``human``, ``confirmed``,
      ``accepted``, ``propagated``, ``unlabeled``), plus ``above_threshold``
      and ``in_review`` (propagated samples at or above, and below, the
      threshold) and ``total``
    - ``seeds_per_class``: ``{class: seeds}``
    - ``estimated_accuracy``, ``recommended_threshold``,
      ``coverage_at_threshold``, ``num_seeds_in_run``, ``note``: the run's
      cross-validated estimates (None before any run); ``note`` says so
      when the run has not finished writing its labels (still running, or
      interrupted)
    - ``stop_plan``: the run's plan for finishing the dataset now and its
      forecast of whether another batch of labels pays, with an
      ``advice`` sentence (see :meth:`PropagationResults.summary
      <dinoprop.propagation.PropagationResults.summary>`; None before a
      calibrated run)
    - ``new_seeds``: seeds the newest run did not use yet
    - ``threshold``: the threshold of the preview (the one asked for, else
      the run's recommended one)
    - ``preview``: ``num_accepted`` and ``estimated_precision``, what
      accepting the propagated labels at that threshold would give
    - ``curve``: ``[coverage, estimated precision, threshold]`` rows, most
      confident first: accepting the most confident ``coverage`` of the
      propagated samples gives that precision, as the calibrated
      confidences promise
    """


def loop_status(
    samples: Any,
    label_field: Optional[str] = None,
    threshold: Optional[float] = None,
) -> LoopStatus:
    """Returns the state of the annotation loop on a dataset.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the seed field; defaults to the newest propagation
            run's, else ``"label"``
        threshold: the confidence threshold to preview; defaults to the
            newest run's recommended threshold

    Returns:
        a :class:`LoopStatus`

    Raises:
        DinopropError: if the seed or propagated field holds another label
            type than Classification
    """
    from dinoprop.review.triage import _require_classifications

    run_key = newest_run_key(samples, label_field)
    results = _results(samples, run_key)
    summary = results.summary() if results is not None else {}
    label_field, output_field = _task_fields(samples, run_key, label_field)
    _require_classifications(samples, label_field, output_field)
    ids, states, labels, confidences = sample_states(samples, label_field, output_field)
    counts = Counter(states)
    propagated = _propagated_confidences(states, confidences)
    if threshold is None:
        threshold = summary.get("recommended_threshold")
    preview = _preview(propagated, threshold)
    seeds = [lab for s, lab in zip(states, labels) if s in SEED_STATES]
    status = LoopStatus(
        label_field=label_field,
        output_field=output_field,
        run_key=run_key,
        counts={
            **{s: counts.get(s, 0) for s in (HUMAN, CONFIRMED, ACCEPTED, PROPAGATED, UNLABELED)},
            "above_threshold": preview["num_accepted"],
            "in_review": int(len(propagated)) - preview["num_accepted"],
            "total": len(ids),
        },
        seeds_per_class=dict(sorted(Counter(seeds).items())),
        new_seeds=_unused(
            [sid for sid, s in zip(ids, states) if s in SEED_STATES], results
        ),
        threshold=threshold,
        preview=preview,
        curve=precision_curve(propagated),
    )
    for key in (
        "estimated_accuracy", "recommended_threshold", "coverage_at_threshold", "note",
        "stop_plan",
    ):
        status[key] = summary.get(key)
    status["num_seeds_in_run"] = summary.get("num_seeds")
    if run_key is not None:
        status["note"] = unfinished_run_message(samples, output_field) or status["note"]
    return status


def threshold_preview(samples: Any, output_field: str, label_field: str, threshold: float) -> dict:
    """What accepting propagated labels at ``threshold`` would give.

    Args:
        samples: a FiftyOne dataset or view
        output_field: the propagated field
        label_field: the seed field (samples labeled there are left out)
        threshold: the lowest confidence accepted

    Returns:
        a dict with ``num_accepted`` (samples without a seed-field label
        whose propagated confidence is at least ``threshold``) and
        ``estimated_precision`` (their mean calibrated confidence; None
        when none)
    """
    _, states, _, confidences = sample_states(samples, label_field, output_field)
    return _preview(_propagated_confidences(states, confidences), threshold)


def _propagated_confidences(states, confidences):
    """The confidences of the samples whose only label is a propagated one."""
    return np.array(
        [c for s, c in zip(states, confidences) if s == PROPAGATED and c is not None],
        np.float64,
    )


def _preview(propagated, threshold):
    """What accepting those confidences at ``threshold`` gives (none when
    there is no threshold)."""
    accepted = propagated[propagated >= threshold] if threshold is not None else propagated[:0]
    return {
        "num_accepted": int(len(accepted)),
        "estimated_precision": float(accepted.mean()) if len(accepted) else None,
    }


def precision_curve(confidences: np.ndarray, points: int = CURVE_POINTS) -> list:
    """Estimated precision against coverage of calibrated confidences.

    Args:
        confidences: the calibrated confidences of the labels
        points: how many rows

    Returns:
        ``[coverage, estimated precision, threshold]`` rows, coverage
        ascending: accepting every label at or above ``threshold`` covers
        that fraction with that mean confidence
    """
    if len(confidences) == 0:
        return []
    ordered = np.sort(np.asarray(confidences, np.float64))[::-1]
    precision = np.cumsum(ordered) / np.arange(1, len(ordered) + 1)
    rows = []
    for q in np.linspace(1.0 / points, 1.0, points):
        i = max(int(round(q * len(ordered))) - 1, 0)
        rows.append([round(float(q), 4), round(float(precision[i]), 4), round(float(ordered[i]), 4)])
    return rows


def repropagate(
    samples: Any,
    label_field: Optional[str] = None,
    run_key: Optional[str] = None,
    method: Optional[str] = None,
) -> dict:
    """Re-runs the newest propagation with its own settings and view.

    The kNN graph is reused while the embeddings are unchanged, the method
    is the one the run used (an ``auto`` run's choice, so its
    cross-validation compares no candidates again), and labels that did
    not change are not rewritten: a re-run after a few new labels is fast.
    Run :func:`dinoprop.propagate_labels` with ``method="auto"`` to choose
    the method anew.

    Args:
        samples: a FiftyOne dataset or view (its dataset's runs are used)
        label_field: re-run the newest run of this seed field
        run_key: re-run this run instead
        method: the method; defaults to the one the run used

    Returns:
        a dict with ``run_key``, ``seconds``, ``num_flipped`` (labels whose
        class changed), ``before`` and ``after`` (each with
        ``num_seeds``, ``estimated_accuracy``, ``coverage_at_threshold``
        and ``recommended_threshold``), and ``stop_advice`` (the new run's
        stop plan in one sentence: stop now, or label more; None when the
        seeds are too few to calibrate)

    Raises:
        DinopropError: if there is no propagation run to repeat
    """
    from dinoprop.propagation import propagate_labels

    dataset = samples._root_dataset
    run_key = run_key or newest_run_key(dataset, label_field)
    if run_key is None:
        raise DinopropError(
            "Nothing to re-propagate on dataset '%s': run propagate_labels first"
            % dataset.name
        )
    config = dataset.get_run_info(run_key).config
    before = _results(dataset, run_key).summary()
    start = time.perf_counter()
    results = propagate_labels(
        dataset.load_run_view(run_key),
        config.label_field,
        embeddings=config.embeddings,
        output_field=config.output_field,
        method=method or before.get("method") or config.requested_method,
        k=config.k,
        seed_tag=config.seed_tag,
        confidence_threshold=config.confidence_threshold,
        target_precision=config.target_precision,
        target_accuracy=getattr(config, "target_accuracy", None)
        or pm.DEFAULT_TARGET_ACCURACY,
        run_key=run_key,
        progress=False,
    )
    after = results.summary()
    keys = ("num_seeds", "estimated_accuracy", "coverage_at_threshold", "recommended_threshold")
    return {
        "run_key": run_key,
        "seconds": round(time.perf_counter() - start, 3),
        "num_flipped": after.get("num_flipped"),
        "before": {k: before.get(k) for k in keys},
        "after": {k: after.get(k) for k in keys},
        "stop_advice": (after.get("stop_plan") or {}).get("advice"),
    }


def repropagate_if_due(
    samples: Any, label_field: Optional[str] = None, every: int = DEFAULT_EVERY
) -> Optional[dict]:
    """Re-propagates once ``every`` new human labels have come in.

    New labels are seeds the newest run of ``label_field`` did not use,
    however they were made (the triage panel, the App's Annotate tab, the
    SDK).

    Args:
        samples: a FiftyOne dataset or view
        label_field: the seed field; defaults to the newest run's
        every: how many new seeds trigger a re-run (at least 1)

    Returns:
        :func:`repropagate`'s dict, or None when no re-run was due (or
        there is no run to repeat)
    """
    check_int(every, "every")
    run_key = newest_run_key(samples, label_field)
    if run_key is None:
        return None
    label_field, _ = _task_fields(samples, run_key, label_field)
    if new_seed_count(samples, label_field, run_key) < every:
        return None
    return repropagate(samples, run_key=run_key)


def task_fields(samples: Any, label_field: Optional[str] = None) -> tuple[str, str]:
    """The seed and propagated fields the loop works on.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the seed field, if known

    Returns:
        ``(label_field, output_field)``: those of the newest propagation run
        (of ``label_field``, if given); before any run, ``label_field``,
        else ``"label"`` if it exists, else the first Classification field
        holding labels (else ``"label"``), and ``"<label_field>_propagated"``
    """
    return _task_fields(samples, newest_run_key(samples, label_field), label_field)


def _task_fields(samples, run_key, label_field):
    """:func:`task_fields`, the newest run being known."""
    if run_key is not None:
        config = samples._root_dataset.get_run_info(run_key).config
        return config.label_field, config.output_field
    if label_field is None:
        import fiftyone.core.labels as fol

        fields = samples.get_field_schema(embedded_doc_type=fol.Classification)
        labeled = [
            name for name in fields
            if not name.endswith("_propagated") and samples.exists(name).limit(1).count()
        ]
        label_field = "label" if "label" in fields or not labeled else labeled[0]
    return label_field, label_field + "_propagated"


def new_seed_count(samples: Any, label_field: str, run_key: Optional[str] = None) -> int:
    """How many seeds of ``label_field`` the run did not use yet.

    Reads only the seeds (the database finds them), so it stays cheap on
    large datasets: the triage panel asks it after every label.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the seed field
        run_key: the propagation run; None counts every seed

    Returns:
        the number of new seeds
    """
    if samples.get_field(label_field) is None:
        return 0
    seeds = samples.match(seed_expression(label_field)).values("_id", _raw=True)
    return _unused(seeds, _results(samples, run_key))


def _unused(seed_ids, results):
    """How many of ``seed_ids`` the run did not use (all of them before a run)."""
    used = set(results.seed_ids) if results is not None else set()
    return sum(1 for sid in seed_ids if str(sid) not in used)


def _results(samples, run_key):
    """The run's results as stored now (None without a run): another
    process (the App server, a colleague's notebook) may have re-run it,
    so nothing cached is used."""
    if run_key is None:
        return None
    return samples._root_dataset.load_run_results(run_key, cache=False)
