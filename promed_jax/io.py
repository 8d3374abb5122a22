"""Files that survive interruption: atomic writes and append-only JSON lines that resume.

A stage's JSON-lines output is created with its first record (a run that fails earlier leaves no file), each
record is one whole line appended and flushed, and on resume only an unterminated last line counts as torn:
a kill can cut a line short, never add its newline. Any other line that is not a JSON object is corruption
and a `CacheError` naming the file and the line. A record that UTF-8 cannot hold (a lone surrogate, which
JSON escapes such as `"\\ud800"` can put into a string) is refused with a `DataError` naming it, before a byte
is written: writing it escaped would keep the file valid but carry the broken text into every later stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any, Self

from promed_jax.errors import CacheError, DataError, WorkdirError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = pathlib.Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}: the text to write holds a lone surrogate at offset {e.start}; fix its input") from None
    atomic_write_bytes(path, data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on `<output>.lock` for the block, so two runs never write one output.

    A second run fails at once with a WorkdirError naming the holder's pid (written into the lock file). The
    lock goes with the holder's file descriptor, so a killed run leaves no stale lock; the file itself stays,
    since deleting it would let a run that opened it just before lock a file no one else sees. Under a
    multi-process JAX run only process 0 takes it."""
    import jax

    if jax.process_index() != 0:
        yield
        return
    lock = pathlib.Path(f"{output}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise WorkdirError(
                f"{output} is in use by another run (pid {holder}, lock {lock}); wait for it or use another workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class JsonlWriter:
    """Appends one whole JSON object per line and flushes it, so a kill loses at most a torn last line.

    The file is opened (and created) by the first `write`, so a run that fails before its first record leaves
    no empty file behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._f = None

    def write(self, record: dict) -> None:
        line = encode_line(record, self.path)
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if _has_torn_tail(self.path):
                resume_jsonl(self.path)  # appending after a torn line would glue the next record onto it
            self._f = open(self.path, "ab")  # noqa: SIM115 (held open across writes; closed by close())
        self._f.write(line)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_line(record: dict, path: str | os.PathLike) -> bytes:
    """`record` as one UTF-8 JSON line; a string UTF-8 cannot hold is a DataError naming the record and field."""
    text = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{path}: record '{printable(str(record.get('id', '?')))}': field '{unencodable_field(record)}' holds a "
            "lone surrogate, which UTF-8 cannot store; fix the input it came from"
        ) from None


def printable(text: str) -> str:
    """`text` with lone surrogates written as `\\udxxx` escapes, so that a message about it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unencodable_field(obj: Any, where: str = "") -> str | None:
    """The path (`turns[0].content`, printable) of the first key or string value in `obj` that UTF-8 cannot
    encode (it holds a lone surrogate); None when there is none."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for key, value in items:
        here = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if not _encodable(here) or (isinstance(value, str) and not _encodable(value)):
            return printable(here)
        found = unencodable_field(value, here)
        if found:
            return found
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_torn_tail(path: pathlib.Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def parse_line(raw: bytes, where: str) -> dict:
    """One JSON-lines record; anything but a JSON object (bad UTF-8 or JSON, a list, nesting past Python's
    recursion limit) is a CacheError naming `where` (file and line)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise CacheError(f"{where} is not valid JSON ({e}); the file is corrupt") from None
    except RecursionError:
        raise CacheError(f"{where} is JSON nested too deep to read; the file is corrupt") from None
    if not isinstance(record, dict):
        raise CacheError(f"{where} is a JSON {type(record).__name__}, not an object; the file is corrupt")
    return record


def resume_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads the records of an append-only JSON-lines file, dropping (and truncating away) a torn last line.

    Only an unterminated last line is torn (a kill stopped its write); every newline-terminated line must be
    a JSON object, or this raises a CacheError with its line number and leaves the file as it is.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    *complete, torn = data.split(b"\n")
    records = [parse_line(raw, f"{path}: line {lineno}") for lineno, raw in enumerate(complete, start=1)]
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))
    return records
