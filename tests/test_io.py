"""promed_jax.io: atomic writes leave either the old file or the new one; JSON lines resume after a tear."""

import json
import os
import stat

import pytest

from promed_jax import io


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    io.atomic_write_json(path, {"a": 1})
    io.atomic_write_json(path, {"a": 2, "text": "中文"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "text": "中文"}
    assert _files(path.parent) == ["out.json"]


def test_atomic_write_gets_ordinary_permissions(tmp_path):
    path = tmp_path / "out.txt"
    io.atomic_write_text(path, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_failed_atomic_write_keeps_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.txt"
    io.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="boom"), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert _files(tmp_path) == ["out.txt"]


def test_failed_first_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "new.txt"):
        raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_jsonl_writer_appends_whole_lines_and_resumes(tmp_path):
    path = tmp_path / "r.jsonl"
    with io.JsonlWriter(path) as w:
        w.write({"id": 1})
        w.write({"id": 2, "text": "中文"})
    with io.JsonlWriter(path) as w:
        w.write({"id": 3})
    assert io.resume_jsonl(path) == [{"id": 1}, {"id": 2, "text": "中文"}, {"id": 3}]
    assert path.read_text(encoding="utf-8").count("\n") == 3


def test_resume_missing_and_empty_files(tmp_path):
    assert io.resume_jsonl(tmp_path / "none.jsonl") == []
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert io.resume_jsonl(tmp_path / "empty.jsonl") == []


@pytest.mark.parametrize(
    "tail",
    [b'{"id": 3, "te', b'{"id": 3}', b"\xff\xfe"],
    ids=["torn-json", "complete-json-without-newline", "torn-utf8"],
)
def test_resume_drops_and_truncates_a_torn_last_line(tmp_path, tail):
    path = tmp_path / "r.jsonl"
    good = b'{"id": 1}\n{"id": 2}\n'
    path.write_bytes(good + tail)
    assert io.resume_jsonl(path) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes() == good
    assert io.resume_jsonl(path) == [{"id": 1}, {"id": 2}]


def test_resume_drops_an_unparsable_last_line_with_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": \n')
    assert io.resume_jsonl(path) == [{"id": 1}]
    assert path.read_bytes() == b'{"id": 1}\n'


def test_corrupt_middle_line_raises_with_its_line_number(tmp_path):
    path = tmp_path / "r.jsonl"
    data = b'{"id": 1}\n{broken\n{"id": 3}\n'
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 is not valid JSON"):
        io.resume_jsonl(path)
    assert path.read_bytes() == data


def test_writer_after_a_tear_does_not_glue_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2, "x"')
    with io.JsonlWriter(path) as w:
        w.write({"id": 2})
    assert io.resume_jsonl(path) == [{"id": 1}, {"id": 2}]
