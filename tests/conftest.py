"""Test isolation and shared fixtures.

Every test session gets its own MongoDB (a mongod on a private directory,
started by benchmarks/private_db.py, whose URI FiftyOne is given) and its
own plugins directory, set before FiftyOne is imported; datasets created by
tests are deleted at the end of the session.
"""

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="dinoprop-tests-"))
_PLUGINS_DIR = _SESSION_DIR / "plugins"
_PLUGINS_DIR.mkdir()
(_PLUGINS_DIR / "dinoprop").symlink_to(REPO_ROOT, target_is_directory=True)

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
try:
    from private_db import start_private_mongod, stop_database
finally:
    sys.path.pop(0)
start_private_mongod(
    str(_SESSION_DIR / "db"), "dinoprop-tests-" + uuid.uuid4().hex[:8]
)
os.environ["FIFTYONE_PLUGINS_DIR"] = str(_PLUGINS_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Deletes this session's datasets, stops its private mongod, and removes
    its database and plugins directories (before pytest's summary)."""
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is not None and database._client is not None:
        import fiftyone as fo

        fo.delete_datasets("*")
    stop_database()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir():
    """A temporary directory shared by the whole test session."""
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_dinov2_dir(session_dir):
    """A tiny randomly initialised DINOv2 saved the way Hugging Face does."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    model_dir = session_dir / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(model_dir)
    return str(model_dir)


#: Classes of the generated image dataset and their base colours.
COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def _write_images(directory, per_class, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for label, color in COLORS.items():
        for i in range(per_class):
            noise = rng.normal(0, 25, size=(64, 80, 3))
            pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
            path = directory / ("%s_%02d.jpg" % (label, i))
            Image.fromarray(pixels).save(path, quality=90)
            items.append((str(path), label))
    return items


@pytest.fixture(scope="session")
def image_items(session_dir):
    """``(filepath, label)`` pairs of small generated JPEGs, 3 colour classes."""
    return _write_images(session_dir / "images", per_class=8)


def seeded_dataset(items, seeds_per_class=2):
    """A fresh non-persistent dataset of ``(filepath, label)`` items.

    ``ground_truth`` holds every label; ``label`` holds the first
    ``seeds_per_class`` of each class.
    """
    import fiftyone as fo

    dataset = fo.Dataset()
    samples = []
    seen = {}
    for path, label in items:
        sample = fo.Sample(
            filepath=str(path), ground_truth=fo.Classification(label=label)
        )
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= seeds_per_class:
            sample["label"] = fo.Classification(label=label)
        samples.append(sample)
    dataset.add_samples(samples)
    return dataset


@pytest.fixture
def image_dataset(image_items):
    """A fresh non-persistent dataset of the generated images.

    ``ground_truth`` holds every label; ``label`` holds 2 seeds per class.
    Deleted after the test.
    """
    import fiftyone as fo

    dataset = seeded_dataset(image_items)
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def random_embeddings(dataset, field="dinoprop_embedding", dim=16, seed=0):
    """Stores class-clustered random unit vectors in ``field``; returns them."""
    rng = np.random.default_rng(seed)
    labels = dataset.values("ground_truth.label")
    centers = {c: rng.normal(size=dim) * 3 for c in sorted(set(labels))}
    vectors = np.stack([centers[c] + rng.normal(size=dim) for c in labels])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dataset.set_values(field, list(vectors.astype(np.float32)))
    return vectors


@pytest.fixture
def embedded_dataset(image_dataset):
    """``image_dataset`` with clustered vectors in ``dinoprop_embedding``."""
    random_embeddings(image_dataset)
    return image_dataset
