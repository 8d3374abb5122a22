"""promed_jax.io: atomic writes leave either the old file or the new one; JSON lines resume after a tear."""

import json
import os
import stat

import pytest

from promed_jax import io
from promed_jax.errors import CacheError, DataError, WorkdirError


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


@pytest.mark.parametrize(
    ("data", "line", "problem"),
    [
        (b'{"id": 1}\n{"id": \n', 2, "is not valid JSON"),
        (b'{"id": 1}\n{broken\n{"id": 3}\n', 2, "is not valid JSON"),
        (b'{"id": 1}\n[1, 2]\n', 2, "is a JSON list, not an object"),
        (b'"just a string"\n{"id": 2}\n', 1, "is a JSON str, not an object"),
        (b'{"id": 1}\n3\n', 2, "is a JSON int, not an object"),
        (b'{"id": 1}\nnull\n', 2, "is a JSON NoneType, not an object"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", 1, "is JSON nested too deep to read"),
        (b'{"id": 1}\n\n', 2, "is not valid JSON"),
    ],
    ids=["unparsable-last", "unparsable-middle", "list", "string", "number", "null", "nested-100000", "blank"],
)
def test_a_complete_line_that_is_not_an_object_is_corruption_and_kept(tmp_path, data, line, problem):
    path = tmp_path / "r.jsonl"
    path.write_bytes(data)
    with pytest.raises(CacheError, match=rf"r\.jsonl: line {line} {problem}") as info:
        io.resume_jsonl(path)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == data  # reported, not deleted


def test_writer_after_a_tear_does_not_glue_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2, "x"')
    with io.JsonlWriter(path) as w:
        w.write({"id": 2})
    assert io.resume_jsonl(path) == [{"id": 1}, {"id": 2}]


def test_writer_creates_its_file_with_the_first_record(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    with io.JsonlWriter(path):
        pass
    assert not path.parent.exists()
    with pytest.raises(RuntimeError), io.JsonlWriter(path):
        raise RuntimeError("the run failed before its first record")
    assert not path.exists()
    with io.JsonlWriter(path) as w:
        w.write({"id": 1})
    assert path.read_bytes() == b'{"id": 1}\n'


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"id": "medqa:\ud800"}, "id"),
        ({"id": "medqa:1", "turns": [{"role": "user", "content": "x\udfff"}]}, "turns[0].content"),
        ({"id": "medqa:1", "facts": {"\ud83d": 1}}, "facts.\\ud83d"),
    ],
    ids=["id", "nested-value", "key"],
)
def test_a_lone_surrogate_is_refused_naming_record_and_field_before_a_byte_is_written(tmp_path, record, field):
    path = tmp_path / "r.jsonl"
    with io.JsonlWriter(path) as w:
        w.write({"id": "ok"})
        with pytest.raises(DataError) as info:
            w.write(record)
    message = str(info.value)
    assert message.startswith(f"{path}: record {record['id']!a}: field '{field}' holds a lone surrogate")
    assert "\n" not in message
    assert path.read_bytes() == b'{"id": "ok"}\n'


def test_atomic_write_of_a_lone_surrogate_is_a_data_error_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="lone surrogate at offset 2"):
        io.atomic_write_text(tmp_path / "t.md", "ab\ud800")
    assert _files(tmp_path) == []


def test_output_lock_refuses_a_second_holder_naming_the_first_pid_and_is_released(tmp_path):
    out = tmp_path / "shapley"
    with io.output_lock(out):
        assert (tmp_path / "shapley.lock").read_text() == f"{os.getpid()}\n"
        # flock belongs to an open file description: a second open in this process is a second holder
        in_use = rf"shapley is in use by another run \(pid {os.getpid()}, lock "
        with pytest.raises(WorkdirError, match=in_use), io.output_lock(out):
            pass
    with io.output_lock(out):
        pass


def test_only_process_0_takes_the_output_lock(tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with io.output_lock(tmp_path / "out"), io.output_lock(tmp_path / "out"):
        pass
    assert _files(tmp_path) == []
