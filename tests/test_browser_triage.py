"""Exploration draft."""

import os
from pathlib import Path

import pytest

import browser_support as bs
from conftest import random_embeddings

CLOTHING = Path(__file__).resolve().parents[1] / "plugin" / "dinoprop" / "demo_data" / "clothing"
CLASSES = ("hat", "pants", "shoes", "skirt")
PER_CLASS = 8
SEEDS_PER_CLASS = 2


@pytest.fixture
def clothing_dataset():
    import fiftyone as fo

    dataset = fo.Dataset()
    samples = []
    for name in CLASSES:
        for i, path in enumerate(sorted((CLOTHING / name).glob("*.jpg"))[:PER_CLASS]):
            sample = fo.Sample(filepath=str(path), ground_truth=fo.Classification(label=name))
            if i < SEEDS_PER_CLASS:
                sample["label"] = fo.Classification(label=name)
            samples.append(sample)
    dataset.add_samples(samples)
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def dump(page, name):
    (bs.ARTIFACTS / ("%s.html" % name)).write_text(page.content())


def test_triage_loop_in_the_app(clothing_dataset):
    bs.require_browser()
    import dinoprop
    from dinoprop import review

    ds = clothing_dataset
    random_embeddings(ds)
    dinoprop.propagate_labels(ds, "label", progress=False)
    print(review.loop_status(ds)["counts"])

    with bs.app_server() as url, bs.browser_page() as page, bs.on_failure(page, "triage-failure"):
        bs.open_dataset(page, url, ds.name)
        page.locator('[title="New panel"]').first.click()
        page.wait_for_timeout(1000)
        bs.screenshot(page, "x-picker")
        dump(page, "x-picker")
        page.get_by_text("dinoprop loop", exact=True).last.click()
        page.get_by_text("Human-labeled (seeds)").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        bs.screenshot(page, "triage-01-loop-panel")
        dump(page, "x-loop")
        page.get_by_role("button", name="Triage in the modal").click()
        page.wait_for_selector('[data-cy="modal"]', timeout=30_000)
        page.wait_for_timeout(3000)
        print("URL", page.url, review.next_in_queue(ds, "review", "label"))
        bs.screenshot(page, "x-modal")
        dump(page, "x-modal")
