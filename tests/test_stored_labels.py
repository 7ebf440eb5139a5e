"""The stored labels a re-run compares with: remembered between runs,
only the samples modified since read again, and always what a fresh
read of the database would return."""

import time

import numpy as np
import pytest

import fiftyone as fo
from fiftyone import ViewField as F

import dinoprop
from dinoprop import label_writes, stored_labels
from dinoprop.propagation.common import NUM_TOP_CLASSES
from dinoprop.propagation.samples import _ATTRIBUTES

FIELD = "label_propagated"


@pytest.fixture
def reads(monkeypatch):
    """The ``match`` of every read of stored labels (None: all samples)."""
    seen = []
    read = stored_labels._read

    def counted(samples, field, width, attributes, match=None):
        seen.append(match)
        return read(samples, field, width, attributes, match)

    counted.uncounted = read
    monkeypatch.setattr(stored_labels, "_read", counted)
    stored_labels.forget_stored_labels()
    yield seen
    stored_labels.forget_stored_labels()


WIDTH = min(NUM_TOP_CLASSES, 3)  # the test images have 3 classes


def _read(samples):
    return stored_labels.read_stored_labels(samples, FIELD, WIDTH, _ATTRIBUTES)


def _names(stored, codes):
    return np.asarray(stored.classes + [None], dtype=object)[codes]


def _as_read_afresh(samples, stored):
    """Asserts that ``stored`` holds what a full read of the database does."""
    fresh = stored_labels._read.uncounted(samples, FIELD, WIDTH, _ATTRIBUTES)
    assert stored.sample_ids.tolist() == fresh.sample_ids.tolist()
    assert [bytes(i) for i in stored.label_ids] == [bytes(i) for i in fresh.label_ids]
    assert _names(stored, stored.label).tolist() == _names(fresh, fresh.label).tolist()
    np.testing.assert_array_equal(stored.confidence, fresh.confidence)
    assert stored.comparable.tolist() == fresh.comparable.tolist()
    ok = fresh.comparable
    assert _names(stored, stored.top_labels[ok]).tolist() == _names(fresh, fresh.top_labels[ok]).tolist()
    np.testing.assert_array_equal(stored.top_confidences[ok], fresh.top_confidences[ok])


def _targets(dataset):
    return dataset.exists("label", False)


def test_a_rerun_reads_again_only_the_samples_modified_since(embedded_dataset, reads):
    dataset = embedded_dataset
    time.sleep(stored_labels.CLOCK_MARGIN.total_seconds())  # the set-up's writes are older
    dinoprop.propagate_labels(dataset, "label")
    assert reads == [None]  # the first run reads every sample
    assert len(_read(dataset).sample_ids) == len(dataset)
    assert reads == [None]  # nothing changed since its own write: nothing read

    targets = _targets(dataset)
    edited = targets.first()
    edited.label_propagated.label = "somewhere-else"  # as the App saves an edit
    edited.save()
    nudged = targets.skip(1).limit(2).values("id")
    dataset.set_values(FIELD + ".confidence", {i: 0.5 for i in nudged}, key_field="id")
    tagged = targets.skip(3).first()
    tagged.tags.append("seen")
    tagged.save()

    stored = _read(dataset)
    assert {str(i) for i in reads[-1]["_id"]["$in"]} == {edited.id, tagged.id, *nudged}
    _as_read_afresh(dataset, stored)
    row = stored.rows([edited.id])[0]
    assert stored.classes[stored.label[row]] == "somewhere-else"
    assert not stored.comparable[row]  # no longer led by its label: rewritten by a re-run
    time.sleep(stored_labels.CLOCK_MARGIN.total_seconds())
    _read(dataset)  # from now on, the edits are older than what is remembered
    dataset.delete_samples(tagged)  # no sample is modified
    _as_read_afresh(dataset, _read(dataset))  # deleted: no longer a row


def test_what_is_remembered_after_every_kind_of_change_is_what_the_database_holds(
    embedded_dataset, reads
):
    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    targets = _targets(dataset)
    changes = [
        lambda: dinoprop.propagate_labels(dataset, "label"),
        lambda: dataset.set_values(
            "label", {targets.first().id: fo.Classification(label=targets.first().ground_truth.label)},
            key_field="id",
        ),
        lambda: dinoprop.propagate_labels(dataset, "label"),  # a new seed: its output cleared
        lambda: dataset.take(3, seed=1).set_field(FIELD + ".confidence", 0.25).save(),
        lambda: dinoprop.propagate_labels(dataset, "label", store_scores=True),
        lambda: dataset.delete_samples(targets.skip(2).first()),
        lambda: dinoprop.propagate_labels(dataset, "label"),
        lambda: dataset.clear_sample_field(FIELD),
        lambda: dinoprop.propagate_labels(dataset, "label"),
        lambda: dataset.rename_sample_field(FIELD, "old"),
        lambda: dataset.clone_sample_field("old", FIELD),
    ]
    for change in changes:
        change()
        _as_read_afresh(dataset, _read(dataset))


def test_a_write_that_fails_half_way_leaves_nothing_stale(embedded_dataset, reads, monkeypatch):
    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    first = _targets(dataset).first()
    dataset.set_values(
        "label", {first.id: fo.Classification(label=first.ground_truth.label)}, key_field="id"
    )
    monkeypatch.setattr(label_writes, "BULK_BATCH", 3)
    sent = label_writes._send

    def fail_after_one(collection, ops):
        if fail_after_one.calls:
            raise RuntimeError("connection lost")
        fail_after_one.calls += 1
        return sent(collection, ops)

    fail_after_one.calls = 0
    monkeypatch.setattr(label_writes, "_send", fail_after_one)
    with pytest.raises(RuntimeError):
        dinoprop.propagate_labels(dataset, "label", store_scores=True)  # every label rewritten
    monkeypatch.setattr(label_writes, "_send", sent)
    _as_read_afresh(dataset, _read(dataset))


def test_views_that_change_fields_or_order_are_read_afresh_every_time(embedded_dataset, reads):
    dataset = embedded_dataset
    dinoprop.propagate_labels(dataset, "label")
    time.sleep(stored_labels.CLOCK_MARGIN.total_seconds())  # its writes are older
    confident = dataset.filter_labels(FIELD, F("confidence") > 0.6, only_matches=False)
    for _ in range(2):
        stored = _read(confident)
        assert reads[-1] is None
        assert (stored.confidence[~np.isnan(stored.confidence)] > 0.6).all()
    ordered = dataset.sort_by("filepath", reverse=True)
    for _ in range(2):
        _as_read_afresh(ordered, _read(ordered))
    assert len(reads) == 5
    chosen = dataset.match(F("filepath") != "").exists("ground_truth")
    _as_read_afresh(chosen, _read(chosen))
    _as_read_afresh(chosen, _read(chosen))
    assert len(reads) == 6  # views that only filter samples are remembered
    leaving = chosen.first()
    leaving.ground_truth = None
    leaving.save()
    _as_read_afresh(chosen, _read(chosen))
    dinoprop.propagate_labels(chosen, "label")
    _as_read_afresh(chosen, _read(chosen))
