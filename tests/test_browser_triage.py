"""The human annotation loop in a real browser: the App in headless Chromium.

On real photos (4 clothing classes x 8 demo images, 2 seeds per class in
``label``, class-clustered stored embeddings) labels are propagated through
the SDK, which leaves every target in the review queue. Then, in the App:

1. the grid panel ``dinoprop loop`` shows the loop's numbers;
2. its "Triage in the modal" button opens the first review-queue sample in
   the modal; the modal panel ``dinoprop triage`` shows the alternatives,
   one click labels the sample (checked through the SDK) and the modal
   moves to ``next_in_queue``'s sample;
3. the App's native Annotate tab labels that sample in the seed field
   (``propagate_labels`` made it editable with ``enable_annotation``);
4. with "Re-propagate every N new labels" set to 2, moving on re-propagates:
   the panel says so, the run now has 2 more seeds, and after closing the
   modal the loop panel counts 10 human labels.

Screenshots: ``artifacts/browser/triage-*.png``. Skipped, with a warning,
only when /usr/bin/chromium (or Playwright) is missing (``make browser``).
"""

import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import browser_support as bs
from conftest import random_embeddings, seeded_dataset

CLOTHING = (
    Path(__file__).resolve().parents[1]
    / "plugin" / "dinoprop" / "demo_data" / "clothing"
)
CLASSES = ("hat", "pants", "shoes", "skirt")
PER_CLASS = 8
SEEDS_PER_CLASS = 2
RUN_KEY = "dinoprop_label_propagated"


@pytest.fixture
def clothing_dataset():
    """4 classes x 8 demo photos; 2 seeds per class in ``label``."""
    import fiftyone as fo

    items = []
    for name in CLASSES:
        paths = sorted((CLOTHING / name).glob("*.jpg"))[:PER_CLASS]
        assert len(paths) == PER_CLASS, "demo images missing for %s" % name
        items += [(path, name) for path in paths]
    dataset = seeded_dataset(items, SEEDS_PER_CLASS)
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def modal_sample_id(page):
    """The ID of the sample open in the modal (the URL's ``id``)."""
    return parse_qs(urlparse(page.url).query).get("id", [None])[0]


def wait_for_modal_sample(page, sample_id, timeout_ms=30_000):
    page.wait_for_url(
        lambda url: parse_qs(urlparse(url).query).get("id", [None])[0]
        == sample_id,
        timeout=timeout_ms,
    )


def seed_label(ds, sample_id, timeout_ms=20_000, expected=None):
    """The sample's ``label`` class as the database holds it (polled until
    it equals ``expected``, when given: the App server writes it)."""
    import time

    deadline = time.time() + timeout_ms / 1000
    while True:
        ds.reload()
        label = ds[sample_id]["label"]
        value = None if label is None else label.label
        if expected is None or value == expected or time.time() > deadline:
            return value
        time.sleep(0.5)


def close_modal(page):
    """Closes the sample modal: Escape, else a click on its backdrop."""
    modal = page.locator('[data-cy="modal"]')
    page.locator('[data-cy="panel-tab-fo-sample-modal-plugin"]').click()
    page.locator('[data-cy="modal-looker-container"]').click()
    page.keyboard.press("Escape")
    if _detached(modal, 5_000):
        return
    page.mouse.click(8, page.viewport_size["height"] - 8)  # the backdrop
    assert _detached(modal, 20_000), "the sample modal did not close"


def _detached(locator, timeout_ms):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for(state="detached", timeout=timeout_ms)
    except PlaywrightTimeout:
        return False
    return True


def run_summary(ds):
    """The propagation run's summary as the database holds it now."""
    ds.reload()  # the App server re-ran the propagation
    return ds.load_run_results(RUN_KEY, cache=False).summary()


def loop_row(page, name):
    """The count in the loop panel's table row ``name``."""
    row = page.locator(
        '[data-cy="panel-content-dinoprop_loop"] tr', has_text=name
    ).first
    return int(row.locator("td").nth(1).inner_text())


def test_triage_loop_in_the_app(clothing_dataset):
    bs.require_browser()
    import dinoprop
    from dinoprop import review
    from dinoprop.label_states import HUMAN, SEED_STATES, state_of

    ds = clothing_dataset
    random_embeddings(ds)
    dinoprop.propagate_labels(ds, "label", progress=False)
    num_seeds = len(CLASSES) * SEEDS_PER_CLASS
    assert run_summary(ds)["num_seeds"] == num_seeds
    queue = review.queue_view(ds, "review", "label")
    assert queue.count() == len(ds) - num_seeds  # every target needs review
    first = review.next_in_queue(ds, "review", "label")

    with bs.app_server() as url, bs.browser_page() as page, bs.on_failure(
        page, "triage-failure"
    ):
        # 1. the loop panel in the grid
        bs.open_dataset(page, url, ds.name)
        page.locator('[title="New panel"]').first.click()
        page.get_by_text("dinoprop loop", exact=True).last.click()
        page.get_by_text("Human-labeled (seeds)").wait_for(timeout=30_000)
        assert loop_row(page, "Human-labeled (seeds)") == num_seeds
        assert loop_row(page, "Propagated, in review") == queue.count()
        page.wait_for_timeout(500)  # the plots
        bs.screenshot(page, "triage-01-loop-panel")

        # 2. triage in the modal: the first sample of the review queue
        page.get_by_role("button", name="Triage in the modal").click()
        page.wait_for_selector('[data-cy="modal"]', timeout=30_000)
        wait_for_modal_sample(page, first)
        # modal panels are tabs next to "Sample" in the modal's tab bar
        page.locator('[data-cy="panel-tab-dinoprop_triage"]').click()
        triage = page.locator('[data-cy="panel-content-dinoprop_triage"]')
        triage.get_by_text("left in the queue").wait_for(timeout=30_000)
        # the photo beside the panel: split the modal's panel space
        page.locator('[data-cy="modal"] [title="Split horizontally"]').first.click()
        page.locator('[data-cy="modal-looker-container"]').wait_for(timeout=30_000)
        assert triage.is_visible()

        info = review.sample_triage(ds, first, "label")
        assert info["suggestion"] is not None and info["alternatives"]
        confirm = triage.get_by_role("button", name=re.compile(r"^Confirm "))
        assert confirm.inner_text().strip() == "Confirm %s (%.0f%%)" % (
            info["suggestion"], 100 * info["suggestion_confidence"]
        )
        names = []
        for name, prob in info["alternatives"]:
            label = "%s (%.0f%%)" % (name, 100 * prob)
            button = triage.get_by_role("button", name=label, exact=True)
            assert button.count() == 1, "no alternative button %r" % label
            names.append(label)

        # re-propagate after every 2 new human labels
        every = triage.locator('input[type="number"]')
        assert every.input_value() == str(review.loop.DEFAULT_EVERY)
        every.fill("2")
        every.press("Tab")
        page.wait_for_timeout(500)  # the panel's on_change round trip
        bs.screenshot(page, "triage-02-triage-panel")

        chosen = info["alternatives"][0][0]
        expected_next = review.next_in_queue(ds, "review", "label", current=first)
        triage.get_by_role("button", name=names[0], exact=True).click()
        triage.get_by_text("Labeled '%s'" % chosen).wait_for(timeout=30_000)
        wait_for_modal_sample(page, expected_next)
        assert seed_label(ds, first, expected=chosen) == chosen
        assert state_of(ds[first]["label"], ds[first]["label_propagated"]) == HUMAN
        second = modal_sample_id(page)
        assert second == expected_next != first
        # the panel now describes the next sample
        triage.get_by_text(
            "%d left in the queue" % review.queue_view(ds, "review", "label").count()
        ).wait_for(timeout=30_000)
        assert run_summary(ds)["num_seeds"] == num_seeds
        bs.screenshot(page, "triage-03-labeled-next")

        # 3. the App's own Annotate tab labels the next sample in `label`
        truth = ds[second]["ground_truth"].label
        page.locator('[data-cy="annotate"]').click()
        page.locator('[data-cy="create-classification"]').click()
        field = page.locator('[data-cy="annotate-field-select"]')
        field.wait_for(timeout=30_000)
        assert "label" in field.inner_text()
        radio = page.get_by_role("radio", name=truth, exact=True)
        radio.wait_for(timeout=30_000)
        for name in CLASSES:  # every class is offered
            assert page.get_by_role("radio", name=name, exact=True).count() == 1
        radio.click()
        assert seed_label(ds, second, expected=truth) == truth
        assert state_of(ds[second]["label"], ds[second]["label_propagated"]) in SEED_STATES
        bs.screenshot(page, "triage-04-annotate-tab")
        page.locator('[data-cy="annotate-edit-back"]').click()

        # 4. two new labels: moving on (Skip: this sample is labeled now)
        # re-propagates, as the panel checks on every change of sample
        assert review.loop_status(ds)["new_seeds"] == 2
        expected_next = review.next_in_queue(ds, "review", "label", current=second)
        triage.get_by_role("button", name="Skip", exact=True).click()
        wait_for_modal_sample(page, expected_next)
        triage.get_by_text("Re-propagated").wait_for(timeout=60_000)
        summary = run_summary(ds)
        assert summary["num_seeds"] == num_seeds + 2
        changes = triage.get_by_text(
            "with %d seeds (was %d)" % (num_seeds + 2, num_seeds)
        )
        assert bs.appears(changes), "the panel does not say what changed"
        bs.screenshot(page, "triage-05-repropagated")

        # the loop panel counts the new labels once the modal is closed
        close_modal(page)
        page.locator(
            '[data-cy="panel-content-dinoprop_loop"] tr', has_text="Human-labeled"
        ).filter(has_text=str(num_seeds + 2)).wait_for(timeout=30_000)
        assert loop_row(page, "Human-labeled (seeds)") == num_seeds + 2
        assert loop_row(page, "Propagated, above the threshold") + loop_row(
            page, "Propagated, in review"
        ) == len(ds) - num_seeds - 2
        # (this process's loop_status would still read the first run's
        # results: FiftyOne caches run results per process)
        panel = page.locator('[data-cy="panel-content-dinoprop_loop"]')
        assert bs.appears(panel.get_by_text("0 new seeds since the last run"))
        panel.get_by_text("Human-labeled (seeds)").scroll_into_view_if_needed()
        bs.screenshot(page, "triage-06-loop-panel-after")
        errors = bs.plugin_errors(page)
        assert not errors, errors
