"""dinoprop's similarity index files: where they go, who can read them, and
what a failed, killed or concurrent build leaves behind (issue 15)."""

import os
import stat
import uuid

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.brain as fob

import dinoprop  # noqa: F401  (registers the "dinoprop" backend)
from dinoprop.core import DinopropError
from dinoprop.similarity import INDEX_DIR_ENV, index_dir

NUM, DIM = 20, 8


@pytest.fixture
def dataset():
    """``NUM`` samples with random vectors in ``emb``."""
    x = np.random.default_rng(0).normal(size=(NUM, DIM)).astype(np.float32)
    ds = fo.Dataset()
    ds.add_samples(
        [fo.Sample(filepath="/tmp/files%03d.jpg" % i, emb=v) for i, v in enumerate(x)]
    )
    yield ds
    if fo.dataset_exists(ds.name):
        ds.delete()


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("index_id", ["/abs/victim", "../../../../x/escaped", "a/b", ".."])
def test_index_ids_that_name_other_paths_are_refused(dataset, tmp_path, index_id):
    if index_id.startswith("/"):
        index_id = str(tmp_path / "victim")
        victim = tmp_path / "victim.npz"
        victim.write_bytes(b"precious")
    with pytest.raises(DinopropError, match="Invalid index_id"):
        fob.compute_similarity(
            dataset, embeddings="emb", brain_key="sim", backend="dinoprop", index_id=index_id
        )
    assert dataset.list_brain_runs() == []
    if index_id.startswith("/"):
        assert victim.read_bytes() == b"precious"
    outside = os.path.join(os.path.dirname(index_dir()), "x")
    assert not os.path.exists(outside)


def test_deleting_a_crafted_run_deletes_no_file_outside_the_index_dir(dataset, tmp_path):
    fob.compute_similarity(dataset, embeddings="emb", brain_key="sim", backend="dinoprop")
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"precious")
    run_doc = dataset._doc.brain_methods["sim"]
    run_doc.config["index_id"] = str(tmp_path / "victim")  # as a crafted run would
    run_doc.save()
    with pytest.raises(DinopropError, match="Invalid index_id"):
        dataset.load_brain_results("sim", cache=False)
    dataset.delete_brain_run("sim")
    assert victim.read_bytes() == b"precious"
    assert dataset.list_brain_runs() == []


def test_index_files_are_private_to_the_user(dataset):
    index = fob.compute_similarity(dataset, embeddings="emb", brain_key="sim", backend="dinoprop")
    path = index.index_path
    assert _mode(path) == 0o600
    assert _mode(path + ".lock") & 0o077 == 0
    folder = os.path.dirname(path)
    while folder != os.path.dirname(index_dir()):
        assert _mode(folder) == 0o700, folder
        folder = os.path.dirname(folder)
    assert _mode(folder) == 0o700  # dinoprop's own top folder


def test_a_database_in_a_shared_folder_gets_its_own_private_index_dir(
    dataset, monkeypatch
):
    database_dir = "/tmp/dinoprop-test-db-%s" % uuid.uuid4().hex[:8]
    monkeypatch.delenv(INDEX_DIR_ENV, raising=False)
    monkeypatch.setattr(fo.config, "database_dir", database_dir)
    root = index_dir()
    try:
        assert root == "/tmp/dinoprop-%s/indexes" % os.path.basename(database_dir)
        index = fob.compute_similarity(dataset, embeddings="emb", brain_key="sim", backend="dinoprop")
        assert index.index_path.startswith(root + os.sep)
        assert _mode(os.path.dirname(root)) == 0o700
        assert _mode(index.index_path) == 0o600
        dataset.delete_brain_run("sim")
    finally:
        import shutil

        shutil.rmtree(os.path.dirname(root), ignore_errors=True)


def test_an_index_dir_owned_by_someone_else_is_refused(dataset, monkeypatch, tmp_path):
    top = tmp_path / "dinoprop-db"
    (tmp_path / "elsewhere").mkdir()
    top.symlink_to(tmp_path / "elsewhere")  # e.g. planted in a shared /tmp
    monkeypatch.delenv(INDEX_DIR_ENV, raising=False)
    monkeypatch.setattr(fo.config, "database_dir", str(tmp_path / "db"))
    with pytest.raises(DinopropError, match="belongs to another user"):
        fob.compute_similarity(dataset, embeddings="emb", brain_key="sim", backend="dinoprop")
