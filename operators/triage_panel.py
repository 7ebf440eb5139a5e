"""Panel ``dinoprop_triage``: label the sample open in the modal, then the next.

For the sample open in the App's sample modal the panel shows its state,
its propagated label and confidence, and the next most likely classes; one
click confirms the machine's class, picks an alternative or any other
class, or skips, and the modal moves to the next sample of the active queue
(the review queue, least confident first, or the ``suggest_seeds``
suggestions). Every ``every`` new human labels (however they were made,
also in the App's Annotate tab) the labels are re-propagated and the panel
shows what changed. All work is one SDK call of :mod:`dinoprop.review`.
"""

import logging

import fiftyone.operators as foo
import fiftyone.operators.types as types

logger = logging.getLogger(__name__)

_QUEUES = {"review": "Review queue (least confident first)", "suggested": "Suggested to annotate"}
_NO_SAMPLE = "Open a sample in the modal to triage it."


class TriagePanel(foo.Panel):
    """The triage panel of the sample modal."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="dinoprop_triage",
            label="dinoprop triage",
            surfaces="modal",
            icon="fact_check",
            help_markdown=(
                "Confirm or correct the propagated label of this sample; "
                "the modal then shows the next sample of the queue."
            ),
        )

    # ------------------------------------------------------------ events

    def on_load(self, ctx):
        from dinoprop.review.loop import DEFAULT_EVERY, task_fields

        label_field, output_field = task_fields(ctx.dataset)
        ctx.panel.state.label_field = label_field
        ctx.panel.state.output_field = output_field
        ctx.panel.state.queue = ctx.panel.state.queue or "review"
        ctx.panel.state.every = ctx.panel.state.every or DEFAULT_EVERY
        _refresh(ctx)

    def on_change_current_sample(self, ctx):
        _repropagate_if_due(ctx)
        _refresh(ctx)

    def on_change_queue(self, ctx):
        ctx.panel.state.message = None
        ctx.panel.state.queue = ctx.params["value"]
        _refresh(ctx)

    def on_change_every(self, ctx):
        value = ctx.params.get("value")
        if isinstance(value, (int, float)) and value >= 1:
            ctx.panel.state.every = int(value)

    def on_confirm(self, ctx):
        from dinoprop import review

        self._decide(
            ctx,
            lambda sample_id, state: review.confirm_label(
                ctx.dataset, sample_id, state["label_field"],
                output_field=state["output_field"], expected=state["version"],
            ),
        )

    def on_choose(self, ctx):
        label = ctx.params.get("label") or ctx.params.get("value")
        if label:
            self._label(ctx, label)

    def on_new_class(self, ctx):
        label = (ctx.panel.state.new_class or "").strip()
        if not label:
            ctx.ops.notify("Type the new class first", variant="warning")
            return
        ctx.panel.state.new_class = ""
        self._label(ctx, label)

    def on_new_class_text(self, ctx):
        ctx.panel.state.new_class = ctx.params.get("value") or ""

    def on_skip(self, ctx):
        from dinoprop import review

        sample_id = ctx.current_sample
        ctx.panel.state.message = None
        if sample_id:
            review.skip_sample(ctx.dataset, sample_id)
            _open_next(ctx, sample_id)

    def on_undo(self, ctx):
        from dinoprop import review

        batch = ctx.panel.state.last_batch
        if not batch:
            return
        done = review.undo_labeling(ctx.dataset, batch)
        ctx.panel.state.last_batch = None
        ctx.panel.state.message = (
            "Undone: %d label(s) restored" % done["num_restored"]
            if done["num_restored"]
            else "Not undone: the label was changed again since"
        )
        _refresh(ctx)

    def on_repropagate(self, ctx):
        ctx.panel.state.message = None
        _repropagate(ctx)
        _refresh(ctx)

    def _label(self, ctx, label):
        from dinoprop import review

        self._decide(
            ctx,
            lambda sample_id, state: review.label_samples(
                ctx.dataset.select(sample_id), state["label_field"], label,
                expected={sample_id: state["version"]},
                output_field=state["output_field"],
            ),
        )

    def _decide(self, ctx, write):
        """Writes one human decision, then moves on (or explains why not)."""
        from dinoprop.core import DinopropError

        sample_id = ctx.current_sample
        if not sample_id:
            ctx.ops.notify(_NO_SAMPLE, variant="warning")
            return
        state = dict(ctx.panel.state.get("sample") or {}, **_fields(ctx))
        ctx.panel.state.message = None
        try:
            results = write(sample_id, state)
        except DinopropError as error:  # a conflict, or nothing to confirm
            ctx.ops.notify(str(error), variant="warning")
            ctx.panel.state.message = str(error)
            _refresh(ctx)
            return
        ctx.panel.state.last_batch = results.batch
        ctx.panel.state.message = "Previous sample: labeled '%s'" % results.label
        _repropagate_if_due(ctx)
        _open_next(ctx, sample_id)

    # ------------------------------------------------------------ render

    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        info = state.get("sample")
        panel.enum(
            "queue", list(_QUEUES), label="Queue", default=state.queue or "review",
            view=types.DropdownView(choices=[types.Choice(k, label=v) for k, v in _QUEUES.items()]),
            on_change=self.on_change_queue,
        )
        if state.get("message"):
            panel.md(state.message, name="message")
        if not info:
            panel.md(state.get("empty") or _NO_SAMPLE, name="empty")
            return types.Property(panel, view=types.GridView(orientation="vertical", gap=2))
        panel.md(_describe(info, state), name="current")
        buttons = panel.h_stack("decide", gap=1)
        if info["suggestion"] is not None:
            buttons.btn(
                "confirm",
                label="Confirm %s" % _pct(info["suggestion"], info["suggestion_confidence"]),
                variant="contained", on_click=self.on_confirm,
            )
        for i, (name, prob) in enumerate(info["alternatives"]):
            buttons.btn(
                "alt_%d" % i, label=_pct(name, prob), variant="outlined",
                on_click=self.on_choose, params={"label": name},
            )
        buttons.btn("skip", label="Skip", on_click=self.on_skip)
        panel.enum(
            "other", info["classes"], label="Any other class",
            view=types.AutocompleteView(), on_change=self.on_choose,
        )
        add = panel.h_stack("add", gap=1)
        add.str("new_class_text", label="New class", on_change=self.on_new_class_text)
        add.btn("new_class", label="Label as new class", on_click=self.on_new_class)
        loop = panel.h_stack("loop", gap=1)
        loop.int(
            "every", label="Re-propagate every N new labels", default=state.every,
            min=1, on_change=self.on_change_every,
        )
        loop.btn("repropagate", label="Re-propagate now", on_click=self.on_repropagate)
        if state.get("last_batch"):
            loop.btn("undo", label="Undo last label", on_click=self.on_undo)
        if state.get("changes"):
            panel.md(state.changes, name="changes")
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=2))


# ------------------------------------------------------------------ helpers


def _fields(ctx):
    return {
        "label_field": ctx.panel.state.label_field,
        "output_field": ctx.panel.state.output_field,
    }


def _refresh(ctx):
    """Reads what the panel shows for the current sample into its state."""
    from dinoprop import review
    from dinoprop.core import DinopropError

    sample_id = ctx.current_sample
    fields = _fields(ctx)
    if not sample_id or not fields["label_field"]:
        ctx.panel.state.sample = None
        return
    try:
        info = review.sample_triage(ctx.dataset, sample_id, **fields)
        queue = review.queue_view(
            ctx.dataset, ctx.panel.state.queue or "review", **fields
        )
        info["queue_left"] = queue.count()
    except Exception as error:  # the panel explains instead of breaking the App
        if not isinstance(error, DinopropError):
            logger.exception("dinoprop triage panel")
        ctx.panel.state.sample = None
        ctx.panel.state.empty = "dinoprop cannot triage this sample: %s" % error
        return
    ctx.panel.state.sample = info


def _describe(info, state):
    lines = ["**%s**" % _STATE_TEXT[info["state"]]]
    if info["label"] is not None:
        lines.append("`%s`: **%s**" % (state.label_field, info["label"]))
    if info["propagated"] is not None:
        lines.append(
            "`%s`: **%s** (confidence %.0f%%)"
            % (state.output_field, info["propagated"], 100 * info["confidence"])
        )
    lines.append("%d left in the queue" % info["queue_left"])
    return "  \n".join(lines)


_STATE_TEXT = {
    "human": "Human label (a seed)",
    "confirmed": "Confirmed by a human (a seed)",
    "accepted": "Accepted machine label (not a seed until confirmed)",
    "propagated": "Propagated label only",
    "unlabeled": "No label yet",
}


def _pct(name, prob):
    return name if prob is None else "%s (%.0f%%)" % (name, 100 * prob)


def _open_next(ctx, current):
    """Moves the modal to the next sample of the active queue."""
    from dinoprop import review

    fields = _fields(ctx)
    next_id = review.next_in_queue(
        ctx.dataset, ctx.panel.state.queue or "review", fields["label_field"],
        current=current, output_field=fields["output_field"],
    )
    if next_id is None:
        ctx.panel.state.message = "The queue is done: nothing left to triage here"
        _refresh(ctx)
        return
    ctx.ops.open_sample(id=next_id)


def _repropagate_if_due(ctx):
    from dinoprop import review
    from dinoprop.review.loop import DEFAULT_EVERY

    every = int(ctx.panel.state.every or DEFAULT_EVERY)
    _report_change(
        ctx,
        lambda: review.repropagate_if_due(ctx.dataset, ctx.panel.state.label_field, every),
    )


def _repropagate(ctx):
    from dinoprop import review

    _report_change(
        ctx, lambda: review.repropagate(ctx.dataset, ctx.panel.state.label_field)
    )


def _report_change(ctx, call):
    """Runs a re-propagation ``call`` and reports what changed (nothing when
    no re-run was due)."""
    from dinoprop.core import DinopropError

    try:
        change = call()
    except DinopropError as error:
        ctx.ops.notify(str(error), variant="warning")
        return
    if change is None:
        return
    ctx.panel.state.changes = _changes_text(change)
    ctx.ops.notify("Labels re-propagated: %s" % _changes_text(change, short=True))


def _changes_text(change, short=False):
    before, after = change["before"], change["after"]
    flips = "%d labels flipped" % (change["num_flipped"] or 0)
    if short:
        return flips
    text = (
        "**Re-propagated** in %.1f s with %s seeds (was %s): %s; auto-accept "
        "coverage %s → %s; estimated accuracy %s → %s"
        % (
            change["seconds"], after["num_seeds"], before["num_seeds"], flips,
            _fmt(before["coverage_at_threshold"]), _fmt(after["coverage_at_threshold"]),
            _fmt(before["estimated_accuracy"]), _fmt(after["estimated_accuracy"]),
        )
    )
    if change.get("stop_advice"):
        text += "\n\n**When to stop:** " + change["stop_advice"]
    return text


def _fmt(value):
    return "n/a" if value is None else "%.1f%%" % (100 * value)
