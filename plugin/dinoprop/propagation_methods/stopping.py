"""When to stop labeling: the cost of stopping now, and what one more batch
would save.

The team's goal is a whole dataset whose labels are at least
``target_accuracy`` right, for as few human labels as possible. Stopping
now means accepting the most confident propagated labels and labeling the
rest by hand; the human labels so far plus the rest are the cost of
stopping. Calibrated confidences say how many labels can be accepted: as
many of the most confident as keep the expected number of wrong ones
within the dataset's error budget. Arrays in, plain numbers out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: The accuracy the whole labeled dataset must reach by default.
DEFAULT_TARGET_ACCURACY = 0.95

#: How many standard deviations of the error count the plan keeps in
#: reserve: accepting labels whose expected errors just fit the budget
#: would miss the target about half the time.
ERROR_MARGIN_SIGMAS = 1.0

#: Runs the stopping forecast fits its trend on: a run's cost of stopping
#: moves by a few percent from one run to the next as its calibration is
#: refitted (measured on clothing-small: about 3% of N), so a trend over a
#: few runs would read that noise as a change of course.
FORECAST_RUNS = 6


@dataclass
class StopPlan:
    """What stopping now would take.

    Attributes:
        target_accuracy: the accuracy the whole dataset must reach
        threshold: accept every propagated label at or above this
            confidence (1.0 when none can be accepted)
        num_accepted: the labels accepted at that threshold
        num_to_label: the targets left below it, to label by hand
        num_human: the human labels so far (the seeds)
        cost: human labels in all if the team stops now
            (``num_human + num_to_label``)
        estimated_errors: the expected wrong accepted labels
        estimated_accuracy: the whole dataset's expected accuracy
    """

    target_accuracy: float
    threshold: float
    num_accepted: int
    num_to_label: int
    num_human: int
    cost: int
    estimated_errors: float
    estimated_accuracy: float

    def to_dict(self) -> dict:
        """The plan as a JSON-serialisable dict."""
        return asdict(self)


def stop_plan(
    confidence: np.ndarray,
    num_human: int,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    margin_sigmas: float = ERROR_MARGIN_SIGMAS,
) -> StopPlan:
    """How to finish a dataset now at ``target_accuracy``, and its cost.

    The most confident labels are accepted, most confident first, while
    their expected errors ``sum(1 - p)`` plus ``margin_sigmas`` standard
    deviations of that count (``sqrt(sum p (1 - p))``, each label right
    or wrong independently) stay within the error budget
    ``(1 - target_accuracy) * (num_human + len(confidence))``; human
    labels count as right. Accepting a label saves one human label, so
    this acceptance is the cheapest the confidences can vouch for.

    Args:
        confidence: the calibrated confidences of the propagated labels
        num_human: the human labels (seeds) of the same samples
        target_accuracy: the accuracy the whole dataset must reach, in
            ``(0, 1]``
        margin_sigmas: the reserve, in standard deviations of the
            error count

    Returns:
        a :class:`StopPlan`
    """
    confidence = np.asarray(confidence, np.float64)
    total = int(num_human) + len(confidence)
    budget = (1.0 - target_accuracy) * total
    ordered = np.sort(confidence)[::-1]
    errors = np.cumsum(1.0 - ordered)
    variance = np.cumsum(ordered * (1.0 - ordered))
    fits = errors + margin_sigmas * np.sqrt(variance) <= budget + 1e-9
    # errors only grow down the list: the fitting labels are a prefix
    count = int(np.argmin(fits)) if not fits.all() else len(ordered)
    # never cut between equal confidences: a threshold accepts all of them
    while 0 < count < len(ordered) and ordered[count] == ordered[count - 1]:
        count -= 1
    expected = float(errors[count - 1]) if count else 0.0
    return StopPlan(
        target_accuracy=float(target_accuracy),
        threshold=float(ordered[count - 1]) if count else 1.0,
        num_accepted=count,
        num_to_label=len(ordered) - count,
        num_human=int(num_human),
        cost=int(num_human) + len(ordered) - count,
        estimated_errors=round(expected, 2),
        estimated_accuracy=(1.0 - expected / total) if total else 1.0,
    )


def stopping_forecast(history: list, runs: int = FORECAST_RUNS) -> dict:
    """Whether labeling another batch still pays, from the loop so far.

    Each batch of new human labels moves the cost of stopping by the
    change in accepted labels (labels suggested from below the threshold
    would have been labeled by hand anyway), so a batch pays while the
    plan's cost keeps falling. The forecast fits a line to the cost
    against the human labels over the last ``runs`` runs (least squares,
    so one run's jump does not decide) and extends it by the size of the
    last batch. Stopping is recommended once that saving is not positive
    and the last run's cost is not above the line: a run above it pays
    for the noise of its own calibration, and the next batch, suggested
    from below the threshold, costs nothing it would not have cost anyway
    (measured over simulated annotation loops on clothing-small: stopping
    at such runs cost 1.23x the cheapest stop, waiting for a run on or
    below the line 1.11x).

    Args:
        history: one ``[num_human, cost]`` pair per propagation run of
            the loop, oldest first (:attr:`StopPlan.num_human` and
            :attr:`StopPlan.cost`); a run with fewer human labels than
            the one before starts the loop anew
        runs: how many of the latest runs the trend is fitted on

    Returns:
        a dict with ``next_batch`` (the human labels in the last batch, or
        None), ``next_batch_saving`` (the labels the next batch of that
        size is forecast to save; negative when it would cost more; None
        until ``runs`` runs with distinct label counts are known) and
        ``recommend_stop`` (True once that saving is not positive and the
        last run's cost is not above the fitted line)
    """
    points = [(int(h), int(c)) for h, c in history]
    restart = max(
        (i for i in range(1, len(points)) if points[i][0] < points[i - 1][0]), default=0
    )
    latest = {}
    for human, cost in points[restart:]:  # the newest run of each label count
        latest[human] = cost
    known = sorted(latest.items())
    batch = known[-1][0] - known[-2][0] if len(known) > 1 else None
    if len(known) < max(runs, 2):
        return {"next_batch": batch, "next_batch_saving": None, "recommend_stop": False}
    human, cost = (np.array(v, np.float64) for v in zip(*known[-runs:]))
    slope, intercept = np.polyfit(human, cost, 1)
    saving = -slope * batch
    on_trend = cost[-1] <= slope * human[-1] + intercept + 1e-9
    return {
        "next_batch": batch,
        "next_batch_saving": round(float(saving), 1),
        "recommend_stop": bool(saving <= 0 and on_trend),
    }


def stop_advice(plan: dict, forecast: dict) -> str:
    """One sentence for the team: stop now (and how), or keep labeling.

    Args:
        plan: a :meth:`StopPlan.to_dict`
        forecast: a :func:`stopping_forecast` result

    Returns:
        the advice
    """
    finish = (
        "accept the %s labels at confidence >= %.3f and label the other %s by "
        "hand: %s human labels in all, %.1f%% estimated accuracy"
        % (
            format(plan["num_accepted"], ","), plan["threshold"],
            format(plan["num_to_label"], ","), format(plan["cost"], ","),
            100 * plan["estimated_accuracy"],
        )
    )
    saving = forecast.get("next_batch_saving")
    if saving is None:
        return "Stopping now would %s. Label more suggested samples to see the trend." % finish
    if forecast.get("recommend_stop"):
        return ("Stop labeling seeds: the last batches saved nothing. To finish, %s." % finish)
    if saving <= 0:
        return (
            "Label one more batch: the last batches saved nothing, but this run's "
            "cost is above their trend (noise in its calibration), and the next "
            "suggested labels cost nothing extra. Stopping now would %s." % finish
        )
    return (
        "Keep labeling: the next %d suggested labels are forecast to save %.0f "
        "labels. Stopping now would %s." % (forecast["next_batch"], saving, finish)
    )
