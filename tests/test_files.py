"""Output files: checked before any work, written whole or not at all, never over a source."""

import os

import pytest

from kerasbn.export import files


def test_atomic_path_replaces_only_on_success(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")
    with files.atomic_path(path) as temporary:
        files.write_bytes(temporary, b"new")
        assert path.read_bytes() == b"previous"  # not yet
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_deletes_its_temporary_on_any_exception(exception, tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")
    with pytest.raises(exception), files.atomic_path(path, suffix=".keras") as temporary:
        assert temporary.endswith(".keras") and os.path.dirname(temporary) == str(tmp_path)
        files.write_bytes(temporary, b"half")
        raise exception()
    assert os.listdir(tmp_path) == ["out.bin"]
    assert path.read_bytes() == b"previous"


def test_write_bytes_never_reuses_an_existing_name(tmp_path):
    (tmp_path / "taken").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        files.write_bytes(tmp_path / "taken", b"y")


@pytest.mark.parametrize(
    "path, error, message",
    [
        (None, TypeError, "`path` must be a file path. Received: path=None"),
        ("", ValueError, "`path` must name a file. Received: path=''"),
        ("missing/out.onnx", ValueError, "directory of `path` does not exist"),
        (".", ValueError, "must be a file name, not a directory"),
    ],
)
def test_bad_output_paths(path, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        files.check_output_path(path)


def test_an_output_that_is_a_source_is_refused_through_links(tmp_path):
    source = tmp_path / "model.keras"
    source.write_bytes(b"model")
    link = tmp_path / "link.keras"
    link.symlink_to(source)
    for output in (source, link, tmp_path / "." / "model.keras"):
        with pytest.raises(ValueError, match="would destroy its own input"):
            files.check_output_path(output, argument="-o", sources=[str(source)])
    other = files.check_output_path(tmp_path / "other.keras", sources=[source])
    assert other.endswith("other.keras")


def test_human_size():
    assert [files.human_size(n) for n in (776, 3400, 14_000_000, 2.5e9)] == [
        "776 B", "3.4 kB", "14.0 MB", "2.5 GB"
    ]
