"""Files that survive interruption: atomic writes and append-only JSON lines that resume."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any, Self


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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


class JsonlWriter:
    """Appends one whole JSON object per line and flushes it, so a kill loses at most a torn last line."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _has_torn_tail(self.path):
            resume_jsonl(self.path)  # appending after a torn line would glue the next record onto it
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open across writes; closed by close())

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _has_torn_tail(path: pathlib.Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def resume_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads the records of an append-only JSON-lines file, dropping (and truncating away) a torn last line.

    A line is torn when it lacks its newline or does not parse; only the last line may be torn, anything
    else is a corrupt file and raises with its line number.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    # Every piece but the last ended with a newline; the last (b"" after a final newline) was written half-way.
    *complete, _ = lines = data.split(b"\n")
    for lineno, raw in enumerate(complete, start=1):
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except ValueError as e:
            if lineno == len(complete) and not lines[-1]:
                break
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({e}); the file is corrupt") from None
        good_end += len(raw) + 1
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records
