"""Operator ``propagate_labels``: few seed labels to every sample."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import _common

#: Propagating over 200k+ samples defaults to a delegated run.
DELEGATE_THRESHOLD = 200_000
DEFAULT_K = 10


class PropagateLabels(foo.Operator):
    """Propagates seed labels (``dinoprop.propagate_labels``)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="propagate_labels",
            label="dinoprop: propagate labels from seeds",
            description="Labels every sample from a few annotated seeds, "
            "with a confidence per label",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        from dinoprop.propagation_methods import METHODS

        inputs = types.Object()
        view = _common.target_view(ctx, inputs, "Propagate labels in")
        fields = _common.label_fields(view)
        label_field = _common.field_dropdown(
            ctx,
            inputs,
            "label_field",
            fields,
            "Seed label field",
            "The Classification field holding the annotated seeds",
            default=_default_label_field(fields),
            missing="This dataset has no Classification field to propagate",
        )
        if label_field is None:
            return types.Property(inputs)
        if not _seeds_ok(inputs, view, label_field):
            return types.Property(inputs)

        embeddings = _common.field_dropdown(
            ctx,
            inputs,
            "embeddings",
            _common.vector_fields(view),
            "Embeddings field",
            "The vectors that define which samples are neighbours",
            default=_common.DEFAULT_EMBEDDINGS,
            missing="No embeddings yet: run compute_embeddings first",
            required=False,
        )
        if embeddings is None:
            return types.Property(inputs)

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

        methods = types.DropdownView()
        for method in METHODS:
            methods.add_choice(method, label=method)
        inputs.enum(
            "method",
            methods.values(),
            default="auto",
            label="Method",
            description="auto picks the method that scores best on the "
            "seeds (leave-one-out)",
            view=methods,
        )
        inputs.int(
            "k",
            default=DEFAULT_K,
            min=1,
            label="Neighbours (k)",
            description="Neighbours per sample in the similarity graph",
        )
        inputs.float(
            "confidence_threshold",
            min=0.0,
            max=1.0,
            label="Review threshold",
            description="Samples below this confidence are tagged "
            "dinoprop:needs_review; empty uses the recommended threshold",
        )
        tags = sorted(t for t in view.distinct("tags") if t)
        if tags:
            choices = types.DropdownView()
            for tag in tags:
                choices.add_choice(tag, label=tag)
            inputs.enum(
                "seed_tag",
                choices.values(),
                label="Only seeds tagged",
                description="Optional: use only the seeds with this tag",
                view=choices,
            )
        _common.delegation(ctx, inputs, view, DELEGATE_THRESHOLD)
        return types.Property(
            inputs, view=types.View(label="Propagate labels from seeds")
        )

    def resolve_delegation(self, ctx):
        return _common.wants_delegation(ctx, DELEGATE_THRESHOLD)

    def execute(self, ctx):
        import dinoprop

        params = ctx.params
        view = ctx.target_view()

        def call(progress):
            return dinoprop.propagate_labels(
                view,
                params["label_field"],
                embeddings=params.get("embeddings")
                or _common.DEFAULT_EMBEDDINGS,
                output_field=params.get("output_field") or None,
                method=params.get("method") or "auto",
                k=int(params.get("k") or DEFAULT_K),
                seed_tag=params.get("seed_tag") or None,
                confidence_threshold=params.get("confidence_threshold"),
                progress=progress,
            )

        return _common.run(
            ctx, self, "Propagating labels", call, _show_review_queue
        )

    def resolve_output(self, ctx):
        return _common.summary_output(
            "Labels propagated",
            [
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
            ],
        )


def _default_label_field(fields):
    for name in ("label", "ground_truth"):
        if name in fields:
            return name
    plain = [f for f in fields if not f.endswith("_propagated")]
    return (plain or fields or [None])[0]


def _seeds_ok(inputs, view, label_field):
    """Shows how many seeds there are; blocks the form when too few."""
    num_seeds = view.exists(label_field).count()
    classes = view.distinct(label_field + ".label")
    if num_seeds == 0:
        _common.warn(
            inputs,
            "seeds",
            "No seeds: no sample in the target view has a label in '%s'"
            % label_field,
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
    _common.notice(
        inputs,
        "seeds",
        "%d seeds in %d classes; the other %d samples get a propagated label"
        % (num_seeds, len(classes), view.count() - num_seeds),
    )
    return True


def _output_error(view, output, label_field):
    import fiftyone.core.fields as fof
    import fiftyone.core.labels as fol

    if output == label_field:
        return "The output field must differ from the seed field"
    existing = view.get_field(output)
    if existing is None:
        return None
    if isinstance(existing, fof.EmbeddedDocumentField) and issubclass(
        existing.document_type, fol.Classification
    ):
        return None
    return "Field '%s' exists and does not hold Classification labels" % output


def _show_review_queue(ctx, results):
    from dinoprop.review import REVIEW_QUEUE_VIEW

    yield ctx.ops.reload_dataset()
    if results.summary().get("num_needs_review") and ctx.dataset.has_saved_view(
        REVIEW_QUEUE_VIEW
    ):
        yield ctx.ops.set_view(name=REVIEW_QUEUE_VIEW)
