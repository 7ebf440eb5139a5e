"""Operator ``open_review_queue``: show the samples that need a human look."""

import fiftyone.operators.types as types

from . import _common


class OpenReviewQueue(_common.DinopropOperator):
    """Opens the review queue (``dinoprop.review.review_queue_view``)."""

    NAME = "open_review_queue"
    LABEL = "dinoprop: open the review queue"
    DESCRIPTION = "Shows the least confident propagated labels first"
    CONFIG_OPTIONS = {"view_target": False}
    FORM_TITLE = "Open the review queue"
    RESULT_TITLE = "Review queue"
    RESULT_ROWS = [("num_samples", "Samples to review", "int")]

    def resolve_input(self, ctx):
        from dinoprop.core import DinopropError
        from dinoprop.review import review_queue_view

        inputs = types.Object()
        try:
            queue = review_queue_view(ctx.dataset)
        except DinopropError as error:
            _common.warn(inputs, "queue", str(error))
            return types.Property(inputs)
        count = queue.count()
        if count == 0:
            _common.warn(
                inputs, "queue",
                "Nothing to review: every sample the last propagation flagged "
                "has a label now",
            )
            return types.Property(inputs)
        _common.notice(
            inputs,
            "queue",
            "%d samples need review, least confident first" % count,
        )
        return types.Property(inputs, view=types.View(label=self.FORM_TITLE))

    def execute(self, ctx):
        from dinoprop.review import review_queue_view

        queue = review_queue_view(ctx.dataset)
        ctx.ops.set_view(view=queue)
        return {"num_samples": queue.count()}
