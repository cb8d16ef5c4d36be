"""Writing output files so that nothing is lost: checked first, written whole or not at all.

A file is written to a fresh temporary name in its own directory and renamed onto its path only
once complete (`os.replace` is atomic within one file system); on any exception, including
KeyboardInterrupt, the temporary is deleted and a previous file at the path is left as it was.
(A program that should also clean up on SIGTERM turns it into an exception: see `cli.py`.)
"""

from __future__ import annotations

import contextlib
import os
import uuid


def check_output_path(path, *, argument="path", sources=()):
    """`path` as a string, or ValueError/TypeError naming `argument`, before any work starts.

    The path must name a file (not a directory) in an existing, writable directory, and must
    not be one of `sources` (files the caller reads: writing there would destroy them).
    """
    try:
        path = os.fspath(path)
    except TypeError as error:
        raise TypeError(
            f"`{argument}` must be a file path. Received: {argument}={path!r}"
        ) from error
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"`{argument}` must name a file. Received: {argument}={path!r}")
    if os.path.isdir(path):
        raise ValueError(
            f"`{argument}` must be a file name, not a directory. Received: {argument}={path!r}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(
            f"The directory of `{argument}` does not exist. Received: {argument}={path!r}"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(
            f"The directory of `{argument}` is not writable. Received: {argument}={path!r}"
        )
    for source in sources:
        if same_file(path, source):
            raise ValueError(
                f"`{argument}` is the file being read ({source}): writing it would destroy its "
                f"own input. Received: {argument}={path!r}"
            )
    return path


def same_file(a, b):
    """Whether paths `a` and `b` name one file (through links too, when both exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a fresh path beside `path`; on success rename it onto `path`, on error delete it.

    `suffix` serves writers that insist on an extension (Keras wants ".keras").
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_bytes(path, data):
    """Write `data` to the new file `path` and flush it to disk."""
    # O_EXCL: the name is fresh; mode 0o666 lets the umask decide, as for any new file.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def human_size(size):
    """`size` bytes for people: "776 B", "14.0 MB"."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
