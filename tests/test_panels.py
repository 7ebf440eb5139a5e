"""The triage and loop panels and ``label_selected_samples``, executed through
FiftyOne's own operator execution API, as the App calls them."""

import fiftyone as fo

import dinoprop
from dinoprop import review

from test_operators import PLUGIN, execute, shown_summary, uri


def panel_event(name, dataset, method, state=None, current_sample=None, params=None):
    """Runs one panel event as the App does; returns (state, triggered ops).

    ``state`` is the panel state after the event (the App applies the
    patches the panel sends); ``triggered`` maps App operations to their
    parameters.
    """
    import fiftyone.operators as foo

    state = dict(state or {})
    result = foo.execute_operator(
        uri(name),
        dataset=dataset,
        current_sample=current_sample,
        params={
            "__method__": method,
            "panel_id": "test-panel",
            "panel_state": state,
            **(params or {}),
        },
    )
    triggered = {}
    for req in result.executor._requests:
        triggered.setdefault(req.operator_uri, []).append(req.params)
    for patch in triggered.get("patch_panel_state", []):
        state.update(patch["state"] if "state" in patch else patch)
    return state, triggered


def names_in(triggered):
    """The last panel output the App was sent, as text."""
    return str(triggered["show_panel_output"][-1])


def test_the_plugin_registers_both_panels():
    import fiftyone.plugins as fop
    from fiftyone.operators.registry import OperatorRegistry

    plugin = {p.name: p for p in fop.list_plugins()}[PLUGIN]
    assert sorted(plugin.to_dict()["panels"]) == ["dinoprop_loop", "dinoprop_triage"]
    registry = OperatorRegistry()
    for name in ("dinoprop_loop", "dinoprop_triage"):
        assert registry.operator_exists(uri(name)), name


def test_loop_panel_before_embeddings_offers_the_first_step(image_dataset):
    state, triggered = panel_event("dinoprop_loop", image_dataset, "on_load")
    text = names_in(triggered)
    assert "No embeddings yet" in text
    assert "compute_embeddings" in text


def test_loop_panel_before_a_run_offers_propagation(embedded_dataset):
    state, triggered = panel_event("dinoprop_loop", embedded_dataset, "on_load")
    text = names_in(triggered)
    assert "No propagation yet" in text and "6 seeds in 3 classes" in text
    assert "propagate_labels" in text


def test_loop_panel_shows_the_loop_and_accepts_at_the_slider(embedded_dataset):
    ds = embedded_dataset
    dinoprop.propagate_labels(ds, "label", progress=False)
    state, triggered = panel_event("dinoprop_loop", ds, "on_load")
    assert state["status"]["counts"]["human"] == 6
    text = names_in(triggered)
    assert "Seeds per class" in text and "Estimated precision vs coverage" in text

    state, _ = panel_event("dinoprop_loop", ds, "on_threshold", state, params={"value": 0.0})
    assert state["status"]["preview"]["num_accepted"] == 18
    state, _ = panel_event("dinoprop_loop", ds, "on_accept", state)
    assert "Accepted 18 labels" in state["message"]
    assert state["status"]["counts"]["accepted"] == 18


def test_loop_panel_says_when_to_stop_and_moves_the_slider_to_the_plan(embedded_dataset):
    ds = embedded_dataset
    plan = dinoprop.propagate_labels(ds, "label", progress=False).summary()["stop_plan"]
    state, triggered = panel_event("dinoprop_loop", ds, "on_load")
    text = names_in(triggered)
    assert "When to stop" in text and plan["advice"][:40] in text
    assert state["status"]["stop_plan"]["cost"] == plan["cost"]

    state, _ = panel_event("dinoprop_loop", ds, "on_threshold", state, params={"value": 1.0})
    assert state["status"]["preview"]["num_accepted"] == 0
    state, _ = panel_event("dinoprop_loop", ds, "on_stop_threshold", state)
    assert plan["num_accepted"] > 0
    assert state["status"]["threshold"] == plan["threshold"]
    assert state["status"]["preview"]["num_accepted"] == plan["num_accepted"]


def test_triage_panel_labels_and_moves_to_the_next_sample(embedded_dataset):
    ds = embedded_dataset
    dinoprop.propagate_labels(ds, "label", progress=False)
    first = review.next_in_queue(ds, "review", "label")
    state, triggered = panel_event("dinoprop_triage", ds, "on_load", current_sample=first)
    info = state["sample"]
    assert info["sample_id"] == first and info["state"] == "propagated"
    assert info["alternatives"], "the panel offers alternative classes"
    assert "Confirm %s" % info["suggestion"] in names_in(triggered)

    choice = info["alternatives"][0][0]
    state, triggered = panel_event(
        "dinoprop_triage", ds, "on_choose", state, current_sample=first,
        params={"label": choice},
    )
    assert ds[first]["label"].label == choice
    second = triggered["open_sample"][-1]["id"]
    assert second == review.next_in_queue(ds, "review", "label")

    # confirm on the next sample, then undo it
    state, _ = panel_event("dinoprop_triage", ds, "on_load", state, current_sample=second)
    suggestion = state["sample"]["suggestion"]
    state, _ = panel_event("dinoprop_triage", ds, "on_confirm", state, current_sample=second)
    assert ds[second]["label"].dinoprop_confirmed == suggestion
    state, _ = panel_event("dinoprop_triage", ds, "on_undo", state, current_sample=second)
    assert ds[second]["label"] is None


def test_triage_panel_reports_a_conflict_instead_of_overwriting(embedded_dataset):
    ds = embedded_dataset
    dinoprop.propagate_labels(ds, "label", progress=False)
    sample_id = review.next_in_queue(ds, "review", "label")
    state, _ = panel_event("dinoprop_triage", ds, "on_load", current_sample=sample_id)
    review.label_samples(ds.select(sample_id), "label", "blue")  # someone else
    state, triggered = panel_event(
        "dinoprop_triage", ds, "on_choose", state, current_sample=sample_id,
        params={"label": "red"},
    )
    assert ds[sample_id]["label"].label == "blue"
    assert "changed by someone else" in triggered["notify"][-1]["message"]
    assert "open_sample" not in triggered


def test_triage_panel_repropagates_after_k_labels(embedded_dataset):
    ds = embedded_dataset
    dinoprop.propagate_labels(ds, "label", progress=False)
    state = {"every": 2}
    for _ in range(2):
        sample_id = review.next_in_queue(ds, "review", "label")
        state, _ = panel_event("dinoprop_triage", ds, "on_load", state, current_sample=sample_id)
        state, triggered = panel_event(
            "dinoprop_triage", ds, "on_choose", state, current_sample=sample_id,
            params={"label": ds[sample_id].ground_truth.label},
        )
    assert "Re-propagated" in state["changes"]
    summary = ds.load_run_results("dinoprop_label_propagated").summary()
    assert summary["num_seeds"] == 8
    # it says when to stop, from the new run's plan and the loop's history
    assert "When to stop:** " + summary["stop_plan"]["advice"] in state["changes"]
    assert [h[0] for h in summary["stop_plan"]["history"]] == [6, 8]


def test_triage_panel_without_a_sample_or_run_never_fails(embedded_dataset):
    state, triggered = panel_event("dinoprop_triage", embedded_dataset, "on_load")
    assert "Open a sample" in names_in(triggered)
    sample_id = embedded_dataset.first().id
    state, triggered = panel_event(
        "dinoprop_triage", embedded_dataset, "on_load", current_sample=sample_id
    )
    assert state["sample"]["state"] == "human"


def test_label_selected_samples_labels_and_undoes(embedded_dataset):
    ds = embedded_dataset
    dinoprop.propagate_labels(ds, "label", progress=False)
    selected = ds.exists("label", False).values("id")[:3]
    triggered = execute(
        "label_selected_samples", ds,
        {"label_field": "label", "label": "violet", "view_target": "SELECTED_SAMPLES"},
        selected=selected,
    )
    summary = shown_summary(triggered)
    assert summary["num_labeled"] == 3
    assert ds.select(selected).values("label.label") == ["violet"] * 3
    assert "violet" in ds.label_schemas["label"]["classes"]
    assert ds.exists("label", False).count() == 15  # only the selection

    execute("label_selected_samples", ds, {"action": "undo", "batch": summary["batch"]})
    assert ds.select(selected).count("label") == 0


def test_panels_explain_a_dataset_they_cannot_read(image_dataset):
    ds = image_dataset
    ds.delete_sample_fields(["label", "ground_truth"])
    ds.set_values("label", [fo.Detections(detections=[]) for _ in range(len(ds))])
    state, triggered = panel_event("dinoprop_loop", ds, "on_load")
    assert "show_panel_output" in triggered  # rendered, did not fail
    assert "expected a Classification field" in state["message"]
    state, triggered = panel_event(
        "dinoprop_triage", ds, "on_load", current_sample=ds.first().id
    )
    assert "show_panel_output" in triggered
    assert "expected a Classification field" in state["empty"]
