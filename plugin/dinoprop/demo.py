"""The dinoprop demo: label 300 clothing photos from 3 seeds per class.

Run it with ``make demo`` or ``python -m dinoprop.demo``. It creates the
persistent dataset ``dinoprop-demo`` (replacing an old one) from the images
shipped in ``dinoprop/demo_data``, keeps the truth in ``ground_truth``, puts
only a few labels per class in ``label``, then runs the whole workflow
(embed → similarity index → UMAP → propagate → suggest seeds) and prints
what each step took and how good the propagated labels are.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

DATASET_NAME = "dinoprop-demo"
DEMO_IMAGES = Path(__file__).resolve().parent / "demo_data" / "clothing"
PREFERRED_MODEL = "dinov2-small"
FALLBACK_MODEL = "efficientnet-lite0"


def build_dataset(seeds_per_class: int = 3, seed: int = 0, name: str = DATASET_NAME):
    """Creates the demo dataset, replacing any dataset with the same name.

    Args:
        seeds_per_class: how many samples per class get a human ``label``
        seed: the random seed choosing which samples are seeds
        name: the dataset name

    Returns:
        a persistent :class:`fiftyone.core.dataset.Dataset`
    """
    import fiftyone as fo

    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    by_class = defaultdict(list)
    for path in sorted(DEMO_IMAGES.glob("*/*.jpg")):
        by_class[path.parent.name].append(path)
    rng = random.Random(seed)
    samples = []
    for label, paths in sorted(by_class.items()):
        seeds = set(rng.sample(range(len(paths)), seeds_per_class))
        for i, path in enumerate(paths):
            sample = fo.Sample(
                filepath=str(path), ground_truth=fo.Classification(label=label)
            )
            if i in seeds:
                sample["label"] = fo.Classification(label=label)
            samples.append(sample)
    dataset.add_samples(samples)
    return dataset


def choose_model(preferred: str = PREFERRED_MODEL) -> str:
    """Returns ``preferred`` if it can be loaded here, else the offline model."""
    from dinoprop.core import DinopropError
    from dinoprop.models import load_model

    try:
        load_model(preferred, device="cpu")
        return preferred
    except DinopropError as e:
        print(
            "\n%s cannot be loaded on this machine, so the demo uses the "
            "offline backbone %s instead.\nReason: %s\n"
            % (preferred, FALLBACK_MODEL, e)
        )
        return FALLBACK_MODEL


def _timed(steps: list, name: str, fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    steps.append((name, time.perf_counter() - start))
    return result


def run_workflow(dataset, model: str) -> tuple[list, object, list]:
    """Runs embed → similarity → UMAP → propagate → suggest on ``dataset``.

    Returns:
        a tuple ``(steps, propagation_results, suggested_ids)`` where
        ``steps`` lists ``(step name, seconds)``
    """
    import dinoprop as dp

    steps = []
    _timed(steps, "compute_embeddings (%s)" % model, dp.compute_embeddings,
           dataset, model=model)
    _timed(steps, "compute_similarity", dp.compute_similarity, dataset)
    _timed(steps, "compute_visualization (UMAP)", dp.compute_visualization,
           dataset)
    results = _timed(steps, "propagate_labels", dp.propagate_labels,
                     dataset, "label")
    suggested = _timed(steps, "suggest_seeds", dp.suggest_seeds, dataset, 10,
                       label_field="label")
    return steps, results, suggested


def score(dataset, output_field: str = "label_propagated") -> dict:
    """Scores propagated labels of the non-seed samples against the truth.

    Returns:
        a dict with ``accuracy``, ``mean_confidence``, ``num_scored`` and
        ``per_class`` (class -> (accuracy, count))
    """
    truth, seeds, predicted, confidence = dataset.values(
        [
            "ground_truth.label",
            "label.label",
            output_field + ".label",
            output_field + ".confidence",
        ]
    )
    hits = defaultdict(list)
    confidences = []
    for gt, seed, pred, conf in zip(truth, seeds, predicted, confidence):
        if seed is not None or pred is None:
            continue
        hits[gt].append(pred == gt)
        confidences.append(conf)
    everything = [h for class_hits in hits.values() for h in class_hits]
    return {
        "accuracy": sum(everything) / max(len(everything), 1),
        "mean_confidence": sum(confidences) / max(len(confidences), 1),
        "num_scored": len(everything),
        "per_class": {
            label: (sum(h) / len(h), len(h)) for label, h in sorted(hits.items())
        },
    }


def format_report(model: str, steps: list, scores: dict, summary: dict,
                  suggested: list) -> str:
    """Formats the demo's result tables and App instructions as text."""
    from tabulate import tabulate

    total = sum(seconds for _, seconds in steps)
    step_rows = [(name, "%.1f" % s) for name, s in steps]
    step_rows.append(("total", "%.1f" % total))
    class_rows = [
        (label, "%.1f%%" % (100 * acc), n)
        for label, (acc, n) in scores["per_class"].items()
    ]
    plugins_dir = Path(__file__).resolve().parents[3]
    lines = [
        "",
        "dinoprop demo: %s, dataset '%s'" % (model, DATASET_NAME),
        "",
        tabulate(step_rows, headers=["step", "seconds"], tablefmt="github"),
        "",
        "Propagated labels on the %d non-seed samples (truth held back):"
        % scores["num_scored"],
        "  accuracy            %.1f%%" % (100 * scores["accuracy"]),
        "  mean confidence     %.3f" % scores["mean_confidence"],
        "  method              %s" % summary.get("method"),
        "  estimated accuracy  %s (cross-validated on the seeds only)"
        % _percent(summary.get("estimated_accuracy")),
        "  needs review        %s samples (tag dinoprop:needs_review)"
        % summary.get("num_needs_review"),
        "  annotate next       %d samples (tag dinoprop:annotate_next)"
        % len(suggested),
        "  when to stop        %s" % (
            (summary.get("stop_plan") or {}).get("advice")
            or "too few seeds to plan the finish"
        ),
        "",
        tabulate(class_rows, headers=["class", "accuracy", "samples"],
                 tablefmt="github"),
        "",
        "Open the result in the FiftyOne App, with the plugin visible to it:",
        "  export FIFTYONE_PLUGINS_DIR=%s" % plugins_dir,
        "  .venv/bin/fiftyone app launch %s" % DATASET_NAME,
        "Then: Embeddings panel -> brain key 'dinoprop_umap', colour by "
        "'label_propagated.label';",
        "operator browser (press `) -> 'propagate_labels', "
        "'open_review_queue', 'accept_propagated_labels', 'suggest_seeds';",
        "triage: '+' beside the Samples tab -> 'dinoprop loop' -> 'Triage in "
        "the modal', then the modal's 'dinoprop triage' tab labels each sample "
        "in one click (or edit 'label' in the modal's Annotate tab).",
    ]
    return "\n".join(lines)


def _percent(value) -> str:
    return "n/a" if value is None else "%.1f%%" % (100 * value)


def main(argv: list[str] | None = None) -> None:
    """Runs the demo from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="model to embed with (default: %s, else %s)"
                        % (PREFERRED_MODEL, FALLBACK_MODEL))
    parser.add_argument("--seeds-per-class", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

    model = args.model or choose_model()
    dataset = build_dataset(seeds_per_class=args.seeds_per_class)
    print("Created dataset '%s' with %d samples, %d seeds"
          % (DATASET_NAME, len(dataset), dataset.count("label")))
    steps, results, suggested = run_workflow(dataset, model)
    print(format_report(model, steps, score(dataset), results.summary(),
                        suggested))


if __name__ == "__main__":
    main()
