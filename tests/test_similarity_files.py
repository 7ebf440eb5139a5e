"""dinoprop's similarity index files: where they go, who can read them, and
what a failed, killed or concurrent build leaves behind (issue 15)."""

import os
import stat
import uuid

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.brain as fob

from dinoprop.core import DinopropError  # importing dinoprop registers its backend
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


def _build(dataset, **kwargs):
    kwargs.setdefault("embeddings", "emb")
    return fob.compute_similarity(dataset, brain_key="sim", backend="dinoprop", **kwargs)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("index_id", ["/abs/victim", "../../../../x/escaped", "a/b", ".."])
def test_index_ids_that_name_other_paths_are_refused(dataset, tmp_path, index_id):
    if index_id.startswith("/"):
        index_id = str(tmp_path / "victim")
        victim = tmp_path / "victim.npz"
        victim.write_bytes(b"precious")
    with pytest.raises(DinopropError, match="Invalid index_id"):
        _build(dataset, index_id=index_id)
    assert dataset.list_brain_runs() == []
    if index_id.startswith("/"):
        assert victim.read_bytes() == b"precious"
    outside = os.path.join(os.path.dirname(index_dir()), "x")
    assert not os.path.exists(outside)


def test_deleting_a_crafted_run_deletes_no_file_outside_the_index_dir(dataset, tmp_path):
    _build(dataset)
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
    index = _build(dataset)
    path = index.index_path
    assert _mode(path) == 0o600
    assert _mode(path + ".lock") & 0o077 == 0
    folder = os.path.dirname(path)
    while folder != os.path.dirname(index_dir()):
        assert _mode(folder) == 0o700, folder
        folder = os.path.dirname(folder)
    assert _mode(folder) == 0o700  # dinoprop's own top folder


def test_index_files_of_older_versions_become_private_when_loaded(dataset):
    index = _build(dataset)
    folder = os.path.dirname(index.index_path)
    os.chmod(index.index_path, 0o644)
    os.chmod(folder, 0o755)
    dataset.load_brain_results("sim", cache=False)
    assert _mode(index.index_path) == 0o600 and _mode(folder) == 0o700


def test_a_database_in_a_shared_folder_gets_its_own_private_index_dir(
    dataset, monkeypatch
):
    database_dir = "/tmp/dinoprop-test-db-%s" % uuid.uuid4().hex[:8]
    monkeypatch.delenv(INDEX_DIR_ENV, raising=False)
    monkeypatch.setattr(fo.config, "database_dir", database_dir)
    root = index_dir()
    try:
        assert root == "/tmp/dinoprop-%s/indexes" % os.path.basename(database_dir)
        index = _build(dataset)
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
        _build(dataset)


def test_a_failed_build_leaves_no_run_behind(dataset):
    bad = np.random.default_rng(2).normal(size=(NUM, DIM))
    bad[3, 1] = np.nan
    with pytest.raises(DinopropError, match="NaN"):
        _build(dataset, embeddings=bad)
    assert dataset.list_brain_runs() == []
    bad[3, 1] = 0.0
    index = _build(dataset, embeddings=bad)
    assert index.total_index_size == NUM


# --- killed and concurrent builds, in real processes ------------------------

_CHILD = """
import os, signal, sys, time
import numpy as np
import fiftyone as fo
import fiftyone.brain as fob
import dinoprop as dp

name, scenario, kill_at, barrier = sys.argv[1:5]
dataset = fo.load_dataset(name)
real_replace = os.replace
reached = []

def savez(f, **arrays):  # dies half way through writing an index file
    f.write(b"half an index")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst):  # acts once the new index file is in place
    real_replace(src, dst)
    if not dst.endswith(".npz") or reached:
        return
    reached.append(dst)
    if kill_at == "written":
        os.kill(os.getpid(), signal.SIGKILL)
    if barrier != "-":  # wait for the other build to get here too
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(barrier, "go")) and time.time() < deadline:
            time.sleep(0.02)

if kill_at == "mid-write":
    np.savez = savez
os.replace = replace
if scenario == "first":
    fob.compute_similarity(dataset, embeddings="emb", brain_key="sim", backend="dinoprop")
elif scenario == "update":
    index = dataset.load_brain_results("sim")
    index.remove_from_index(sample_ids=[dataset.first().id])
else:
    dp.compute_similarity(dataset, embeddings="emb", brain_key="sim")
"""


def _start_child(dataset, scenario, kill_at="-", barrier="-"):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, dataset.name, scenario, kill_at, str(barrier)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _index_folder_files(dataset):
    folder = os.path.join(index_dir(), str(dataset._doc.id))
    return sorted(n for n in os.listdir(folder) if n != "runs.lock")


def _assert_one_clean_run(dataset):
    """One loadable run "sim", whose file is the only one left once pruned."""
    from dinoprop.similarity import prune_index_files

    dataset.reload()
    assert dataset.list_brain_runs() == ["sim"]
    index = dataset.load_brain_results("sim", cache=False)
    query = dataset.first().id
    assert index.sort_by_similarity(query, k=1).values("id") == [query]
    prune_index_files()
    name = os.path.basename(index.index_path)
    assert _index_folder_files(dataset) == [name, name + ".lock"]


@pytest.fixture
def persistent(dataset):
    """``dataset``, persistent so that child processes can load it."""
    dataset.persistent = True
    yield dataset
    dataset.persistent = False


@pytest.mark.parametrize("kill_at", ["mid-write", "written"])
def test_a_first_build_killed_leaves_no_run_and_no_files(persistent, kill_at):
    child = _start_child(persistent, "first", kill_at)
    assert child.wait(timeout=120) == -9, child.stderr.read()
    persistent.reload()
    assert persistent.list_brain_runs() == []
    _build(persistent)
    _assert_one_clean_run(persistent)


@pytest.mark.parametrize("kill_at", ["mid-write", "written"])
def test_a_replacement_killed_keeps_the_old_run_and_leaves_no_files(persistent, kill_at):
    import dinoprop as dp

    old = dp.compute_similarity(persistent, embeddings="emb", brain_key="sim")
    child = _start_child(persistent, "replace", kill_at)
    assert child.wait(timeout=120) == -9, child.stderr.read()
    _assert_one_clean_run(persistent)
    assert persistent.load_brain_results("sim", cache=False).index_path == old.index_path


def test_an_update_killed_while_writing_leaves_the_index_usable_and_no_files(persistent):
    from dinoprop.similarity import prune_index_files

    index = _build(persistent)
    child = _start_child(persistent, "update", "mid-write")
    assert child.wait(timeout=120) == -9, child.stderr.read()
    folder = os.path.dirname(index.index_path)
    assert any(".tmp-" in n for n in os.listdir(folder))  # what the kill left
    persistent.reload()
    loaded = persistent.load_brain_results("sim", cache=False)
    assert loaded.total_index_size == NUM - 1  # in step with the field
    prune_index_files()
    name = os.path.basename(index.index_path)
    assert _index_folder_files(persistent) == [name, name + ".lock"]


@pytest.mark.parametrize("scenario", ["first", "replace"])
def test_concurrent_builds_under_one_key(persistent, tmp_path, scenario):
    import time

    import dinoprop as dp

    if scenario == "replace":
        dp.compute_similarity(persistent, embeddings="emb", brain_key="sim")
    children = [_start_child(persistent, scenario, barrier=tmp_path) for _ in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and len(os.listdir(tmp_path)) + sum(
        c.poll() is not None for c in children
    ) < 2:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    codes = [c.wait(timeout=120) for c in children]
    errors = [c.stderr.read() for c in children]
    if scenario == "first":  # exactly one wins, the other is told why
        assert sorted(codes) == [0, 1], errors
        assert "while this index was built" in errors[codes.index(1)]
    else:  # both replace the run, one after the other
        assert codes == [0, 0], errors
    _assert_one_clean_run(persistent)


def test_a_run_left_unfinished_by_an_older_killed_build_is_replaced(dataset, caplog):
    from fiftyone.brain.similarity import Similarity

    from dinoprop.similarity import DinopropSimilarityConfig

    method = DinopropSimilarityConfig(embeddings_field="emb").build()
    Similarity.register_run(method, dataset, "sim", overwrite=False)  # no results
    assert dataset.load_brain_results("sim") is None
    _build(dataset)
    assert "left unfinished by a killed build" in caplog.text
    assert dataset.load_brain_results("sim", cache=False).total_index_size == NUM


def test_a_run_of_another_backend_is_replaced(dataset):
    import dinoprop as dp

    fob.compute_similarity(dataset, embeddings="emb", brain_key="sim", backend="sklearn")
    index = dp.compute_similarity(dataset, embeddings="emb", brain_key="sim")
    assert dataset.list_brain_runs() == ["sim"]
    assert dataset.get_brain_info("sim").config.method == "dinoprop"
    loaded = dataset.load_brain_results("sim", cache=False)
    assert loaded.index_path == index.index_path and loaded.total_index_size == NUM
