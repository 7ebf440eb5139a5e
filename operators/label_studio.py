"""Operators ``send_to_label_studio`` and ``load_reviewed_labels``.

Review in Label Studio (``dinoprop.review.labelstudio``): the review queue
goes out with the propagated labels pre-filled, and only what humans
submitted comes back into the seed field.
"""

import fiftyone.operators.types as types

from . import _common

#: Sending or loading 1,000+ samples defaults to a delegated run (each image
#: is uploaded, each decision written).
DELEGATE_THRESHOLD = 1_000


def server_inputs(inputs):
    """Adds the Label Studio address and API key fields."""
    from dinoprop.review.labelstudio import default_url

    inputs.str(
        "url",
        default=default_url(),
        required=True,
        label="Label Studio URL",
        description="The Label Studio server, e.g. http://localhost:8080",
    )
    inputs.str(
        "api_key",
        label="API key",
        description="Your legacy API token (Account & Settings > Legacy "
        "Token). Leave it empty to use FIFTYONE_LABELSTUDIO_API_KEY of the "
        "process that runs the operation (a delegated run stores what is "
        "typed here with its parameters)",
    )


def _server(params):
    return {"url": params.get("url") or None, "api_key": params.get("api_key") or None}


class SendToLabelStudio(_common.DinopropOperator):
    """Sends the review queue to Label Studio (``send_to_annotator``)."""

    NAME = "send_to_label_studio"
    LABEL = "dinoprop: send review queue to Label Studio"
    DESCRIPTION = (
        "Creates a Label Studio project of the review queue, each task "
        "pre-filled with its propagated label"
    )
    DELEGATE_THRESHOLD = DELEGATE_THRESHOLD
    FORM_TITLE = "Send the review queue to Label Studio"
    PROGRESS_LABEL = "Sending to Label Studio"
    RESULT_TITLE = "Sent to Label Studio"
    RESULT_ROWS = [
        ("num_sent", "Sent", "int"),
        ("num_prefilled", "Pre-filled", "int"),
        ("anno_key", "Annotation run (to load)", "str"),
        ("project_url", "Label Studio project", "str"),
    ]

    def _target(self, ctx, inputs=None):
        from dinoprop.review import queue_view
        from dinoprop.review.loop import task_fields

        label_field = ctx.params.get("label_field") or task_fields(ctx.dataset)[0]
        return queue_view(ctx.dataset, "review", label_field)

    def form(self, ctx, inputs, view):
        from dinoprop.review.loop import task_fields

        label_field = _common.field_dropdown(
            ctx, inputs, "label_field",
            [f for f in _common.label_fields(ctx.dataset) if not f.endswith("_propagated")],
            "Label field", "The seed field the decisions will be written to",
            default=task_fields(ctx.dataset)[0],
        )
        if label_field is None:
            return False
        _common.notice(inputs, "queue", "%d samples in the review queue" % view.count())
        inputs.bool(
            "prefill", default=True, label="Pre-fill the propagated label",
            description="Annotators accept or change the suggestion",
            view=types.CheckboxView(),
        )
        inputs.str(
            "project_name", label="Project name",
            description="Optional; defaults to FiftyOne_<dataset>",
        )
        server_inputs(inputs)
        return True

    def call(self, view, params, progress):
        from dinoprop.review import send_to_annotator
        from dinoprop.review.loop import task_fields

        extra = {"project_name": params["project_name"]} if params.get("project_name") else {}
        return send_to_annotator(
            view,
            params.get("label_field") or task_fields(view)[0],
            prefill=params.get("prefill", True),
            **_server(params),
            **extra,
        )


class LoadReviewedLabels(_common.DinopropOperator):
    """Loads what humans decided in Label Studio (``load_from_annotator``)."""

    NAME = "load_reviewed_labels"
    LABEL = "dinoprop: load reviewed labels"
    DESCRIPTION = (
        "Writes the labels humans submitted in Label Studio; untouched, "
        "skipped, draft and empty tasks stay in the review queue"
    )
    DELEGATE_THRESHOLD = DELEGATE_THRESHOLD
    FORM_TITLE = "Load reviewed labels from Label Studio"
    PROGRESS_LABEL = "Loading from Label Studio"
    RESULT_TITLE = "Reviewed labels loaded"
    RESULT_ROWS = [
        ("num_sent", "Sent", "int"),
        ("num_submitted", "Submitted", "int"),
        ("num_promoted", "Promoted", "int"),
        ("num_left_in_queue", "Left in queue", "int"),
        ("num_corrected", "Corrected (human labels)", "int"),
        ("num_confirmed", "Suggestion accepted (confirmed)", "int"),
        ("num_empty", "Empty submissions (not applied)", "int"),
        ("num_skipped", "Skipped", "int"),
        ("num_drafts", "Drafts", "int"),
        ("num_changed", "Kept (changed in FiftyOne since)", "int"),
        ("repropagated", "Re-propagated", "bool"),
    ]

    def _target(self, ctx, inputs=None):
        from dinoprop.review import annotator_runs

        key = ctx.params.get("anno_key")
        runs = annotator_runs(ctx.dataset)
        if key not in runs:
            return ctx.dataset if not runs else ctx.dataset.load_annotation_view(runs[0])
        return ctx.dataset.load_annotation_view(key)

    def form(self, ctx, inputs, view):
        from dinoprop.review import annotator_runs

        key = _common.field_dropdown(
            ctx, inputs, "anno_key", annotator_runs(ctx.dataset),
            "Annotation run", "What send_to_label_studio sent, newest first",
            missing="Nothing sent yet: run send_to_label_studio first",
        )
        if key is None:
            return False
        server_inputs(inputs)
        inputs.bool(
            "repropagate", default=True, label="Re-propagate afterwards",
            description="Re-run the newest propagation with the new labels",
            view=types.CheckboxView(),
        )
        return True

    def call(self, view, params, progress):
        from dinoprop.review import annotator_runs, load_from_annotator

        return load_from_annotator(
            view,
            params.get("anno_key") or annotator_runs(view)[0],
            repropagate=params.get("repropagate", True),
            **_server(params),
        )
