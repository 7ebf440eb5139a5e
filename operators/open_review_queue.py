"""Operator ``open_review_queue``: show the samples that need a human look."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import _common


class OpenReviewQueue(foo.Operator):
    """Opens the review queue (``dinoprop.review.review_queue_view``)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="open_review_queue",
            label="dinoprop: open the review queue",
            description="Shows the least confident propagated labels first",
            dynamic=True,
            view_target=False,
        )

    def resolve_input(self, ctx):
        from dinoprop.core import DinopropError
        from dinoprop.review import review_queue_view

        inputs = types.Object()
        try:
            queue = review_queue_view(ctx.dataset)
        except DinopropError as error:
            _common.warn(inputs, "queue", str(error))
            return types.Property(inputs)
        _common.notice(
            inputs,
            "queue",
            "%d samples need review, least confident first" % queue.count(),
        )
        return types.Property(
            inputs, view=types.View(label="Open the review queue")
        )

    def execute(self, ctx):
        from dinoprop.review import review_queue_view

        queue = review_queue_view(ctx.dataset)
        ctx.ops.set_view(view=queue)
        return {"num_samples": queue.count()}

    def resolve_output(self, ctx):
        return _common.summary_output(
            "Review queue", [("num_samples", "Samples to review", "int")]
        )
