"""Operator ``suggest_seeds``: which samples to annotate next."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import _common

#: Choosing among 200k+ samples defaults to a delegated run.
DELEGATE_THRESHOLD = 200_000
ANNOTATE_NEXT_TAG = "dinoprop:annotate_next"


class SuggestSeeds(foo.Operator):
    """Suggests samples to annotate (``dinoprop.suggest_seeds``)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="suggest_seeds",
            label="dinoprop: suggest samples to annotate next",
            description="Picks the samples whose labels would help most",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = _common.target_view(ctx, inputs, "Suggest samples from")
        embeddings = _common.field_dropdown(
            ctx,
            inputs,
            "embeddings",
            _common.vector_fields(view),
            "Embeddings field",
            "The vectors used to find representative samples",
            default=_common.DEFAULT_EMBEDDINGS,
            missing="No embeddings yet: run compute_embeddings first",
            required=False,
        )
        if embeddings is None:
            return types.Property(inputs)

        total = view.count()
        count = ctx.params.get("count", 10)
        inputs.int(
            "count",
            default=10,
            min=1,
            label="How many",
            description="Number of samples to suggest",
            invalid=isinstance(count, int) and count > total,
            error_message="The target view has only %d samples" % total,
        )
        fields = _common.label_fields(view)
        if fields:
            choices = types.DropdownView()
            for name in fields:
                choices.add_choice(name, label=name)
            inputs.enum(
                "label_field",
                choices.values(),
                label="Existing labels",
                description="Optional: the label field to complete; its "
                "labeled samples are not suggested again",
                view=choices,
            )
        _common.delegation(ctx, inputs, view, DELEGATE_THRESHOLD)
        return types.Property(
            inputs, view=types.View(label="Suggest samples to annotate")
        )

    def resolve_delegation(self, ctx):
        return _common.wants_delegation(ctx, DELEGATE_THRESHOLD)

    def execute(self, ctx):
        import dinoprop

        params = ctx.params
        view = ctx.target_view()

        def call(progress):
            ids = dinoprop.suggest_seeds(
                view,
                int(params.get("count", 10)),
                label_field=params.get("label_field") or None,
                embeddings=params.get("embeddings")
                or _common.DEFAULT_EMBEDDINGS,
            )
            return _Suggestions(ids)

        return _common.run(ctx, self, "Choosing samples", call, _show)

    def resolve_output(self, ctx):
        return _common.summary_output(
            "Samples to annotate next",
            [
                ("num_suggested", "Samples suggested", "int"),
                ("tag", "Tagged", "str"),
            ],
        )


class _Suggestions:
    def __init__(self, ids):
        self.ids = list(ids)

    def summary(self):
        return {"num_suggested": len(self.ids), "tag": ANNOTATE_NEXT_TAG}


def _show(ctx, results):
    yield ctx.ops.reload_dataset()
    if results.ids:
        yield ctx.ops.set_view(view=ctx.dataset.select(results.ids, ordered=True))
