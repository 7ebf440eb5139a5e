"""The App operators, executed through FiftyOne's operator execution API.

Each operator runs in immediate mode on a small dataset (the generator the
App streams is exhausted, as the App would), then the dataset is checked.
Forms are resolved the way the App resolves them, on datasets with and
without the fields they need.
"""

import asyncio

import numpy as np
import pytest

import fiftyone as fo

import dinoprop
from dinoprop.core import DinopropError
from dinoprop.embeddings import get_embeddings_run

from conftest import random_embeddings

PLUGIN = "@dinoprop/dinoprop"
OPERATORS = [
    "compute_embeddings",
    "compute_similarity",
    "compute_visualization",
    "propagate_labels",
    "suggest_seeds",
    "open_review_queue",
    "accept_propagated_labels",
    "label_selected_samples",
    "send_to_label_studio",
    "load_reviewed_labels",
]


def uri(name):
    return "%s/%s" % (PLUGIN, name)


def request(dataset, params=None, view=None, selected=None):
    """The request parameters the App sends for ``dataset``/``view``."""
    return {
        "dataset_name": dataset.name,
        "view": (view if view is not None else dataset.view())._serialize(),
        "selected": selected or [],
        "params": dict(params or {}),
    }


def resolve_form(name, dataset, params=None, view=None, selected=None):
    """Resolves an operator's input form; returns ``{name: Property}``."""
    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    req = request(dataset, params, view, selected)
    req["target"] = "inputs"
    prop = asyncio.run(resolve_type(OperatorRegistry(), uri(name), req))
    assert not hasattr(prop, "error"), getattr(prop, "error", None)
    return dict(prop.type.properties)


def blocking_errors(form):
    """The messages of the properties that stop the form from submitting."""
    return [p.error_message for p in form.values() if p.invalid]


def execute(name, dataset, params=None, view=None, selected=None):
    """Executes an operator immediately, as the App does; returns requests.

    Returns:
        ``{operator name: [params, ...]}`` of the App actions it triggered
    """
    import fiftyone.operators as foo

    params = {"delegate": False, **(params or {})}
    result = foo.execute_operator(
        uri(name),
        dataset=dataset,
        view=view,
        selected=selected or [],
        params=params,
    )
    assert not result.delegated
    triggered = {}
    for req in result.executor._requests:
        triggered.setdefault(req.operator_uri, []).append(req.params)
    return triggered


def shown_summary(triggered):
    """The results of the last result panel the operator showed."""
    return triggered["show_output"][-1]["results"]


# ------------------------------------------------------------- discovery


def test_plugin_is_discovered_with_every_operator():
    import fiftyone.plugins as fop
    from fiftyone.operators.registry import OperatorRegistry

    plugins = {p.name: p for p in fop.list_plugins()}
    assert PLUGIN in plugins
    panels = ["dinoprop_loop", "dinoprop_triage"]  # FiftyOne lists them too
    assert sorted(plugins[PLUGIN].operators) == sorted(OPERATORS + panels)

    registry = OperatorRegistry()
    for name in OPERATORS:
        assert registry.operator_exists(uri(name)), name
    assert not [e for e in registry.list_errors() if "dinoprop" in str(e)]


def test_heavy_operators_offer_both_modes():
    from fiftyone.operators.registry import OperatorRegistry

    registry = OperatorRegistry()
    for name in OPERATORS:
        config = registry.get_operator(uri(name)).config
        assert config.allow_immediate_execution, name
        expected = name != "open_review_queue"
        assert config.allow_delegated_execution == expected, name


# ----------------------------------------------------------------- forms


def test_forms_without_embeddings_block_with_a_clear_message(image_dataset):
    for name in ("compute_similarity", "compute_visualization", "suggest_seeds"):
        form = resolve_form(name, image_dataset)
        assert blocking_errors(form) == [
            "No embeddings yet: run compute_embeddings first"
        ], name
        with pytest.raises(Exception, match="compute_embeddings first"):
            execute(name, image_dataset, {"embeddings": "dinoprop_embedding"})


def test_forms_offer_schema_fields_and_defaults(embedded_dataset):
    random_embeddings(embedded_dataset, field="other_vectors", dim=8)
    form = resolve_form("compute_similarity", embedded_dataset)
    assert form["embeddings"].type.values == ["dinoprop_embedding", "other_vectors"]
    assert form["embeddings"].default == "dinoprop_embedding"
    assert form["brain_key"].default == "dinoprop_similarity"
    assert form["delegate"].default is False  # 24 samples: immediate
    assert "view_target" not in form  # an index covers the whole dataset
    assert "every embedded sample" in form["scope_notice"].view.label
    assert blocking_errors(form) == []

    form = resolve_form("propagate_labels", embedded_dataset)
    assert form["label_field"].type.values == ["ground_truth", "label"]
    assert form["label_field"].default == "label"
    assert form["output_field"].default == "label_propagated"
    assert "6 seeds in 3 classes" in form["seeds_notice"].view.label
    assert blocking_errors(form) == []


def test_embeddings_form_models_and_field_validation(image_dataset):
    from dinoprop.models import MODEL_CHOICES

    form = resolve_form("compute_embeddings", image_dataset)
    choices = [c.value for c in form["model"].view.choices]
    assert choices == MODEL_CHOICES
    labels = {c.value: c.label for c in form["model"].view.choices}
    assert labels["dinov3-vits16"] == "dinov3-vits16 (21M params, gated: DINOv3 licence)"
    assert labels["dinov3-convnext-large"].startswith("dinov3-convnext-large (198M params")
    assert labels["dinov2-small"] == "dinov2-small (22M params)"
    assert form["model"].default == "dinov2-small"
    assert form["embeddings_field"].default == "dinoprop_embedding"
    assert blocking_errors(form) == []

    form = resolve_form(
        "compute_embeddings",
        image_dataset,
        {"model": "/no/such/model", "embeddings_field": "ground_truth"},
    )
    errors = blocking_errors(form)
    assert "No such model file or directory: /no/such/model" in errors
    assert any("ground_truth" in e and "not vectors" in e for e in errors)
    form = resolve_form("compute_embeddings", image_dataset, {"embeddings_field": "tags"})
    assert any("'tags'" in e and "not vectors" in e for e in blocking_errors(form))


def test_propagate_form_without_seeds_or_classes(embedded_dataset):
    ds = embedded_dataset
    form = resolve_form("propagate_labels", ds, {"label_field": "label"})
    assert blocking_errors(form) == []

    ids = [i for i, lab in zip(*ds.values(["id", "label.label"])) if lab == "red"]
    form = resolve_form(
        "propagate_labels", ds, {"label_field": "label"}, view=ds.select(ids)
    )
    assert any("single class" in e for e in blocking_errors(form))

    ds.delete_sample_field("label")
    ds.delete_sample_field("ground_truth")
    form = resolve_form("propagate_labels", ds)
    assert blocking_errors(form) == [
        "This dataset has no Classification or Detections field to propagate"
    ]


def test_propagate_form_refuses_an_output_field_it_would_clobber(embedded_dataset):
    ds = embedded_dataset
    for output, message in (
        ("ground_truth", "no propagation run wrote"),
        ("label.nested", "top-level"),
        ("label", "must differ"),
    ):
        form = resolve_form(
            "propagate_labels", ds, {"label_field": "label", "output_field": output}
        )
        assert any(message in e for e in blocking_errors(form)), output


def test_propagate_form_counts_seeds_in_the_target_view(embedded_dataset):
    ds = embedded_dataset
    unlabeled = ds.exists("label", False)
    form = resolve_form(
        "propagate_labels", ds, {"label_field": "label"}, view=unlabeled
    )
    assert form["view_target"].type.values  # dataset / current view offered
    assert "No seeds" in blocking_errors(form)[0]

    # the whole dataset as target has the seeds again
    form = resolve_form(
        "propagate_labels",
        ds,
        {"label_field": "label", "view_target": "DATASET"},
        view=unlabeled,
    )
    assert blocking_errors(form) == []


def test_review_forms_before_propagation(embedded_dataset):
    form = resolve_form("open_review_queue", embedded_dataset)
    assert "propagate_labels first" in blocking_errors(form)[0]
    form = resolve_form("accept_propagated_labels", embedded_dataset)
    assert blocking_errors(form) == [
        "No propagated labels: run propagate_labels first"
    ]
    form = resolve_form(
        "accept_propagated_labels", embedded_dataset, {"action": "undo"}
    )
    assert blocking_errors(form) == ["No accepted labels to undo here"]


def test_delegation_defaults_to_background_for_big_views(
    embedded_dataset, monkeypatch
):
    from fiftyone.operators.registry import OperatorRegistry

    registry = OperatorRegistry()
    operator_cls = type(registry.get_operator(uri("compute_similarity")))
    monkeypatch.setattr(operator_cls, "DELEGATE_THRESHOLD", 10)
    form = resolve_form("compute_similarity", embedded_dataset)
    assert form["delegate"].default is True
    assert "delegate_notice" in form
    # a selection of 3 samples to embed stays immediate
    operator_cls = type(registry.get_operator(uri("compute_embeddings")))
    monkeypatch.setattr(operator_cls, "DELEGATE_THRESHOLD", 10)
    ids = embedded_dataset.limit(3).values("id")
    form = resolve_form(
        "compute_embeddings",
        embedded_dataset,
        {"view_target": "SELECTED_SAMPLES", "embeddings_field": "new_vectors"},
        selected=ids,
    )
    assert form["delegate"].default is False
    # the random vectors already in dinoprop_embedding came from no model
    form = resolve_form("compute_embeddings", embedded_dataset, {"model": "efficientnet-lite0"})
    assert any("vectors of unknown origin" in e for e in blocking_errors(form))


# ------------------------------------------------------------- execution


def test_compute_embeddings_immediate(image_dataset, tiny_dinov2_dir):
    ds = image_dataset
    triggered = execute(
        "compute_embeddings",
        ds,
        {"model": tiny_dinov2_dir, "embeddings_field": "emb", "batch_size": 8},
    )

    vectors = ds.values("emb")
    assert all(v is not None and len(v) == 32 for v in vectors)
    assert np.isfinite(np.stack(vectors)).all()
    summary = shown_summary(triggered)
    assert summary["num_embedded"] == 24 and summary["num_failed"] == 0
    assert summary["dim"] == 32
    progress = [p["progress"] for p in triggered["set_progress"]]
    assert progress[0] == 0.0 and progress == sorted(progress)
    assert "reload_dataset" in triggered


def test_compute_embeddings_shows_failures_in_the_result(image_dataset, tiny_dinov2_dir, tmp_path):
    missing = str(tmp_path / "missing.jpg")
    image_dataset.add_sample(fo.Sample(filepath=missing))
    triggered = execute("compute_embeddings", image_dataset, {"model": tiny_dinov2_dir})

    summary = shown_summary(triggered)
    assert (summary["num_embedded"], summary["num_failed"]) == (24, 1)
    report = summary["failure_report"]
    assert "1 image could not be embedded (1 file not found)" in report and missing in report
    warnings = [n for n in triggered["notify"] if n["variant"] == "warning"]
    assert len(warnings) == 1 and missing in warnings[0]["message"]


def test_compute_embeddings_on_selected_samples(image_dataset, tiny_dinov2_dir):
    ds = image_dataset
    ids = ds.take(5, seed=1).values("id")
    triggered = execute(
        "compute_embeddings",
        ds,
        {"model": tiny_dinov2_dir, "view_target": "SELECTED_SAMPLES"},
        selected=ids,
    )
    assert shown_summary(triggered)["num_embedded"] == 5
    assert set(ds.exists("dinoprop_embedding").values("id")) == set(ids)


def test_compute_embeddings_with_flip_average_from_the_form(image_dataset, tiny_dinov2_dir):
    form = resolve_form("compute_embeddings", image_dataset)
    assert form["flip_average"].default is False
    triggered = execute(
        "compute_embeddings",
        image_dataset,
        {"model": tiny_dinov2_dir, "flip_average": True},
    )
    assert shown_summary(triggered)["flip_average"] is True
    assert get_embeddings_run(image_dataset, "dinoprop_embedding")["flip_average"] is True
    # the form knows, as the SDK does, that plain vectors cannot join them
    form = resolve_form("compute_embeddings", image_dataset, {"model": tiny_dinov2_dir})
    assert any("already averaged with the mirror image" in e for e in blocking_errors(form))
    form = resolve_form(
        "compute_embeddings", image_dataset, {"model": tiny_dinov2_dir, "flip_average": True}
    )
    assert blocking_errors(form) == []


def test_delegated_run_reports_progress_and_result(
    image_dataset, tiny_dinov2_dir
):
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService

    ds = image_dataset
    queued = foo.execute_operator(
        uri("compute_embeddings"),
        dataset=ds,
        params={"model": tiny_dinov2_dir, "delegate": True},
    )
    assert queued.delegated
    assert ds.get_field("dinoprop_embedding") is None  # only queued

    service = DelegatedOperationService()
    doc = service.get(queued.result["id"])
    service.execute_operation(doc)
    doc = service.get(queued.result["id"])
    try:
        assert doc.run_state == "completed", doc.result
        assert doc.result.result["num_embedded"] == 24
        assert doc.status.progress == 1.0
        assert doc.status.label == "Embedding images"
        outputs = doc.metadata["outputs_schema"]["type"]["properties"]
        assert "num_embedded" in outputs  # the result panel's schema
        assert ds.count("dinoprop_embedding") == 24
    finally:
        service.delete_operation(doc.id)


def test_failed_run_reports_the_sdk_error_and_writes_nothing(image_dataset):
    import fiftyone.operators as foo

    with pytest.raises(foo.executor.ExecutionError, match="not-a-model"):
        execute("compute_embeddings", image_dataset, {"model": "not-a-model"})
    assert image_dataset.get_field("dinoprop_embedding") is None


def test_compute_similarity_immediate(embedded_dataset):
    ds = embedded_dataset
    triggered = execute(
        "compute_similarity", ds, {"brain_key": "sim", "index_type": "flat"}
    )
    summary = shown_summary(triggered)
    assert summary["brain_key"] == "sim" and summary["index_size"] == 24
    assert summary["index_type"] == "flat"
    assert "sim" in ds.list_brain_runs()
    query = ds.first().id
    nearest = ds.sort_by_similarity(query, k=3, brain_key="sim").values("id")
    assert nearest[0] == query
    assert "reload_dataset" in triggered

    form = resolve_form("compute_similarity", ds, {"brain_key": "sim"})
    assert "will be replaced" in form["brain_key_notice"].view.label
    assert [c.value for c in form["brain_key"].view.choices] == ["sim"]
    form = resolve_form("compute_visualization", ds)
    assert form["brain_key"].view.choices == []  # no map yet


def test_compute_visualization_opens_the_embeddings_panel(embedded_dataset):
    ds = embedded_dataset
    triggered = execute(
        "compute_visualization", ds, {"brain_key": "viz", "method": "pca"}
    )
    results = ds.load_brain_results("viz")
    assert results.points.shape == (24, 2)
    summary = shown_summary(triggered)
    assert (summary["brain_key"], summary["method"]) == ("viz", "pca")
    assert (summary["num_points"], summary["num_dims"]) == (24, 2)
    (panel,) = triggered["open_panel"]
    assert panel["name"] == "Embeddings" and panel["isActive"]
    assert "reload_dataset" in triggered


def test_propagate_labels_sets_the_review_queue(embedded_dataset):
    from dinoprop.review import NEEDS_REVIEW_TAG

    ds = embedded_dataset
    seeds = ds.values("label")
    triggered = execute(
        "propagate_labels",
        ds,
        {"label_field": "label", "method": "knn", "confidence_threshold": 0.99},
    )

    assert ds.values("label") == seeds  # human labels untouched
    propagated = ds.exists("label_propagated")
    assert propagated.count() == 18
    truth, pred = propagated.values(["ground_truth.label", "label_propagated.label"])
    assert np.mean(np.array(truth) == np.array(pred)) > 0.8
    summary = shown_summary(triggered)
    assert summary["num_seeds"] == 6 and summary["num_propagated"] == 18
    assert summary["num_needs_review"] == ds.match_tags(NEEDS_REVIEW_TAG).count()
    assert summary["num_needs_review"] > 0
    (set_view,) = triggered["set_view"]
    stages = [stage["_cls"] for stage in set_view["view"]]
    assert "fiftyone.core.stages.MatchTags" in stages


def test_suggest_seeds_shows_the_suggestions(embedded_dataset):
    ds = embedded_dataset
    triggered = execute(
        "suggest_seeds", ds, {"count": 4, "label_field": "label"}
    )
    tagged = ds.match_tags("dinoprop:annotate_next")
    assert tagged.count() == 4
    assert tagged.exists("label").count() == 0  # labeled samples not suggested
    assert shown_summary(triggered)["num_suggested"] == 4
    (set_view,) = triggered["set_view"]
    assert set_view["view"][0]["_cls"] == "fiftyone.core.stages.Select"

    form = resolve_form("suggest_seeds", ds, {"count": 100})
    assert blocking_errors(form) == ["The target view has only 24 samples"]
    form = resolve_form("suggest_seeds", ds, {"count": None})
    assert blocking_errors(form) == ["Enter how many samples to suggest"]
    small = ds.limit(3)
    assert resolve_form("suggest_seeds", ds, view=small)["count"].default == 3


def test_brain_keys_of_another_run_type_are_refused(embedded_dataset):
    ds = embedded_dataset
    execute("compute_similarity", ds, {"brain_key": "sim"})
    form = resolve_form(
        "compute_visualization", ds, {"brain_key": "sim", "method": "pca"}
    )
    assert any("holds a similarity run" in e for e in blocking_errors(form))
    with pytest.raises(DinopropError, match="holds a similarity run"):
        dinoprop.compute_visualization(ds, brain_key="sim", method="pca")
    assert ds.get_brain_info("sim").config.type == "similarity"
    form = resolve_form("compute_similarity", ds, {"brain_key": "1abc"})
    assert any("valid Python identifiers" in e for e in blocking_errors(form))


def test_propagate_form_counts_the_seeds_the_run_will_use(embedded_dataset):
    from dinoprop.review import accept_propagated_labels

    ds = embedded_dataset
    ds.exists("label").limit(3).tag_samples("reviewed")
    form = resolve_form(
        "propagate_labels", ds, {"label_field": "label", "seed_tag": "reviewed"}
    )
    assert "3 seeds in" in form["seeds_notice"].view.label
    dinoprop.propagate_labels(ds, "label", confidence_threshold=1.0)
    accept_propagated_labels(ds, "label_propagated", "label", 0.0)
    form = resolve_form("propagate_labels", ds, {"label_field": "label"})
    assert "6 seeds in 3 classes; the other 18 samples" in form["seeds_notice"].view.label
    assert "dinoprop:needs_review" not in form["seed_tag"].type.values


def test_accept_without_a_threshold_uses_the_recommended_one(embedded_dataset):
    ds = embedded_dataset
    results = dinoprop.propagate_labels(ds, "label", target_precision=0.8)
    recommended = results.summary()["recommended_threshold"]
    triggered = execute(
        "accept_propagated_labels", ds,
        {"output_field": "label_propagated", "label_field": "label"},
    )
    summary = shown_summary(triggered)
    assert summary["min_confidence"] == pytest.approx(recommended, abs=1e-4)  # shown rounded
    assert summary["num_accepted"] == ds.match(
        fo.ViewField("label_propagated.confidence") >= recommended
    ).count()


def test_review_queue_accept_and_undo(embedded_dataset):
    ds = embedded_dataset
    execute(
        "propagate_labels",
        ds,
        {"label_field": "label", "method": "knn", "confidence_threshold": 0.99},
    )
    queue_size = ds.match_tags("dinoprop:needs_review").count()

    form = resolve_form("open_review_queue", ds)
    assert blocking_errors(form) == []
    triggered = execute("open_review_queue", ds)
    assert triggered["set_view"][0]["view"]
    assert len(triggered["set_view"]) == 1

    form = resolve_form("accept_propagated_labels", ds)
    assert form["output_field"].default == "label_propagated"
    assert form["label_field"].default == "label"
    assert "6 keep their human label" in form["preview_notice"].view.label

    before = ds.values("label")
    triggered = execute(
        "accept_propagated_labels",
        ds,
        {
            "output_field": "label_propagated",
            "label_field": "label",
            "min_confidence": 0.0,
        },
    )
    summary = shown_summary(triggered)
    assert summary["num_accepted"] == 18 and summary["num_human_labeled"] == 6
    assert ds.count("label") == 24
    assert ds.match_tags("dinoprop:accepted").count() == 18
    # everything flagged has a label now: the queue form says so and blocks
    form = resolve_form("open_review_queue", ds)
    assert blocking_errors(form) == [
        "Nothing to review: every sample the last propagation flagged has a label now"
    ]
    # a second accept tells earlier accepted labels from human ones
    again = shown_summary(execute(
        "accept_propagated_labels", ds,
        {"output_field": "label_propagated", "label_field": "label", "min_confidence": 0.0},
    ))
    assert (again["num_human_labeled"], again["num_previously_accepted"]) == (6, 18)
    assert again["num_accepted"] == 0

    form = resolve_form("accept_propagated_labels", ds, {"action": "undo"})
    assert blocking_errors(form) == []
    batches = form["batch"].type.values
    assert batches == ["all", summary["batch"]]

    triggered = execute(
        "accept_propagated_labels",
        ds,
        {"action": "undo", "label_field": "label", "batch": summary["batch"]},
    )
    assert shown_summary(triggered)["num_reverted"] == 18
    assert ds.values("label") == before
    assert ds.match_tags("dinoprop:accepted").count() == 0
    assert queue_size == ds.match_tags("dinoprop:needs_review").count()


def test_object_labels_from_the_app(image_dataset, tiny_dinov2_dir):
    ds = image_dataset
    labels = ds.values("ground_truth.label")
    ds.set_values(
        "boxes",
        [
            fo.Detections(
                detections=[
                    fo.Detection(
                        label=lab if i < 6 else None, bounding_box=[0, 0, 1, 1]
                    )
                ]
            )
            for i, lab in enumerate(labels[::4] * 4)
        ][: len(ds)],
    )
    form = resolve_form("propagate_labels", ds, {"label_field": "boxes"})
    assert form["label_field"].type.values == ["boxes", "ground_truth", "label"]
    assert form["embeddings"].default == "dinoprop_embedding"  # a box attribute
    assert "6 seeds in" in form["seeds_notice"].view.label
    # no patch embeddings yet: the form says how to get them
    assert any("No box in 'boxes' has patch embeddings" in e for e in blocking_errors(form))

    # the embeddings form offers the boxes, and embeds them
    form = resolve_form("compute_embeddings", ds, {"patches_field": "boxes"})
    assert form["patches_field"].type.values == ["boxes"]
    assert form["embeddings_field"].view.label == "Embeddings attribute"
    execute(
        "compute_embeddings", ds,
        {"model": tiny_dinov2_dir, "patches_field": "boxes", "num_workers": 0},
    )
    assert ds.count("boxes.detections.dinoprop_embedding") == len(ds)
    assert form["patch_mode"].type.values == ["crops", "tokens"]
    execute(
        "compute_embeddings", ds,
        {"model": tiny_dinov2_dir, "patches_field": "boxes", "patch_mode": "tokens",
         "embeddings_field": "tokens_embedding", "num_workers": 0},
    )
    assert ds.count("boxes.detections.tokens_embedding") == len(ds)
    assert get_embeddings_run(ds, "tokens_embedding", "boxes")["patch_mode"] == "tokens"
    form = resolve_form("propagate_labels", ds, {"label_field": "boxes"})
    assert blocking_errors(form) == []
    execute("propagate_labels", ds, {"label_field": "boxes"})
    assert ds.count("boxes_propagated.detections") == len(ds) - 6


def test_forms_block_empty_targets_and_maps_umap_cannot_draw(embedded_dataset):
    ds = embedded_dataset
    form = resolve_form("suggest_seeds", ds, view=ds.limit(0))
    assert blocking_errors(form) == ["The target view has no samples"]
    form = resolve_form("compute_visualization", ds, view=ds.limit(3))
    assert any("UMAP needs at least 4" in e for e in blocking_errors(form))
    form = resolve_form("compute_visualization", ds, {"method": "pca"}, view=ds.limit(3))
    assert blocking_errors(form) == []


def test_propagate_form_sets_the_target_precision(embedded_dataset):
    ds = embedded_dataset
    form = resolve_form("propagate_labels", ds, {"label_field": "label"})
    assert form["target_precision"].default == 0.95
    triggered = execute(
        "propagate_labels", ds, {"label_field": "label", "target_precision": 0.8}
    )
    assert ds.get_run_info("dinoprop_label_propagated").config.target_precision == 0.8
    assert shown_summary(triggered)["note"] is None  # 0.8 is reachable here


def test_propagate_form_sets_the_dataset_accuracy_target_and_says_when_to_stop(embedded_dataset):
    ds = embedded_dataset
    form = resolve_form("propagate_labels", ds, {"label_field": "label"})
    assert form["target_accuracy"].default == 0.95
    triggered = execute(
        "propagate_labels", ds, {"label_field": "label", "target_accuracy": 0.9}
    )
    summary = ds.load_run_results("dinoprop_label_propagated").summary()
    assert summary["stop_plan"]["target_accuracy"] == 0.9
    assert shown_summary(triggered)["stop_advice"] == summary["stop_plan"]["advice"]


def _ray_installed(monkeypatch, installed):
    """Makes the plugin's forms see Ray installed, or not."""
    import sys

    from fiftyone.operators.registry import OperatorRegistry

    operator = OperatorRegistry().get_operator(uri("compute_embeddings"))
    common = sys.modules[type(operator).__module__]._common  # as FiftyOne loaded the plugin
    monkeypatch.setattr(common, "ray_installed", lambda: installed)


def test_compute_embeddings_offers_a_ray_cluster_when_ray_is_installed(
    image_dataset, monkeypatch
):
    _ray_installed(monkeypatch, False)
    assert "engine" not in resolve_form("compute_embeddings", image_dataset)
    _ray_installed(monkeypatch, True)
    form = resolve_form("compute_embeddings", image_dataset)
    assert form["engine"].default == "local" and "device" in form and "delegate" in form
    form = resolve_form("compute_embeddings", image_dataset, {"engine": "ray"})
    assert {"ray_address", "num_workers", "num_gpus_per_worker", "ray_notice"} <= set(form)
    assert "device" not in form and "delegate" not in form  # always delegated
    assert not blocking_errors(form)


def _run_delegated_anyway(name, dataset, params):
    """Runs operator ``name``, which must delegate itself although the form
    asked for an immediate run, through FiftyOne's delegated service."""
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService

    queued = foo.execute_operator(uri(name), dataset=dataset, params=params)
    assert queued.delegated
    service = DelegatedOperationService()
    doc = service.get(queued.result["id"])
    try:
        service.execute_operation(doc)
        assert service.get(doc.id).run_state == "completed"
    finally:
        service.delete_operation(doc.id)


def test_a_ray_run_from_the_app_is_delegated_with_the_cluster_fields(
    image_dataset, tiny_dinov2_dir, monkeypatch
):
    passed = {}
    real = dinoprop.compute_embeddings

    def on_this_machine(view, **kwargs):  # the Ray engine itself: tests/test_ray.py
        passed.update(kwargs)
        local = {"engine": "local", "ray_address": None, "num_gpus_per_worker": None,
                 "num_workers": 0}
        return real(view, **{**kwargs, **local})

    monkeypatch.setattr(dinoprop, "compute_embeddings", on_this_machine)
    params = {"model": tiny_dinov2_dir, "engine": "ray", "ray_address": "head:6379",
              "num_workers": 2, "num_gpus_per_worker": 0.5, "delegate": False}
    _run_delegated_anyway("compute_embeddings", image_dataset, params)
    assert {k: passed[k] for k in ("engine", "ray_address", "num_workers", "num_gpus_per_worker")} \
        == {"engine": "ray", "ray_address": "head:6379", "num_workers": 2, "num_gpus_per_worker": 0.5}
    assert "device" not in passed and image_dataset.count("dinoprop_embedding") == 24


def test_propagate_offers_a_ray_cluster_for_the_graph_when_ray_is_installed(
    embedded_dataset, monkeypatch
):
    ds = embedded_dataset
    _ray_installed(monkeypatch, False)
    assert "engine" not in resolve_form("propagate_labels", ds, {"label_field": "label"})
    _ray_installed(monkeypatch, True)
    form = resolve_form("propagate_labels", ds, {"label_field": "label"})
    assert form["engine"].default == "local" and "delegate" in form
    assert "ray_address" not in form
    form = resolve_form("propagate_labels", ds, {"label_field": "label", "engine": "ray"})
    assert {"ray_address", "num_workers", "ray_notice"} <= set(form)
    assert "delegate" not in form  # always delegated
    assert not blocking_errors(form)


def test_similarity_offers_a_ray_cluster_for_its_graph_and_passes_its_fields(
    embedded_dataset, monkeypatch
):
    ds = embedded_dataset
    _ray_installed(monkeypatch, False)
    assert "engine" not in resolve_form("compute_similarity", ds)
    _ray_installed(monkeypatch, True)
    form = resolve_form("compute_similarity", ds)
    assert form["engine"].default == "local" and "ray_address" not in form
    form = resolve_form("compute_similarity", ds, {"engine": "ray"})
    assert {"ray_address", "num_workers", "ray_notice"} <= set(form)
    assert "delegate" not in form and not blocking_errors(form)  # always delegated

    passed = {}
    real = dinoprop.compute_similarity

    def on_this_machine(view, **kwargs):  # the Ray engine itself: tests/test_ray.py
        passed.update(kwargs)
        return real(view, **{**kwargs, "engine": "local", "ray_address": None, "num_workers": None})

    monkeypatch.setattr(dinoprop, "compute_similarity", on_this_machine)
    params = {"engine": "ray", "ray_address": "head:6379", "num_workers": 2, "delegate": False}
    _run_delegated_anyway("compute_similarity", ds, params)
    assert {k: passed[k] for k in ("engine", "ray_address", "num_workers")} \
        == {"engine": "ray", "ray_address": "head:6379", "num_workers": 2}
    assert ds.list_brain_runs() == ["dinoprop_similarity"]


def test_propagate_offers_no_ray_cluster_for_objects(image_dataset, monkeypatch):
    ds = image_dataset
    _ray_installed(monkeypatch, True)
    labels = ds.values("ground_truth.label")  # 8 red, then green, then blue
    ds.set_values("boxes", [
        fo.Detections(detections=[fo.Detection(
            label=label if i < 10 else None, bounding_box=[0, 0, 1, 1],
            dinoprop_embedding=np.eye(3)[i % 3],
        )])
        for i, label in enumerate(labels)
    ])
    form = resolve_form("propagate_labels", ds, {"label_field": "boxes", "engine": "ray"})
    assert not blocking_errors(form)
    assert "engine" not in form and "ray_address" not in form


def test_a_ray_propagation_from_the_app_is_delegated_with_the_cluster_fields(
    embedded_dataset, monkeypatch
):
    passed = {}
    real = dinoprop.propagate_labels

    def on_this_machine(view, label_field, **kwargs):  # the Ray engine itself: tests/test_ray.py
        passed.update(kwargs)
        local = {"engine": "local", "ray_address": None, "num_workers": None}
        return real(view, label_field, **{**kwargs, **local})

    monkeypatch.setattr(dinoprop, "propagate_labels", on_this_machine)
    params = {"label_field": "label", "engine": "ray", "ray_address": "head:6379",
              "num_workers": 3, "delegate": False}
    _run_delegated_anyway("propagate_labels", embedded_dataset, params)
    assert {k: passed[k] for k in ("engine", "ray_address", "num_workers")} \
        == {"engine": "ray", "ray_address": "head:6379", "num_workers": 3}
    ds = embedded_dataset
    assert ds.count("label_propagated") == len(ds) - ds.count("label")  # every non-seed
