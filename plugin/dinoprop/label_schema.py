"""Native App annotation of the seed field: FiftyOne label schemas.

FiftyOne (1.13 and later) lets a human edit a field in the sample modal's
**Annotate** tab once the dataset has a *label schema* for it and the schema
is active. :func:`enable_annotation` gives the seed field a classification
schema with the full class list (a dropdown, or radio buttons for five
classes or fewer) and the propagated field a read-only one, so the App
offers exactly the classes of the task and never lets a human edit machine
output by accident.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from dinoprop.core import DinopropError, check_field_name, validate_samples
from dinoprop.label_states import CONFIRMED_ATTRIBUTE

logger = logging.getLogger(__name__)

#: Up to this many classes the App shows radio buttons, above a dropdown
#: (FiftyOne's own heuristic).
RADIO_MAX_CLASSES = 5

#: FiftyOne's largest class list; with more classes the App gets a text box.
DROPDOWN_MAX_CLASSES = 1000


def label_schemas_supported(dataset: Any) -> bool:
    """Whether this FiftyOne has label schemas (in-App annotation)."""
    return hasattr(dataset, "update_label_schema") and hasattr(
        dataset, "active_label_schemas"
    )


def enable_annotation(
    samples: Any,
    label_field: str,
    classes: Optional[Iterable[str]] = None,
    output_field: Optional[str] = None,
) -> Optional[dict]:
    """Makes the seed field editable in the App's Annotate tab.

    The seed field gets a classification label schema listing every class
    of the task, which is the union of the schema's classes so far, the
    dataset's ``classes`` for the field and its ``default_classes``, the
    classes held by the seed field and the propagated field, and
    ``classes``. Classes are only ever added, so a class no sample holds yet
    stays offered. The list is also stored as ``dataset.classes[label_field]``
    for other FiftyOne tools. The schema declares the
    ``dinoprop_confirmed`` attribute (read-only), which the triage panel
    sets when a human confirms a machine label. The propagated field, when
    it exists, gets the same classes in a read-only schema. Both schemas are
    activated, the seed field first.

    The seed field is created as a Classification field when missing. On a
    FiftyOne without label schemas (before 1.13) this logs one info line
    and changes nothing.

    Args:
        samples: a FiftyOne dataset or view (its dataset is configured)
        label_field: the seed field, e.g. ``"label"``
        classes: classes to add to those found
        output_field: the propagated field; defaults to
            ``"<label_field>_propagated"``

    Returns:
        the seed field's label schema, or None when FiftyOne has no label
        schemas

    Raises:
        DinopropError: if a field exists and does not hold Classification
            labels, or a class is not a non-empty string
    """
    import fiftyone.core.fields as fof
    import fiftyone.core.labels as fol

    from dinoprop.core import require_label_field

    validate_samples(samples, require_images=False)
    dataset = samples._root_dataset
    if not label_schemas_supported(dataset):
        logger.info(
            "This FiftyOne has no label schemas (in-App annotation needs "
            "FiftyOne 1.13 or later): '%s' stays as it is", label_field
        )
        return None
    extra = _check_classes(classes)
    output_field = output_field or label_field + "_propagated"
    if dataset.get_field(label_field) is None:
        check_field_name(label_field, "label_field")
        dataset.add_sample_field(
            label_field, fof.EmbeddedDocumentField, embedded_doc_type=fol.Classification
        )
    require_label_field(dataset, label_field, (fol.Classification,))
    has_output = dataset.get_field(output_field) is not None
    if has_output:
        require_label_field(dataset, output_field, (fol.Classification,))
    if not dataset.has_field("%s.%s" % (label_field, CONFIRMED_ATTRIBUTE)):
        dataset.add_sample_field(
            "%s.%s" % (label_field, CONFIRMED_ATTRIBUTE), fof.StringField
        )
    fields = [label_field] + ([output_field] if has_output else [])
    names = task_classes(dataset, label_field, fields, extra)
    if names != list(dataset.classes.get(label_field) or []):
        dataset.classes[label_field] = names
        dataset.save()
    choices = _choices(names)
    schema = {
        "type": "classification",
        **choices,
        "attributes": [
            {
                "name": CONFIRMED_ATTRIBUTE,
                "type": "str",
                "component": "text",
                "read_only": True,
            }
        ],
    }
    _set_schema(dataset, label_field, schema)
    if has_output:
        _set_schema(
            dataset,
            output_field,
            {"type": "classification", **choices, "read_only": True},
        )
    active = fields + [f for f in dataset.active_label_schemas if f not in fields]
    if dataset.active_label_schemas != active:
        dataset.active_label_schemas = active
    return schema


def task_classes(
    dataset: Any, label_field: str, fields: list, extra: Iterable[str] = ()
) -> list:
    """Every class of a task, declared ones first in their order.

    Args:
        dataset: a FiftyOne dataset
        label_field: the seed field (its schema and declared classes count)
        fields: the Classification fields whose values count
        extra: more classes

    Returns:
        a list of distinct class names: the seed field's label schema
        classes, the dataset's ``classes[label_field]`` and
        ``default_classes``, then the others sorted
    """
    declared = list(
        (dataset.label_schemas.get(label_field) or {}).get("classes") or []
    )
    declared += list(dataset.classes.get(label_field) or [])
    declared += list(dataset.default_classes or [])
    found = set(extra)
    for field in fields:
        found.update(k for k in dataset.count_values(field + ".label") if k is not None)
    names = list(dict.fromkeys(str(c) for c in declared))
    return names + sorted(found - set(names))


def known_classes(dataset: Any, label_field: str) -> list:
    """The task's classes without scanning samples when they are recorded.

    :func:`enable_annotation` records the full list in the seed field's
    label schema and ``dataset.classes``; only when neither holds any class
    are the seed field and its propagated field scanned.

    Args:
        dataset: a FiftyOne dataset
        label_field: the seed field

    Returns:
        a list of class names (see :func:`task_classes`)
    """
    recorded = task_classes(dataset, label_field, [])
    if recorded:
        return recorded
    fields = [
        f for f in (label_field, label_field + "_propagated")
        if dataset.get_field(f) is not None
    ]
    return task_classes(dataset, label_field, fields)


def _choices(names):
    """How the App offers the classes: radio buttons, a dropdown, or (past
    FiftyOne's limit of 1000 classes) a text box."""
    if len(names) > DROPDOWN_MAX_CLASSES:
        logger.info(
            "%d classes are more than the App's dropdown holds (%d): the "
            "Annotate tab gets a text box", len(names), DROPDOWN_MAX_CLASSES
        )
        return {"component": "text"}
    component = "radio" if len(names) <= RADIO_MAX_CLASSES else "dropdown"
    return {"component": component, "classes": names}


def try_enable_annotation(samples: Any, label_field: str, **kwargs: Any) -> None:
    """:func:`enable_annotation`, where a refusal must not stop the caller.

    :func:`dinoprop.propagate_labels` and :func:`dinoprop.suggest_seeds`
    call this after their work is written: a label schema FiftyOne refuses
    is logged as a warning and the results stand.
    """
    try:
        enable_annotation(samples, label_field, **kwargs)
    except DinopropError as error:
        logger.warning("In-App annotation of '%s' was not set up: %s", label_field, error)


def _set_schema(dataset, field, schema):
    try:
        dataset.update_label_schema(field, schema)
    except Exception as error:  # FiftyOne's ValidationErrors: an ExceptionGroup
        raise DinopropError(
            "FiftyOne refused the label schema of '%s': %s" % (field, error)
        ) from error


def _check_classes(classes):
    if classes is None:
        return []
    if isinstance(classes, str):
        classes = [classes]
    names = list(classes)
    bad = [c for c in names if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DinopropError(
            "Classes must be non-empty strings; got %r" % (bad[0],)
        )
    return [c.strip() for c in names]
