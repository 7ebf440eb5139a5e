"""dinoprop.review: accepting propagated labels, undoing it, the review queue."""

import pytest


def _propagated(dataset, confidences):
    """Writes ``label_propagated`` = ground truth with the given confidences."""
    import fiftyone as fo

    truth = dataset.values("ground_truth.label")
    dataset.set_values(
        "label_propagated",
        [
            fo.Classification(label=t, confidence=c)
            for t, c in zip(truth, confidences)
        ],
    )


@pytest.fixture
def propagated_dataset(image_dataset):
    # 24 samples, 6 seeds in `label`; confidences 0.50, 0.52, ... 0.96
    _propagated(image_dataset, [0.5 + 0.02 * i for i in range(24)])
    return image_dataset


def test_accept_fills_only_unlabeled_confident_samples(propagated_dataset):
    from dinoprop.review import ACCEPTED_TAG, accept_propagated_labels

    ds = propagated_dataset
    seeds_before = {
        sid: lab.label for sid, lab in zip(*ds.values(["id", "label"])) if lab
    }

    results = accept_propagated_labels(
        ds, "label_propagated", "label", min_confidence=0.8
    )

    summary = results.summary()
    confs = dict(zip(*ds.values(["id", "label_propagated.confidence"])))
    expected = {
        sid for sid, c in confs.items() if c >= 0.8 and sid not in seeds_before
    }
    assert set(results.sample_ids) == expected
    assert summary["num_accepted"] == len(expected) > 0
    assert summary["num_human_labeled"] == 6
    assert summary["num_below_threshold"] == 18 - len(expected)
    # human labels untouched, accepted labels copied with their confidence
    for sid, label in zip(*ds.values(["id", "label"])):
        if sid in seeds_before:
            assert label.label == seeds_before[sid]
            assert label.confidence is None
        elif sid in expected:
            assert label.label == ds[sid].label_propagated.label
            assert label.confidence == pytest.approx(confs[sid])
        else:
            assert label is None
    assert set(ds.match_tags(ACCEPTED_TAG).values("id")) == expected


def test_undo_reverts_exactly_the_accepted_batch(propagated_dataset):
    from dinoprop.review import (
        ACCEPTED_TAG,
        accept_propagated_labels,
        accepted_batches,
        undo_accept,
    )

    ds = propagated_dataset
    before = ds.values("label")
    first = accept_propagated_labels(ds, "label_propagated", "label", 0.9)
    second = accept_propagated_labels(ds, "label_propagated", "label", 0.7)
    assert first.num_accepted > 0 and second.num_accepted > 0
    assert not set(first.sample_ids) & set(second.sample_ids)
    assert accepted_batches(ds, "label") == {
        first.batch: first.num_accepted,
        second.batch: second.num_accepted,
    }

    undone = undo_accept(ds, "label", batch=second.batch)
    assert undone["num_reverted"] == second.num_accepted
    assert set(ds.match_tags(ACCEPTED_TAG).values("id")) == set(
        first.sample_ids
    )

    assert undo_accept(ds, "label")["num_reverted"] == first.num_accepted
    assert ds.values("label") == before
    assert ds.match_tags(ACCEPTED_TAG).count() == 0


def test_accept_creates_a_missing_label_field(propagated_dataset):
    from dinoprop.review import accept_propagated_labels

    results = accept_propagated_labels(
        propagated_dataset, "label_propagated", "reviewed", 0.0
    )
    assert results.num_accepted == 24
    assert propagated_dataset.count("reviewed") == 24


def test_accept_on_a_view_touches_only_the_view(propagated_dataset):
    from dinoprop.review import accept_propagated_labels

    view = propagated_dataset.limit(5)
    results = accept_propagated_labels(view, "label_propagated", "label", 0.0)
    assert set(results.sample_ids) <= set(view.values("id"))
    outside = propagated_dataset.exclude(view.values("id"))
    assert outside.count("label") == propagated_dataset.count("label") - (
        view.count("label")
    )


@pytest.mark.parametrize(
    "output_field, label_field, threshold, message",
    [
        ("missing", "label", 0.5, "does not exist"),
        ("ground_truth_str", "label", 0.5, "expected a Classification"),
        ("label_propagated", "label_propagated", 0.5, "must differ"),
        ("label_propagated", "ground_truth_str", 0.5, "expected a Classific"),
        ("label_propagated", "label", 1.5, "between 0 and 1"),
        ("label_propagated", "label", "high", "between 0 and 1"),
        ("label_propagated", "new.nested", 0.5, "top-level"),
        ("label_propagated", "label", None, "between 0 and 1"),
    ],
)
def test_bad_input_raises_and_writes_nothing(
    propagated_dataset, output_field, label_field, threshold, message
):
    from dinoprop.core import DinopropError
    from dinoprop.review import accept_propagated_labels

    ds = propagated_dataset
    ds.set_values("ground_truth_str", ds.values("ground_truth.label"))
    before = ds.values("label")
    with pytest.raises(DinopropError, match=message):
        accept_propagated_labels(ds, output_field, label_field, threshold)
    assert ds.values("label") == before
    assert ds.count_sample_tags() == {}


def test_review_queue_view(propagated_dataset):
    from dinoprop.core import DinopropError
    from dinoprop.review import (
        NEEDS_REVIEW_TAG,
        REVIEW_QUEUE_VIEW,
        review_queue_view,
    )

    ds = propagated_dataset
    with pytest.raises(DinopropError, match="propagate_labels first"):
        review_queue_view(ds)

    ds.limit(4).tag_samples(NEEDS_REVIEW_TAG)
    assert review_queue_view(ds.limit(1)).count() == 4

    saved = ds.match_tags(NEEDS_REVIEW_TAG).sort_by(
        "label_propagated.confidence"
    )
    ds.save_view(REVIEW_QUEUE_VIEW, saved)
    queue = review_queue_view(ds)
    assert queue.name == REVIEW_QUEUE_VIEW
    assert queue.values("id") == saved.values("id")
