"""Panel ``dinoprop_loop``: the annotation loop at a glance, in the grid.

Shows seeds per class, how many samples are human-labeled, confirmed,
accepted, above the threshold, in review or unlabeled, the estimated
accuracy, the estimated precision against coverage of the newest run with
its recommended threshold, and a threshold slider previewing what accepting
at that threshold gives; its buttons propagate now, accept at the
threshold, open the review queue, start triage in the modal, and suggest
the next samples to annotate. Its "when to stop" line is the run's stop
plan: what finishing the dataset now would cost in human labels, and
whether the next batch of suggested labels is forecast to pay; a button
moves the slider to the plan's threshold. Before any run it says what to do first and
offers the operators that start it. The numbers come from one SDK call,
:func:`dinoprop.review.loop_status`.
"""

import logging

import fiftyone.operators as foo
import fiftyone.operators.types as types

logger = logging.getLogger(__name__)

_PLUGIN = "@dinoprop/dinoprop/"
_DEFAULT_SUGGEST = 20


class LoopPanel(foo.Panel):
    """The annotation-loop panel of the grid."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="dinoprop_loop",
            label="dinoprop loop",
            surfaces="grid",
            icon="autorenew",
            help_markdown=(
                "How far the labeling is: seeds, accepted labels, the "
                "review queue, and what a threshold would accept."
            ),
        )

    def on_load(self, ctx):
        _refresh(ctx)

    def on_change_dataset(self, ctx):
        ctx.panel.state.threshold = None
        _refresh(ctx)

    def on_change_current_sample(self, ctx):  # the modal closed or moved
        _refresh(ctx)

    def on_threshold(self, ctx):
        value = ctx.params.get("value")
        if isinstance(value, (int, float)):
            ctx.panel.state.threshold = float(value)
            _refresh(ctx)

    def on_stop_threshold(self, ctx):
        plan = (ctx.panel.state.status or {}).get("stop_plan") or {}
        if plan.get("num_accepted"):
            ctx.panel.state.threshold = float(plan["threshold"])
        _refresh(ctx)

    def on_suggest_count(self, ctx):
        value = ctx.params.get("value")
        if isinstance(value, (int, float)) and value >= 1:
            ctx.panel.state.suggest_count = int(value)

    def on_propagate(self, ctx):
        from dinoprop import review

        change = _sdk(ctx, lambda: review.repropagate(ctx.dataset, _label_field(ctx)))
        if change is not None:
            ctx.panel.state.message = (
                "Re-propagated in %.1f s: %d labels flipped"
                % (change["seconds"], change["num_flipped"] or 0)
            )
        _refresh(ctx)
        ctx.ops.reload_samples()

    def on_accept(self, ctx):
        from dinoprop import review

        status = ctx.panel.state.status or {}
        threshold = status.get("threshold")
        if threshold is None:
            ctx.ops.notify("No threshold to accept at yet", variant="warning")
            return
        results = _sdk(
            ctx,
            lambda: review.accept_propagated_labels(
                ctx.dataset, status["output_field"], status["label_field"],
                min_confidence=threshold,
            ),
        )
        if results is not None:
            ctx.panel.state.message = (
                "Accepted %d labels at %.2f (batch %s; undo it with "
                "accept_propagated_labels)" % (results.num_accepted, threshold, results.batch)
            )
        _refresh(ctx)
        ctx.ops.reload_samples()

    def on_open_queue(self, ctx):
        from dinoprop import review

        status = ctx.panel.state.status or {}
        ctx.ops.set_view(view=review.queue_view(ctx.dataset, "review", status.get("label_field") or "label"))

    def on_start_triage(self, ctx):
        from dinoprop import review

        status = ctx.panel.state.status or {}
        first = review.next_in_queue(ctx.dataset, "review", status.get("label_field") or "label")
        if first is None:
            ctx.ops.notify("The review queue is empty", variant="info")
            return
        ctx.ops.set_view(view=review.queue_view(ctx.dataset, "review", status["label_field"]))
        ctx.ops.open_sample(id=first)

    def on_suggest(self, ctx):
        import dinoprop
        from dinoprop import review

        status = ctx.panel.state.status or {}
        label_field = status.get("label_field")
        count = int(ctx.panel.state.suggest_count or _DEFAULT_SUGGEST)
        has_labels = ctx.dataset.get_field(label_field) is not None
        ids = _sdk(
            ctx,
            lambda: dinoprop.suggest_seeds(
                ctx.dataset, count, label_field=label_field if has_labels else None,
                progress=False,
            ),
        )
        if ids:
            ctx.ops.set_view(view=review.queue_view(ctx.dataset, "suggested", label_field))
        _refresh(ctx)

    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        status = state.status or {}
        if state.get("message"):
            panel.md(state.message, name="message")
        if not status.get("has_embeddings"):
            panel.md(
                "**No embeddings yet.** Compute them first; then label a few "
                "samples per class and propagate.", name="start",
            )
            panel.btn(
                "embed", label="Compute embeddings", variant="contained",
                on_click=_PLUGIN + "compute_embeddings", prompt=True,
            )
            return _layout(panel)
        if not status.get("run_key") and "counts" not in status:
            return _layout(panel)  # the message says why
        if not status.get("run_key"):
            _render_before_run(panel, status)
            return _layout(panel)
        panel.md(_headline(status), name="headline")
        _seed_plot(panel, status)
        _curve_plot(panel, status)
        panel.float(
            "threshold", label="Accept threshold", min=0.0, max=1.0,
            default=status.get("threshold") or 0.9,
            view=types.SliderView(componentsProps={"slider": {"min": 0, "max": 1, "step": 0.01}}),
            on_change=self.on_threshold,
        )
        panel.md(_preview_text(status), name="preview")
        buttons = panel.h_stack("actions", gap=1)
        buttons.btn("propagate", label="Propagate now", variant="contained", on_click=self.on_propagate)
        buttons.btn("accept", label="Accept at this threshold", on_click=self.on_accept)
        if status.get("stop_plan"):
            buttons.btn("stop_threshold", label="Use the stop plan's threshold", on_click=self.on_stop_threshold)
        buttons.btn("queue", label="Open the review queue", on_click=self.on_open_queue)
        buttons.btn("triage", label="Triage in the modal", on_click=self.on_start_triage)
        suggest = panel.h_stack("suggest_row", gap=1)
        suggest.int(
            "suggest_count", label="How many", default=state.suggest_count or _DEFAULT_SUGGEST,
            min=1, on_change=self.on_suggest_count,
        )
        suggest.btn("suggest", label="Suggest the next to annotate", on_click=self.on_suggest)
        return _layout(panel)


# ------------------------------------------------------------------ helpers


def _label_field(ctx):
    return (ctx.panel.state.status or {}).get("label_field")


def _refresh(ctx):
    from dinoprop import review

    dataset = ctx.dataset
    if dataset is None:
        ctx.panel.state.status = {}
        return
    try:
        status = dict(review.loop_status(dataset, threshold=ctx.panel.state.threshold))
        status["has_embeddings"] = _has_embeddings(dataset)
    except Exception as error:  # the panel explains instead of breaking the App
        logger.exception("dinoprop loop panel")
        ctx.panel.state.message = "dinoprop cannot read this dataset's loop: %s" % error
        status = {"has_embeddings": True}
    ctx.panel.state.status = status


def _has_embeddings(dataset):
    import fiftyone.core.fields as fof

    vector_fields = dataset.get_field_schema(ftype=(fof.VectorField, fof.ArrayField))
    return any(dataset.exists(name).limit(1).count() for name in vector_fields)


def _sdk(ctx, call):
    """Runs one SDK call; a DinopropError becomes a message, not a crash."""
    from dinoprop.core import DinopropError

    try:
        return call()
    except DinopropError as error:
        ctx.ops.notify(str(error), variant="warning")
        ctx.panel.state.message = str(error)
        return None


def _render_before_run(panel, status):
    seeds = sum(status.get("seeds_per_class", {}).values())
    panel.md(
        "**No propagation yet.** `%s` holds %d seeds in %d classes. Label a "
        "few samples per class (the suggestions below are good ones), then "
        "propagate." % (status["label_field"], seeds, len(status.get("seeds_per_class", {}))),
        name="start",
    )
    row = panel.h_stack("start_actions", gap=1)
    row.btn(
        "propagate_form", label="Propagate labels", variant="contained",
        on_click=_PLUGIN + "propagate_labels", prompt=True,
    )
    row.btn(
        "suggest_form", label="Suggest samples to annotate",
        on_click=_PLUGIN + "suggest_seeds", prompt=True,
    )


def _headline(status):
    counts = status["counts"]
    rows = [
        ("Human-labeled (seeds)", counts["human"] + counts["confirmed"]),
        ("of which confirmed suggestions", counts["confirmed"]),
        ("Accepted machine labels", counts["accepted"]),
        ("Propagated, above the threshold", counts["above_threshold"]),
        ("Propagated, in review", counts["in_review"]),
        ("Unlabeled", counts["unlabeled"]),
    ]
    table = "\n".join("| %s | %d |" % row for row in rows)
    accuracy = status.get("estimated_accuracy")
    lines = [
        "**%d samples** · seed field `%s` · estimated accuracy **%s** · "
        "%d new seeds since the last run"
        % (
            counts["total"], status["label_field"],
            "n/a" if accuracy is None else "%.1f%%" % (100 * accuracy),
            status["new_seeds"],
        ),
        "",
        "| samples | count |",
        "|---|---|",
        table,
    ]
    if status.get("note"):
        lines += ["", "_%s_" % status["note"]]
    plan = status.get("stop_plan")
    if plan:
        lines += ["", "**When to stop** (whole dataset at %.0f%%): %s"
                  % (100 * plan["target_accuracy"], plan["advice"])]
    return "\n".join(lines)


def _seed_plot(panel, status):
    seeds = status.get("seeds_per_class") or {}
    panel.plot(
        "seeds_per_class",
        data=[{"type": "bar", "x": list(seeds), "y": list(seeds.values()), "name": "seeds"}],
        layout={"title": "Seeds per class", "height": 260, "margin": {"t": 40, "b": 60}},
        config={"displayModeBar": False},
    )


def _curve_plot(panel, status):
    curve = status.get("curve") or []
    data = [
        {
            "type": "scatter", "mode": "lines", "name": "estimated precision",
            "x": [row[0] for row in curve], "y": [row[1] for row in curve],
            "text": ["threshold %.2f" % row[2] for row in curve],
        }
    ]
    recommended = status.get("recommended_threshold")
    coverage = status.get("coverage_at_threshold")
    if recommended is not None and coverage:
        precision = next((row[1] for row in curve if row[0] >= coverage), None)
        data.append(
            {
                "type": "scatter", "mode": "markers", "name": "recommended %.2f" % recommended,
                "x": [coverage],
                "y": [precision],
                "marker": {"size": 12},
            }
        )
    panel.plot(
        "accuracy_vs_coverage",
        data=data,
        layout={
            "title": "Estimated precision vs coverage (propagated labels)",
            "xaxis": {"title": "coverage", "range": [0, 1]},
            "yaxis": {"title": "estimated precision"},
            "height": 300, "margin": {"t": 40},
        },
        config={"displayModeBar": False},
    )


def _preview_text(status):
    preview = status.get("preview") or {}
    threshold = status.get("threshold")
    if threshold is None:
        return "No threshold is recommended yet: add seeds."
    precision = preview.get("estimated_precision")
    return (
        "At **%.2f**: %d propagated labels would be accepted, estimated "
        "precision %s."
        % (threshold, preview.get("num_accepted", 0),
           "n/a" if precision is None else "%.1f%%" % (100 * precision))
    )


def _layout(panel):
    return types.Property(panel, view=types.GridView(orientation="vertical", gap=2))
