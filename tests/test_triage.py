"""The human half of the loop: label schemas, label states, triage, undo,
live re-propagation, and the App server's own edit route."""

import logging

import pytest

import fiftyone as fo

import dinoprop
from dinoprop import review
from dinoprop.label_states import (
    ACCEPTED,
    CONFIRMED,
    HUMAN,
    PROPAGATED,
    UNLABELED,
    sample_states,
    seed_expression,
)


def _propagate(ds, **kwargs):
    return dinoprop.propagate_labels(ds, "label", progress=False, **kwargs)


# -------------------------------------------------------- label schemas


def test_enable_annotation_offers_every_class_of_the_task(embedded_dataset):
    ds = embedded_dataset
    ds.default_classes = ["red", "green", "blue", "purple"]
    ds.save()
    schema = review.enable_annotation(ds, "label", classes=["orange"])
    assert schema["classes"] == ["red", "green", "blue", "purple", "orange"]
    assert schema["component"] == "radio"  # 5 classes
    assert ds.active_label_schemas[0] == "label"
    assert ds.classes["label"] == schema["classes"]

    # adding classes later extends the list, never shrinks it
    for extra in ("cyan", "magenta"):
        review.enable_annotation(ds, "label", classes=[extra])
    schema = ds.label_schemas["label"]
    assert schema["classes"][-2:] == ["cyan", "magenta"]
    assert schema["component"] == "dropdown"  # 7 classes
    assert "purple" in schema["classes"]


def test_propagation_gives_the_fields_schemas_and_stores_alternatives(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    schemas = ds.label_schemas
    assert sorted(schemas["label"]["classes"]) == ["blue", "green", "red"]
    assert schemas["label_propagated"]["read_only"] is True
    assert "read_only" not in schemas["label"]
    assert ds.active_label_schemas[:2] == ["label", "label_propagated"]
    target = ds.exists("label", False).first().label_propagated
    assert target.dinoprop_top_labels[0] == target.label
    assert sorted(target.dinoprop_top_labels) == ["blue", "green", "red"]
    probs = target.dinoprop_top_confidences
    assert probs == sorted(probs, reverse=True)
    assert abs(probs[0] - target.confidence) < 1e-4


def test_more_classes_than_a_dropdown_holds_get_a_text_box(embedded_dataset):
    many = ["class%04d" % i for i in range(1001)]
    schema = review.enable_annotation(embedded_dataset, "label", classes=many)
    assert schema["component"] == "text" and "classes" not in schema
    assert len(embedded_dataset.classes["label"]) == 1004  # still recorded


def test_an_empty_seed_field_is_created_for_annotation(image_dataset):
    schema = review.enable_annotation(image_dataset, "species", classes=["cat", "dog"])
    assert image_dataset.get_field("species") is not None
    assert schema["classes"] == ["cat", "dog"]


def test_a_fiftyone_without_label_schemas_only_gets_a_message(
    embedded_dataset, monkeypatch, caplog
):
    import dinoprop.label_schema as ls

    monkeypatch.setattr(ls, "label_schemas_supported", lambda dataset: False)
    with caplog.at_level(logging.INFO, logger="dinoprop.label_schema"):
        assert review.enable_annotation(embedded_dataset, "label") is None
        _propagate(embedded_dataset)  # still works
    assert "no label schemas" in caplog.text
    assert embedded_dataset.label_schemas == {}


def test_a_rerun_with_the_same_seeds_rewrites_nothing(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    before = ds.values("last_modified_at")
    ids = ds.values("label_propagated.id")
    results = _propagate(ds)
    assert ds.values("last_modified_at") == before
    assert ds.values("label_propagated.id") == ids
    assert results.summary()["num_flipped"] == 0


# ---------------------------------------------------------- label states


def test_label_states_and_which_are_seeds(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    unlabeled = ds.exists("label", False).values("id")
    accepted = review.accept_propagated_labels(
        ds.select(unlabeled[:4]), "label_propagated", "label"
    ).sample_ids
    corrected = accepted[0]
    sample = ds[corrected]
    sample["label"].label = "purple" if sample["label"].label != "purple" else "red"
    sample.save()  # a human corrects an accepted label
    review.confirm_label(ds, accepted[1], "label")
    review.confirm_label(ds, unlabeled[5], "label")
    ds.select(unlabeled[6]).set_field("label_propagated", None).save()

    ids, states, _, _ = sample_states(ds, "label", "label_propagated")
    state = dict(zip(ids, states))
    assert state[corrected] == HUMAN
    assert state[accepted[1]] == CONFIRMED
    assert state[unlabeled[5]] == CONFIRMED
    assert {state[i] for i in accepted[2:4]} == {ACCEPTED}
    assert state[unlabeled[6]] == UNLABELED
    assert state[unlabeled[7]] == PROPAGATED
    assert ds[accepted[1]]["label"].dinoprop_confirmed == ds[accepted[1]]["label"].label
    # the database's rule for seeds is the same
    seed_ids = set(ds.match(seed_expression("label")).values("id"))
    assert seed_ids == {i for i, s in state.items() if s in (HUMAN, CONFIRMED)}

    # seeds: the 6 originals, the corrected one, the two confirmed ones
    results = _propagate(ds)
    seeds = set(results.seed_ids)
    assert len(seeds) == 9
    assert {corrected, accepted[1], unlabeled[5]} <= seeds
    assert not seeds & set(accepted[2:4])


def test_confirming_a_human_label_is_refused(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    seed = ds.exists("label").first().id
    with pytest.raises(dinoprop.DinopropError, match="no machine label to confirm"):
        review.confirm_label(ds, seed, "label")


# ------------------------------------------------------ triage and queues


def test_triage_shows_the_alternatives_and_labels_move_through_the_queue(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    queue = review.queue_view(ds, "review", "label")
    assert queue.count() > 3
    confidences = queue.values("label_propagated.confidence")
    assert confidences == sorted(confidences)  # least confident first
    first, second, third = queue.values("id")[:3]

    info = review.sample_triage(ds, first, "label")
    assert info["state"] == PROPAGATED
    assert info["suggestion"] == info["propagated"]
    assert len(info["alternatives"]) == 2  # 3 classes: the label and 2 more
    assert info["suggestion"] not in [a[0] for a in info["alternatives"]]
    assert sorted(info["classes"]) == ["blue", "green", "red"]

    choice = info["alternatives"][0][0]
    results = review.label_samples(ds.select(first), "label", choice, expected={first: info["version"]})
    assert results.sample_ids == [first]
    assert ds[first]["label"].label == choice
    assert review.next_in_queue(ds, "review", "label", current=first) == second

    review.skip_sample(ds, second)
    assert review.next_in_queue(ds, "review", "label") == third  # skipped go last
    review.label_samples(ds.select(second), "label", "green")
    assert "dinoprop:skipped" not in ds[second].tags


def test_a_label_changed_by_someone_else_is_never_overwritten(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    sample_id = review.next_in_queue(ds, "review", "label")
    seen = review.sample_triage(ds, sample_id, "label")["version"]
    review.label_samples(ds.select(sample_id), "label", "blue")  # a colleague
    with pytest.raises(review.LabelConflictError, match="changed by someone else"):
        review.label_samples(ds.select(sample_id), "label", "red", expected={sample_id: seen})
    assert ds[sample_id]["label"].label == "blue"


def test_undo_restores_what_a_labeling_replaced(embedded_dataset):
    ds = embedded_dataset
    _propagate(ds)
    unlabeled = ds.exists("label", False).values("id")
    accepted = review.accept_propagated_labels(
        ds.select(unlabeled[:2]), "label_propagated", "label"
    ).sample_ids
    before = {sid: ds[sid]["label"] for sid in accepted}
    targets = accepted + unlabeled[2:5]
    batch = review.label_samples(ds.select(targets), "label", "magenta").batch
    assert "magenta" in ds.label_schemas["label"]["classes"]  # a new class
    review.label_samples(ds.select(unlabeled[4]), "label", "red")  # changed again

    done = review.undo_labeling(ds, batch)
    assert done == {"batch": batch, "num_restored": 4, "num_kept_changed": 1}
    for sid in accepted:  # back to the accepted labels, markers and all
        assert ds[sid]["label"] == before[sid]
    assert ds.select(unlabeled[2:4]).count("label") == 0
    assert ds[unlabeled[4]]["label"].label == "red"
    assert batch not in [b["batch"] for b in review.labeling_batches(ds)]


# ----------------------------------------------------- the loop and re-runs


def test_loop_status_counts_and_previews(embedded_dataset):
    ds = embedded_dataset
    status = review.loop_status(ds)
    assert status["run_key"] is None and status["new_seeds"] == 6
    _propagate(ds)
    status = review.loop_status(ds, threshold=0.0)
    counts = status["counts"]
    assert counts["human"] == 6 and counts["propagated"] == 18
    assert counts["above_threshold"] == 18 and counts["in_review"] == 0
    assert status["seeds_per_class"] == {"blue": 2, "green": 2, "red": 2}
    assert status["preview"]["num_accepted"] == 18
    coverage = [row[0] for row in status["curve"]]
    assert coverage == sorted(coverage) and coverage[-1] == 1.0
    strict = review.loop_status(ds, threshold=1.0)["preview"]
    assert strict["num_accepted"] == 0 and strict["estimated_precision"] is None


def test_repropagation_runs_after_every_k_new_labels(embedded_dataset):
    ds = embedded_dataset
    method = _propagate(ds).summary()["method"]  # what auto chose
    assert review.repropagate_if_due(ds, "label", every=2) is None
    first = review.next_in_queue(ds, "review", "label")
    review.label_samples(ds.select(first), "label", ds[first].ground_truth.label)
    assert review.repropagate_if_due(ds, "label", every=2) is None
    assert review.loop.new_seed_count(ds, "label", "dinoprop_label_propagated") == 1
    second = review.next_in_queue(ds, "review", "label")
    review.label_samples(ds.select(second), "label", ds[second].ground_truth.label)
    change = review.repropagate_if_due(ds, "label", every=2)
    assert change["before"]["num_seeds"] == 6 and change["after"]["num_seeds"] == 8
    assert review.loop_status(ds)["new_seeds"] == 0
    assert review.loop.new_seed_count(ds, "label", change["run_key"]) == 0
    rerun = ds.load_run_results(change["run_key"]).summary()
    assert rerun["method"] == method  # the re-run keeps auto's choice
    assert rerun["cv_accuracy_by_method"].keys() == {method}


# ------------------------------------------- the App server's own edit route


def test_a_label_set_through_the_apps_patch_route_is_a_seed(embedded_dataset):
    import base64

    from starlette.testclient import TestClient

    from fiftyone.server.app import app

    ds = embedded_dataset
    ds.persistent = True  # the server loads it by ID from the database
    _propagate(ds)
    sample = ds[review.next_in_queue(ds, "review", "label")]
    etag = base64.b64encode(sample.last_modified_at.isoformat().encode()).decode()
    url = "/dataset/%s/sample/%s" % (ds._doc.id, sample.id)
    patch = [
        {"op": "add", "path": "/label", "value": {"_cls": "Classification", "label": "blue"}}
    ]
    with TestClient(app) as client:
        reply = client.patch(
            url, json=patch,
            headers={"If-Match": '"%s"' % etag, "Content-Type": "application/json-patch+json"},
        )
        assert reply.status_code == 200, reply.text
        stale = client.patch(  # a second reviewer with the old ETag
            url, json=[{"op": "add", "path": "/label", "value": {"_cls": "Classification", "label": "red"}}],
            headers={"If-Match": '"%s"' % etag, "Content-Type": "application/json-patch+json"},
        )
    assert stale.status_code == 412  # the App's conflict: nothing overwritten
    sample.reload()
    assert sample["label"].label == "blue"
    results = _propagate(ds)
    assert sample.id in results.seed_ids
