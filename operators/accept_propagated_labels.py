"""Operator ``accept_propagated_labels``: keep confident labels, or undo."""

import fiftyone.operators.types as types

from . import _common

DEFAULT_MIN_CONFIDENCE = 0.9
_ALL_BATCHES = "all"


class AcceptPropagatedLabels(_common.DinopropOperator):
    """Accepts or reverts propagated labels (``dinoprop.review``)."""

    NAME = "accept_propagated_labels"
    LABEL = "dinoprop: accept propagated labels"
    DESCRIPTION = (
        "Copies confident propagated labels into the label field of "
        "unlabeled samples (undoable)"
    )
    #: Accepting over 200k+ samples defaults to a delegated run.
    DELEGATE_THRESHOLD = 200_000
    TARGET_ACTION = "Accept labels in"
    FORM_TITLE = "Accept propagated labels"
    RESULT_TITLE = "Propagated labels accepted"
    RESULT_ROWS = [
        ("num_accepted", "Labels accepted", "int"),
        ("num_human_labeled", "Kept (human label)", "int"),
        ("num_previously_accepted", "Kept (accepted earlier)", "int"),
        ("num_below_threshold", "Below the threshold", "int"),
        ("min_confidence", "Minimum confidence", "float"),
        ("label_field", "Label field", "str"),
        ("batch", "Batch (to undo)", "str"),
    ]

    def form(self, ctx, inputs, view):
        _common.choice_input(
            inputs,
            "action",
            {"accept": "Accept", "undo": "Undo an accept"},
            "Action",
            view=types.RadioGroup(orientation="horizontal"),
            default="accept",
        )
        fields = _common.label_fields(view)
        if _is_undo(ctx.params):
            return _undo_form(ctx, inputs, view, fields)
        return _accept_form(ctx, inputs, view, fields)

    def call(self, view, params, progress):
        from dinoprop import review

        if _is_undo(params):
            batch = params.get("batch") or _ALL_BATCHES
            return _common.Summary(
                review.undo_accept(
                    view,
                    params["label_field"],
                    batch=None if batch == _ALL_BATCHES else batch,
                )
            )
        return review.accept_propagated_labels(
            view,
            params["output_field"],
            params["label_field"],
            min_confidence=_min_confidence(view, params),
        )

    def progress_label(self, params):
        if _is_undo(params):
            return "Reverting accepted labels"
        return "Accepting labels"

    def resolve_output(self, ctx):
        if _is_undo(ctx.params):
            return _common.summary_output(
                "Accepted labels reverted",
                [
                    ("num_reverted", "Labels removed", "int"),
                    ("num_kept_corrected", "Kept (corrected by a human)", "int"),
                    ("label_field", "Label field", "str"),
                ],
            )
        return super().resolve_output(ctx)


def _is_undo(params):
    return params.get("action", "accept") == "undo"


def _accept_form(ctx, inputs, view, fields):
    from fiftyone import ViewField as F

    propagated = _propagated_fields(view, fields)
    output = _common.field_dropdown(
        ctx,
        inputs,
        "output_field",
        propagated,
        "Propagated field",
        "The labels written by propagate_labels",
        missing="No propagated labels: run propagate_labels first",
    )
    if output is None:
        return False
    default_label = None
    if output.endswith("_propagated"):
        default_label = output[: -len("_propagated")]
    label_field = ctx.params.get("label_field") or default_label
    choices = types.AutocompleteView()
    for name in fields:
        if name != output:
            choices.add_choice(name, label=name)
    error = _label_field_error(view, label_field, output)
    inputs.str(
        "label_field",
        default=default_label,
        required=True,
        label="Label field",
        description="The human label field to fill (created if missing); "
        "samples that already have a label there are never changed",
        view=choices,
        invalid=error is not None,
        error_message=error or "",
    )
    default_threshold = _default_min_confidence(view, output)
    threshold = ctx.params.get("min_confidence", default_threshold)
    inputs.float(
        "min_confidence",
        default=default_threshold,
        min=0.0,
        max=1.0,
        label="Minimum confidence",
        description="Only propagated labels at least this confident are "
        "accepted; defaults to the threshold propagate_labels recommended",
    )
    if threshold is None:
        _common.warn(inputs, "min_confidence", "Enter a minimum confidence")
    if error is not None or not label_field or threshold is None:
        return False
    if view.get_field(label_field) is None:
        unlabeled, human = view, 0
    else:
        unlabeled = view.exists(label_field, False)
        human = view.count() - unlabeled.count()
    accepted = unlabeled.match(
        F(output + ".confidence") >= float(threshold)
    ).count()
    _common.notice(
        inputs,
        "preview",
        "%d samples will get a label; %d keep their human label"
        % (accepted, human),
    )
    return True


def _undo_form(ctx, inputs, view, fields):
    from dinoprop.review import accepted_batches

    batches = {}
    for name in fields:
        for batch, count in accepted_batches(view, name).items():
            batches[(name, batch)] = count
    if not batches:
        _common.warn(inputs, "undo", "No accepted labels to undo here")
        return False
    label_fields = sorted({name for name, _ in batches})
    label_field = _common.field_dropdown(
        ctx,
        inputs,
        "label_field",
        label_fields,
        "Label field",
        "The field labels were accepted into",
    )
    choices = {_ALL_BATCHES: "All accepted labels"}
    for (name, batch), count in sorted(batches.items(), reverse=True):
        if name == label_field:
            choices[batch] = "%s (%d labels)" % (batch, count)
    _common.choice_input(
        inputs,
        "batch",
        choices,
        "Accept batch",
        default=_ALL_BATCHES,
        description="Newest first; only labels that batch wrote are removed",
    )
    return True


def _min_confidence(view, params):
    """The form's minimum confidence, or its default when it was left out."""
    value = params.get("min_confidence")
    if value is None:
        return _default_min_confidence(view, params["output_field"])
    return value


def _default_min_confidence(view, output):
    """The threshold the propagation run recommended, else 0.9."""
    recommended = _recommended_threshold(view, output)
    return DEFAULT_MIN_CONFIDENCE if recommended is None else recommended


def _recommended_threshold(view, output):
    """The recommended threshold of the propagation run that wrote it."""
    from dinoprop.propagation import propagation_run_key

    key = propagation_run_key(view, output)
    if key is None:
        return None
    return view._root_dataset.load_run_results(key).summary().get("recommended_threshold")


def _propagated_fields(view, fields):
    """Classification fields that look propagated: named so, or confident."""
    return [
        name
        for name in fields
        if name.endswith("_propagated")
        or view.exists(name + ".confidence").limit(1).count()
    ]


def _label_field_error(view, label_field, output):
    import fiftyone.core.fields as fof
    import fiftyone.core.labels as fol

    if not label_field:
        return "Choose the label field to fill"
    if label_field == output:
        return "The label field must differ from the propagated field"
    existing = view.get_field(label_field)
    if existing is None or (
        isinstance(existing, fof.EmbeddedDocumentField)
        and issubclass(existing.document_type, fol.Classification)
    ):
        return None
    return "Field '%s' does not hold Classification labels" % label_field
