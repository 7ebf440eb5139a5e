"""What a label in a seed field means: every label state, defined once.

dinoprop keeps two fields per task: the **seed field** (e.g. ``label``),
which humans own, and the **propagated field** (e.g. ``label_propagated``),
which :func:`dinoprop.propagate_labels` rewrites on every run. A sample is in
exactly one of these states:

===============  ==========================================================  =====
state            what it holds                                               seed
===============  ==========================================================  =====
``human``        a label a human set or corrected (the App's Annotate tab,   yes
                 the triage panel, ``label_samples``, or any label dinoprop
                 did not write)
``confirmed``    a machine suggestion a human said "yes" to; the label       yes
                 carries ``dinoprop_confirmed`` = the class confirmed
``accepted``     a propagated label copied in by                             no
                 :func:`dinoprop.review.accept_propagated_labels` that no
                 human has changed (``dinoprop_accepted`` names its batch)
``propagated``   nothing in the seed field; a label in the propagated field  no
``unlabeled``    nothing in either field                                     no
===============  ==========================================================  =====

Corrections need no bookkeeping: an accepted label whose class a human
changed no longer matches its ``dinoprop_accepted_label``, and a confirmed
label whose class a human changed no longer matches its
``dinoprop_confirmed``; both are then ``human``.
"""

from __future__ import annotations

from typing import Any, Optional

from dinoprop.core import TAG_PREFIX

HUMAN = "human"
CONFIRMED = "confirmed"
ACCEPTED = "accepted"
PROPAGATED = "propagated"
UNLABELED = "unlabeled"

#: Every state, in the order the App shows them.
STATES = (HUMAN, CONFIRMED, ACCEPTED, PROPAGATED, UNLABELED)

#: The states whose label :func:`dinoprop.propagate_labels` uses as a seed.
SEED_STATES = frozenset({HUMAN, CONFIRMED})

#: Label attribute naming the accept batch that copied a propagated label
#: into a label field (:func:`dinoprop.review.accept_propagated_labels`).
ACCEPTED_BATCH_ATTRIBUTE = "dinoprop_accepted"

#: Label attribute holding the class an accept batch wrote, so a label a
#: human has since corrected can be told from the one that was accepted.
ACCEPTED_LABEL_ATTRIBUTE = "dinoprop_accepted_label"

#: Label attribute holding the class a human confirmed.
CONFIRMED_ATTRIBUTE = "dinoprop_confirmed"

#: Tag of samples a reviewer skipped; they go to the end of the queues.
SKIPPED_TAG = TAG_PREFIX + "skipped"


def is_unedited_accepted(
    label: Optional[str], batch: Optional[str], accepted_label: Optional[str]
) -> bool:
    """Whether a label is one an accept batch wrote and no human changed.

    Args:
        label: the label's current class
        batch: its :data:`ACCEPTED_BATCH_ATTRIBUTE` (None if never accepted)
        accepted_label: its :data:`ACCEPTED_LABEL_ATTRIBUTE` (None for labels
            accepted before that attribute existed, which count as unedited)
    """
    return batch is not None and accepted_label in (None, label)


def label_state(
    label: Optional[str],
    accepted_batch: Optional[str] = None,
    accepted_label: Optional[str] = None,
    confirmed: Optional[str] = None,
    has_propagated: bool = False,
) -> str:
    """The state of one sample, from its seed label's class and markers.

    Args:
        label: the seed field's class (None when the field is empty)
        accepted_batch: the label's :data:`ACCEPTED_BATCH_ATTRIBUTE`
        accepted_label: the label's :data:`ACCEPTED_LABEL_ATTRIBUTE`
        confirmed: the label's :data:`CONFIRMED_ATTRIBUTE`
        has_propagated: whether the propagated field holds a label

    Returns:
        one of :data:`STATES`
    """
    if label is None:
        return PROPAGATED if has_propagated else UNLABELED
    if confirmed is not None and confirmed == label:
        return CONFIRMED
    if is_unedited_accepted(label, accepted_batch, accepted_label):
        return ACCEPTED
    return HUMAN


#: The label attributes :func:`label_state` reads after the class, in order.
MARKER_ATTRIBUTES = (
    ACCEPTED_BATCH_ATTRIBUTE, ACCEPTED_LABEL_ATTRIBUTE, CONFIRMED_ATTRIBUTE
)


def marker_paths(label_field: str) -> list:
    """The field paths of :data:`MARKER_ATTRIBUTES` in ``label_field``."""
    return ["%s.%s" % (label_field, name) for name in MARKER_ATTRIBUTES]


def label_attribute(label: Any, name: str) -> Any:
    """An attribute of a label, None when the label lacks it."""
    return label.get_field(name) if label.has_field(name) else None


def state_of(label: Any, propagated: Any = None) -> str:
    """The state of a sample from its seed and propagated label objects."""
    return label_state(
        None if label is None else label.label,
        *(
            None if label is None else label_attribute(label, name)
            for name in MARKER_ATTRIBUTES
        ),
        has_propagated=propagated is not None,
    )


def sample_states(
    samples: Any, label_field: str, output_field: Optional[str] = None
) -> tuple[list, list, list, list]:
    """The state of every sample of a collection, in one read.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the seed field (it may not exist yet)
        output_field: the propagated field, if any

    Returns:
        four aligned lists: sample IDs, states, seed-field classes (None
        where empty) and propagated confidences (None where none)
    """
    has_label = samples.get_field(label_field) is not None
    has_output = output_field is not None and samples.get_field(output_field) is not None
    paths = ["id"]
    if has_label:
        paths += [label_field + ".label"] + marker_paths(label_field)
    if has_output:
        paths += [output_field + ".label", output_field + ".confidence"]
    columns = samples.values(paths)
    empty = [None] * len(columns[0])
    label, batch, accepted, confirmed = columns[1:5] if has_label else [empty] * 4
    output, confidence = columns[-2:] if has_output else (empty, empty)
    states = [
        label_state(*row[:4], has_propagated=row[4] is not None)
        for row in zip(label, batch, accepted, confirmed, output)
    ]
    return columns[0], states, label, confidence


def seed_expression(label_field: str) -> Any:
    """A FiftyOne expression true for samples whose seed field holds a seed.

    The same rule as :func:`label_state` (``human`` or ``confirmed``),
    evaluated by the database, so finding the seeds reads only them.

    Args:
        label_field: the seed field

    Returns:
        a :class:`fiftyone.core.expressions.ViewExpression` for ``match()``
    """
    from fiftyone import ViewField as F

    label = F(label_field + ".label")
    batch, accepted, confirmed = (F(path) for path in marker_paths(label_field))
    is_accepted = batch.exists() & (~accepted.exists() | (accepted == label))
    is_confirmed = confirmed.exists() & (confirmed == label)
    return label.exists() & (~is_accepted | is_confirmed)


def accepted_unedited_ids(samples: Any, label_field: str) -> set:
    """IDs of samples whose label an accept batch wrote and no human changed.

    Args:
        samples: a FiftyOne dataset or view
        label_field: a Classification field

    Returns:
        a set of sample IDs
    """
    from fiftyone import ViewField as F

    batch_path, label_path, confirmed_path = marker_paths(label_field)
    accepted = samples.match(F(batch_path).exists())  # few samples, if any
    rows = zip(*accepted.values(
        ["id", label_field + ".label", batch_path, label_path, confirmed_path]
    ))
    return {
        sid
        for sid, label, batch, accepted_label, confirmed in rows
        if label_state(label, batch, accepted_label, confirmed) == ACCEPTED
    }
