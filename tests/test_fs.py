"""masa_jax.fs on a local disk and on gs:// (the `fake_gcs` fixture: no directories, no append)."""
import os

import pytest

from masa_jax import fs


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASA_JAX_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("fake_gcs")
    return "gs://bucket/root"


def test_write_append_replace_and_remove(root):
    path = fs.join(root, "a", "log.jsonl")
    assert not fs.exists(path) and not fs.isfile(path)
    fs.makedirs(fs.parent(path))
    fs.write_text(path, "1\n")
    fs.append_text(path, "2\n")  # GCS has no append: the object is rewritten
    assert fs.read_text(path) == "1\n2\n" and fs.isfile(path) and fs.isdir(fs.join(root, "a"))
    fs.write_text(path, "3\n")  # replaced whole
    assert fs.read_text(path) == "3\n"
    assert not fs.exists(path + ".tmp")
    fs.replace(path, fs.join(root, "a", "old.jsonl"))
    assert not fs.exists(path) and fs.read_text(fs.join(root, "a", "old.jsonl")) == "3\n"
    fs.rmtree(fs.join(root, "a"))
    fs.rmtree(fs.join(root, "a"))  # missing is fine
    assert not fs.exists(fs.join(root, "a", "old.jsonl"))


def test_local_copy_of_a_remote_directory_is_made_once_and_follows_changes(root):
    model = fs.join(root, "model")
    for name, text in (("config.json", "{}"), ("sub/tokenizer.json", "tok")):
        fs.makedirs(fs.parent(fs.join(model, name)))
        fs.write_text(fs.join(model, name), text)
    local = fs.local_copy(model)
    assert os.path.isdir(local) and open(os.path.join(local, "sub", "tokenizer.json")).read() == "tok"
    if not fs.is_remote(root):
        assert local == model  # a local directory is used in place
        return
    assert fs.local_copy(model) == local  # cached
    fs.write_text(fs.join(model, "config.json"), '{"a": 1}')  # another size: a new copy
    fresh = fs.local_copy(model)
    assert fresh != local and open(os.path.join(fresh, "config.json")).read() == '{"a": 1}'
    assert fs.local_copy(fs.join(root, "missing")) == fs.join(root, "missing")  # the caller's check names it


def test_local_dir_for_uploads_what_was_written(root):
    out = fs.join(root, "eval")
    fs.makedirs(out)
    with fs.local_dir_for(out) as d:
        assert not fs.is_remote(d)
        with open(os.path.join(d, "eval.json"), "w") as f:
            f.write("{}")
    assert fs.read_text(fs.join(out, "eval.json")) == "{}"
    assert not os.path.exists("gs:")  # nothing took the gs:// name as a local path
