"""Operator ``suggest_seeds``: which samples to annotate next."""

from . import _common

DEFAULT_COUNT = 10


class SuggestSeeds(_common.DinopropOperator):
    """Suggests samples to annotate (``dinoprop.suggest_seeds``)."""

    NAME = "suggest_seeds"
    LABEL = "dinoprop: suggest samples to annotate next"
    DESCRIPTION = "Picks the samples whose labels would help most"
    #: Choosing among 200k+ samples defaults to a delegated run.
    DELEGATE_THRESHOLD = 200_000
    TARGET_ACTION = "Suggest samples from"
    FORM_TITLE = "Suggest samples to annotate"
    PROGRESS_LABEL = "Choosing samples"
    RESULT_TITLE = "Samples to annotate next"
    RESULT_ROWS = [
        ("num_suggested", "Samples suggested", "int"),
        ("tag", "Tagged", "str"),
    ]

    def form(self, ctx, inputs, view):
        embeddings = _common.embeddings_dropdown(
            ctx, inputs, view, "The vectors used to find representative samples"
        )
        if embeddings is None:
            return False
        total = view.count()
        default = _default_count(total)
        count = ctx.params.get("count", default)
        if count is None:
            error = "Enter how many samples to suggest"
        elif count > total:
            error = "The target view has only %d sample%s" % (total, "s" * (total != 1))
        else:
            error = None
        inputs.int(
            "count",
            default=default,
            min=1,
            label="How many",
            description="Number of samples to suggest",
            invalid=error is not None,
            error_message=error or "",
        )
        if error is not None:
            return False
        fields = _common.label_fields(view)
        if fields:
            _common.choice_input(
                inputs,
                "label_field",
                fields,
                "Existing labels",
                description="Optional: the label field to complete; its "
                "labeled samples are not suggested again",
            )
        return True

    def call(self, view, params, progress):
        import dinoprop

        ids = dinoprop.suggest_seeds(
            view,
            int(params.get("count") or _default_count(view.count())),
            label_field=params.get("label_field") or None,
            embeddings=params.get("embeddings") or _common.DEFAULT_EMBEDDINGS,
            progress=progress,
        )
        return _Suggestions(ids)

    def follow_up(self, ctx, results):
        yield ctx.ops.reload_dataset()
        if results.ids:
            yield ctx.ops.set_view(
                view=ctx.dataset.select(results.ids, ordered=True)
            )


class _Suggestions:
    def __init__(self, ids):
        self.ids = list(ids)

    def summary(self):
        from dinoprop.seeds import ANNOTATE_NEXT_TAG

        return {"num_suggested": len(self.ids), "tag": ANNOTATE_NEXT_TAG}


def _default_count(num_samples):
    """How many suggestions to ask for by default: 10, or the whole view."""
    return min(DEFAULT_COUNT, num_samples)
