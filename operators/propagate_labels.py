"""Operator ``propagate_labels``: few seed labels to every sample."""

import fiftyone.core.labels as fol

from . import _common

#: The seed label types propagate_labels accepts.
LABEL_TYPES = (fol.Classification, fol.Detections)

DEFAULT_K = 10


class PropagateLabels(_common.DinopropOperator):
    """Propagates seed labels (``dinoprop.propagate_labels``)."""

    NAME = "propagate_labels"
    LABEL = "dinoprop: propagate labels from seeds"
    DESCRIPTION = (
        "Labels every sample from a few annotated seeds, with a confidence "
        "per label"
    )
    #: Propagating over 200k+ samples defaults to a delegated run.
    DELEGATE_THRESHOLD = 200_000
    TARGET_ACTION = "Propagate labels in"
    FORM_TITLE = "Propagate labels from seeds"
    PROGRESS_LABEL = "Propagating labels"
    RESULT_TITLE = "Labels propagated"
    RESULT_ROWS = [
        ("output_field", "Output field", "str"),
        ("method", "Method", "str"),
        ("num_seeds", "Seeds", "int"),
        ("num_classes", "Classes", "int"),
        ("num_propagated", "Samples labeled", "int"),
        ("estimated_accuracy", "Estimated accuracy", "float"),
        ("recommended_threshold", "Recommended threshold", "float"),
        ("coverage_at_threshold", "Coverage at threshold", "float"),
        ("num_needs_review", "Need review", "int"),
        ("ece", "Calibration error (ECE)", "float"),
        ("seconds", "Seconds", "float"),
        ("note", "Note", "str"),
        ("stop_advice", "When to stop", "str"),
    ]

    def form(self, ctx, inputs, view):
        from dinoprop.core import TAG_PREFIX
        from dinoprop.propagation import DEFAULT_TARGET_PRECISION, NEEDS_REVIEW_TAG
        from dinoprop.propagation_methods import DEFAULT_TARGET_ACCURACY, METHODS

        fields = _common.label_fields(view, LABEL_TYPES)
        label_field = _common.field_dropdown(
            ctx,
            inputs,
            "label_field",
            fields,
            "Seed label field",
            "The Classification field holding the annotated seeds, or a "
            "Detections field whose boxes carry patch embeddings",
            default=_default_label_field(fields),
            missing="This dataset has no Classification or Detections field "
            "to propagate",
        )
        if label_field is None:
            return False
        objects = _is_detections(view, label_field)
        seed_tag = ctx.params.get("seed_tag") or None
        if not _seeds_ok(inputs, view, label_field, objects, seed_tag):
            return False

        if objects:
            attribute = ctx.params.get("embeddings") or _common.DEFAULT_EMBEDDINGS
            inputs.str(
                "embeddings",
                default=_common.DEFAULT_EMBEDDINGS,
                label="Patch embeddings attribute",
                description="The box attribute holding the patch embeddings",
            )
            if not view.count("%s.detections.%s" % (label_field, attribute)):
                _common.warn(
                    inputs,
                    "patch_embeddings",
                    "No box in '%s' has patch embeddings in '%s'" % (label_field, attribute),
                    "Run compute_embeddings with '%s' as its object patches "
                    "field first" % label_field,
                )
                return False
        else:
            embeddings = _common.embeddings_dropdown(
                ctx,
                inputs,
                view,
                "The vectors that define which samples are neighbours",
            )
            if embeddings is None:
                return False

        default_output = label_field + "_propagated"
        output = ctx.params.get("output_field") or default_output
        error = _output_error(view, output, label_field)
        inputs.str(
            "output_field",
            default=default_output,
            label="Output field",
            description="Where the propagated labels (with confidence) go; "
            "the seed field is never modified",
            invalid=error is not None,
            error_message=error or "",
        )

        _common.choice_input(
            inputs,
            "method",
            METHODS,
            "Method",
            default="auto",
            description="auto picks the method that scores best on the "
            "seeds (leave-one-out)",
        )
        inputs.int(
            "k",
            default=DEFAULT_K,
            min=1,
            label="Neighbours (k)",
            description="Neighbours per sample in the similarity graph",
        )
        inputs.float(
            "target_precision",
            default=DEFAULT_TARGET_PRECISION,
            min=0.5,
            max=1.0,
            label="Target precision",
            description="The share of correct labels the recommended "
            "threshold aims for among the samples above it",
        )
        inputs.float(
            "target_accuracy",
            default=DEFAULT_TARGET_ACCURACY,
            min=0.5,
            max=1.0,
            label="Dataset accuracy target",
            description="The share of correct labels the whole dataset "
            "must reach when you stop labeling (the stop plan: accept the "
            "most confident labels, label the rest by hand)",
        )
        inputs.float(
            "confidence_threshold",
            min=0.0,
            max=1.0,
            label="Review threshold",
            description="Samples below this confidence are tagged %s; "
            "empty uses the recommended threshold" % NEEDS_REVIEW_TAG,
        )
        tags = sorted(
            t for t in view.distinct("tags") if t and not t.startswith(TAG_PREFIX)
        )
        if tags:
            _common.choice_input(
                inputs,
                "seed_tag",
                tags,
                "Only seeds tagged",
                description="Optional: use only the seeds with this tag",
            )
        if not objects:
            _engine_inputs(ctx, inputs)
        return True

    def call(self, view, params, progress):
        import dinoprop
        from dinoprop.propagation import DEFAULT_TARGET_PRECISION
        from dinoprop.propagation_methods import DEFAULT_TARGET_ACCURACY

        return dinoprop.propagate_labels(
            view,
            params["label_field"],
            embeddings=params.get("embeddings") or _common.DEFAULT_EMBEDDINGS,
            output_field=params.get("output_field") or None,
            method=params.get("method") or "auto",
            k=int(params.get("k") or DEFAULT_K),
            seed_tag=params.get("seed_tag") or None,
            confidence_threshold=params.get("confidence_threshold"),
            target_precision=params.get("target_precision") or DEFAULT_TARGET_PRECISION,
            target_accuracy=params.get("target_accuracy") or DEFAULT_TARGET_ACCURACY,
            progress=progress,
            **_common.ray_options(params),
        )

    def follow_up(self, ctx, results):
        from dinoprop.core import DinopropError
        from dinoprop.review import review_queue_view

        yield ctx.ops.reload_dataset()
        if results.summary().get("num_needs_review"):
            try:
                queue = review_queue_view(ctx.dataset)
            except DinopropError:
                return
            # the view itself, not its name: the App may not have refetched
            # the dataset's saved views yet
            yield ctx.ops.set_view(view=queue)


def _default_label_field(fields):
    for name in ("label", "ground_truth"):
        if name in fields:
            return name
    plain = [f for f in fields if not f.endswith("_propagated")]
    return (plain or fields or [None])[0]


def _is_detections(view, label_field):
    return issubclass(view.get_field(label_field).document_type, fol.Detections)


def _engine_inputs(ctx, inputs):
    """Where the kNN graph is searched (this machine or a Ray cluster)."""
    from dinoprop.graph import APPROXIMATE_MIN_NODES

    _common.graph_engine_inputs(
        ctx,
        inputs,
        "A Ray cluster searches the similarity graph of large views (from "
        "%d samples; smaller ones are searched exactly without it) on all "
        "its machines; the propagation itself runs where the operation runs"
        % APPROXIMATE_MIN_NODES,
    )


def _seeds_ok(inputs, view, label_field, objects, seed_tag):
    """Shows how many seeds there are; blocks the form when too few."""
    from dinoprop.propagation import count_seeds

    seeds = count_seeds(view, label_field, seed_tag)
    num_seeds, classes = sum(seeds.values()), sorted(seeds)
    if num_seeds == 0:
        _common.warn(
            inputs,
            "seeds",
            "No seeds: no %s in the target view has a label in '%s'%s"
            % ("box" if objects else "sample", label_field,
               "" if seed_tag is None else " and the tag '%s'" % seed_tag),
            "Annotate a few samples per class first (suggest_seeds tells "
            "you which)",
        )
        return False
    if len(classes) < 2:
        _common.warn(
            inputs,
            "seeds",
            "The seeds in '%s' have a single class (%s); label at least two "
            "classes" % (label_field, ", ".join(map(str, classes))),
        )
        return False
    if objects:
        rest = "the other boxes get a propagated label"
    else:
        targets = view.count() - num_seeds
        if targets == 0:
            _common.warn(
                inputs, "seeds",
                "Every sample in the target view is a seed: there is nothing "
                "to propagate to",
            )
            return False
        rest = "the other %d samples get a propagated label" % targets
    _common.notice(
        inputs,
        "seeds",
        "%d seeds in %d classes; %s" % (num_seeds, len(classes), rest),
    )
    return True


def _output_error(view, output, label_field):
    """Why propagated labels may not go to ``output``, or None."""
    from dinoprop.core import DinopropError
    from dinoprop.propagation import check_output_field

    try:
        check_output_field(view, label_field, output)
    except DinopropError as error:
        return str(error)
    return None
