"""The whole workflow end to end, the demo's code path, and package basics."""

import json
import os
import subprocess
import sys

HEAVY_MODULES = ["torch", "transformers", "faiss", "umap", "fiftyone", "sklearn"]


def test_import_dinoprop_is_fast_and_lazy():
    code = (
        "import json, sys, time\n"
        "start = time.perf_counter()\n"
        "import dinoprop\n"
        "elapsed = time.perf_counter() - start\n"
        "print(json.dumps({'seconds': elapsed, 'loaded': [m for m in %r "
        "if m in sys.modules]}))" % HEAVY_MODULES
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["seconds"] < 1.0


def test_public_api_names():
    import dinoprop as dp

    for name in (
        "compute_embeddings",
        "compute_similarity",
        "compute_visualization",
        "propagate_labels",
        "suggest_seeds",
    ):
        assert callable(getattr(dp, name)), name


def test_demo_workflow_end_to_end(tiny_dinov2_dir):
    import fiftyone as fo

    from dinoprop import demo

    name = "dinoprop-test-demo"
    dataset = demo.build_dataset(seeds_per_class=3, name=name)
    try:
        seeds_before = dataset.values("label", _allow_missing=True)
        assert dataset.count("label") == 30
        assert dataset.count("ground_truth") == 300

        steps, results, suggested = demo.run_workflow(dataset, tiny_dinov2_dir)

        assert [s[0].split(" ")[0] for s in steps] == [
            "compute_embeddings",
            "compute_similarity",
            "compute_visualization",
            "propagate_labels",
            "suggest_seeds",
        ]
        assert dataset.count("dinoprop_embedding") == 300
        assert "dinoprop_similarity" in dataset.list_brain_runs()
        assert "dinoprop_umap" in dataset.list_brain_runs()
        umap = dataset.load_brain_results("dinoprop_umap")
        assert umap.points.shape == (300, 2)

        # Every non-seed sample got a label with a confidence in [0, 1]
        predicted = dataset.exists("label", False).values("label_propagated")
        assert len(predicted) == 270
        assert all(isinstance(p, fo.Classification) for p in predicted)
        assert all(0.0 <= p.confidence <= 1.0 for p in predicted)
        classes = set(dataset.distinct("ground_truth.label"))
        assert {p.label for p in predicted} <= classes

        # Human labels are untouched
        assert dataset.values("label", _allow_missing=True) == seeds_before

        assert len(suggested) == 10
        assert dataset.match_tags("dinoprop:annotate_next").count() == 10

        scores = demo.score(dataset)
        assert scores["num_scored"] == 270
        assert 0.0 <= scores["accuracy"] <= 1.0
        assert set(scores["per_class"]) == classes
        report = demo.format_report(
            "tiny", steps, scores, results.summary(), suggested
        )
        assert "fiftyone app launch %s" % demo.DATASET_NAME in report
        assert "accuracy" in report
        assert "when to stop        " + results.summary()["stop_plan"]["advice"] in report
    finally:
        fo.delete_dataset(name)


def test_plugin_is_listed_by_fiftyone_cli():
    fiftyone_cli = os.path.join(os.path.dirname(sys.executable), "fiftyone")
    out = subprocess.run(
        [fiftyone_cli, "plugins", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "@dinoprop/dinoprop" in out.stdout

