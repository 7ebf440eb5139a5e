"""Operator ``label_selected_samples``: one class for the selected samples."""

import fiftyone.operators.types as types

from . import _common

_ALL = "newest"


class LabelSelectedSamples(_common.DinopropOperator):
    """Labels the target samples as humans (``dinoprop.review.label_samples``)."""

    NAME = "label_selected_samples"
    LABEL = "dinoprop: label the selected samples"
    DESCRIPTION = (
        "Gives the selected samples one class as human labels (seeds), "
        "in one undoable action"
    )
    #: Labeling 100k+ samples defaults to a delegated run.
    DELEGATE_THRESHOLD = 100_000
    TARGET_ACTION = "Label"
    FORM_TITLE = "Label the selected samples"
    RESULT_TITLE = "Samples labeled"
    RESULT_ROWS = [
        ("num_labeled", "Samples labeled", "int"),
        ("num_conflicts", "Left alone (changed meanwhile)", "int"),
        ("label", "Class", "str"),
        ("label_field", "Label field", "str"),
        ("batch", "Batch (to undo)", "str"),
    ]

    def form(self, ctx, inputs, view):
        _common.choice_input(
            inputs,
            "action",
            {"label": "Label", "undo": "Undo a labeling"},
            "Action",
            view=types.RadioGroup(orientation="horizontal"),
            default="label",
        )
        if _is_undo(ctx.params):
            return _undo_form(ctx, inputs)
        return _label_form(ctx, inputs, view)

    def call(self, view, params, progress):
        from dinoprop import review

        if _is_undo(params):
            batch = params.get("batch") or _ALL
            return _common.Summary(
                review.undo_labeling(view, batch=None if batch == _ALL else batch)
            )
        return review.label_samples(view, params["label_field"], params["label"].strip())

    def progress_label(self, params):
        return "Undoing a labeling" if _is_undo(params) else "Labeling samples"

    def resolve_output(self, ctx):
        if _is_undo(ctx.params):
            return _common.summary_output(
                "Labeling undone",
                [
                    ("num_restored", "Labels restored", "int"),
                    ("num_kept_changed", "Kept (changed again since)", "int"),
                    ("batch", "Batch", "str"),
                ],
            )
        return super().resolve_output(ctx)


def _is_undo(params):
    return params.get("action", "label") == "undo"


def _label_form(ctx, inputs, view):
    from dinoprop.label_schema import known_classes
    from dinoprop.review.loop import task_fields

    default_field, _ = task_fields(ctx.dataset)
    label_field = ctx.params.get("label_field") or default_field
    inputs.str(
        "label_field",
        default=default_field,
        required=True,
        label="Label field",
        description="The human label field (created if missing)",
    )
    classes = known_classes(ctx.dataset, label_field)
    choices = types.AutocompleteView()
    for name in classes:
        choices.add_choice(name, label=name)
    label = (ctx.params.get("label") or "").strip()
    inputs.str(
        "label",
        required=True,
        label="Class",
        description="An existing class, or type a new one (it is added to the "
        "field's label schema)",
        view=choices,
    )
    if not label:
        return False
    if label not in classes:
        _common.notice(inputs, "new_class", "'%s' is a new class: it will be added" % label)
    _common.notice(
        inputs, "preview",
        "%d samples will be labeled '%s' (replacing any label they hold; undoable)"
        % (view.count(), label),
    )
    return True


def _undo_form(ctx, inputs):
    from dinoprop.review import labeling_batches

    batches = labeling_batches(ctx.dataset)
    if not batches:
        _common.warn(inputs, "undo", "No labeling to undo on this dataset")
        return False
    choices = {_ALL: "The newest labeling"}
    for b in batches:
        choices[b["batch"]] = "%s: %d samples labeled '%s'" % (
            b["created_at"][:19], b["num_labeled"], b["label"],
        )
    _common.choice_input(
        inputs, "batch", choices, "Labeling", default=_ALL,
        description="Newest first; samples whose label changed again since are kept",
    )
    return True
