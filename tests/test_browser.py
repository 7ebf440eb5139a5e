"""The plugin in a real browser: the FiftyOne App in headless Chromium.

The dataset gets embeddings (tiny random DINOv2) and a UMAP run through the
SDK; then, in the App, ``propagate_labels`` runs from the operator browser,
the propagated field must appear in the sidebar, and the Embeddings panel
must draw the UMAP run. Screenshots: ``artifacts/browser/``.

Skipped, with a warning, only when /usr/bin/chromium (or Playwright) is
missing; ``make test`` installs Chromium first (``make browser``).
"""

import browser_support as bs


def test_propagate_labels_from_the_operator_browser(
    image_dataset, tiny_dinov2_dir
):
    bs.require_browser()
    import dinoprop

    ds = image_dataset
    dinoprop.compute_embeddings(ds, model=tiny_dinov2_dir, progress=False)
    dinoprop.compute_visualization(ds, progress=False)  # "dinoprop_umap"
    seeds = ds.values("label")

    with bs.app_server() as url, bs.browser_page() as page, bs.on_failure(
        page, "failure"
    ):
        bs.open_dataset(page, url, ds.name)
        bs.screenshot(page, "01-dataset")

        bs.run_operator(page, "dinoprop: propagate labels from seeds")
        page.get_by_text("6 seeds in 3 classes").wait_for(timeout=30_000)
        bs.screenshot(page, "02-propagate-form")
        page.get_by_role("button", name="Execute").click()

        # the result panel, and the new field in the sidebar
        page.get_by_text("Samples labeled").wait_for(timeout=60_000)
        page.wait_for_selector(
            '[data-cy="sidebar-field-label_propagated"]', timeout=30_000
        )
        bs.screenshot(page, "03-propagated")
        ds.reload()  # the App server wrote the field
        assert ds.count("label_propagated") == 18
        assert ds.values("label") == seeds
        page.get_by_role("button", name="Done").click()
        if ds.match_tags("dinoprop:needs_review").count():
            # the App now shows the review queue
            queue = page.locator(
                '[data-cy="view-bar"] input[value="dinoprop:needs_review"]'
            )
            assert bs.appears(queue.first), "the review queue was not opened"

        # the Embeddings panel draws the UMAP run
        page.locator('[title="New panel"]').first.click()
        page.get_by_text("Embeddings", exact=True).last.click()
        run = page.get_by_text("dinoprop_umap", exact=True)
        assert bs.appears(run, timeout_ms=20_000), (
            "The Embeddings panel does not list the SDK's UMAP run "
            "'dinoprop_umap': the App lists only brain runs whose config "
            "class lives under fiftyone.brain.visualization. (see "
            "artifacts/browser/failure.png)"
        )
        run.click()
        page.get_by_text("24 points").wait_for(timeout=30_000)
        scene = page.locator(".emb-plot-scene canvas").first
        scene.wait_for(timeout=30_000)
        page.wait_for_timeout(1_000)  # let the first frame paint
        plot = bs.screenshot(page, "05-embeddings-plot", element=scene)
        bs.screenshot(page, "04-embeddings-panel")
        assert bs.colored_pixels(plot) > 24, "the UMAP points were not drawn"
        errors = bs.plugin_errors(page)
        assert not errors, errors
