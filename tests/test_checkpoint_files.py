"""Checkpoint files are untrusted input: corrupted safetensors and GGUF files each fail as one CheckpointError
line naming the file (and the tensor at fault), before anything is placed on a device; a valid tiny GGUF
written here loads to the torch model's logits."""

import importlib.util
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import need, need_torch

from promed_jax.models import causal_mask, positions_from_mask
from promed_jax.models import checkpoints as ckpt
from promed_jax.models.checkpoints import CheckpointError, load_gguf, load_hf, read_gguf

torch = need_torch()
need(importlib.util.find_spec("gguf") is not None, "gguf (requirements.txt)")  # absent on the lent GPU machine
import gguf

from promed_jax.models.testing import random_hf_model, save_hf_model, torch_logits

ROPE_THETA = 800.0


@pytest.fixture(scope="module")
def llama():
    return random_hf_model("llama", seed=4, rope_theta=ROPE_THETA, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def folder(llama, tmp_path_factory):
    return save_hf_model(llama, tmp_path_factory.mktemp("hf"))


@pytest.fixture
def no_device_put(monkeypatch):
    """Fails the test if the loader places any array on a device."""

    def refuse(*args, **kwargs):
        raise AssertionError("an array was placed on a device before the checks failed")

    monkeypatch.setattr(jax, "device_put", refuse)


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlapping(blob: bytes) -> bytes:
    header, data = _split(blob)
    a, b = _first_two(header)
    start, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + end - start]
    return _join(header, data)


def _relabelled(name: str, dtype: str):
    def edit(blob: bytes) -> bytes:
        header, data = _split(blob)
        header[name]["dtype"] = dtype
        return _join(header, data)

    return edit


UP = "model.layers.1.mlp.up_proj.weight"

# (case, edit of model.safetensors' bytes, pattern the one-line message must match after the file's path)
SAFETENSORS_CASES = [
    ("truncated", lambda b: b[: len(b) - 5], r"not a valid safetensors file .*not fully covered"),
    ("zero bytes", lambda b: b"", r"not a valid safetensors file .*header too small"),
    ("4-byte file", lambda b: b[:4], r"not a valid safetensors file .*header too small"),
    ("header length past the end", lambda b: (len(b) + 1).to_bytes(8, "little") + b[8:], r"invalid header length"),
    ("2^63 header length", lambda b: (2**63).to_bytes(8, "little") + b[8:], r"header too large"),
    ("header not JSON", lambda b: (8).to_bytes(8, "little") + b"{oops!!}" + b[8:], r"invalid JSON in header"),
    ("overlapping offsets", _overlapping, r"invalid offset for tensor `\S+`"),
    ("float bytes labelled I32", _relabelled(UP, "I32"), rf"tensor {re.escape(UP)} has dtype I32, expected one of"),
    ("F32 bytes labelled F16", _relabelled(UP, "F16"), r"invalid shape, data type, or offset"),
]


@pytest.mark.parametrize("edit,pattern", [c[1:] for c in SAFETENSORS_CASES], ids=[c[0] for c in SAFETENSORS_CASES])
def test_corrupted_safetensors(folder, tmp_path, no_device_put, edit, pattern):
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(edit((folder / "model.safetensors").read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load_hf(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.match(rf"{re.escape(str(tmp_path / 'model.safetensors'))}: .*{pattern}", msg), msg


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/model.safetensors", "sub/../../x", ".."])
def test_index_shards_are_confined_to_the_folder(folder, tmp_path, shard):
    inner = tmp_path / "model"
    inner.mkdir()
    shutil.copy(folder / "config.json", inner / "config.json")
    shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")  # a valid file, outside
    names = list(ckpt.safetensors_index(folder / "model.safetensors"))
    (inner / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in names}}))
    with pytest.raises(CheckpointError) as err:
        load_hf(inner)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{inner / 'model.safetensors.index.json'}: ")
    assert f"tensor {names[0]} the shard {shard!r}, not a file name in" in msg


@pytest.mark.parametrize(
    "name,text,pattern",
    [
        ("model.safetensors.index.json", "{not json", r"not readable JSON"),
        ("model.safetensors.index.json", "[1, 2]", r"weight_map is missing"),
        ("config.json", "{not json", r"not readable JSON"),
        ("config.json", "[1, 2]", r"the config is a JSON list, not an object"),
    ],
)
def test_broken_json_files(folder, tmp_path, name, text, pattern):
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / name))}: {pattern}") as err:
        load_hf(tmp_path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(path, model) -> None:
    """`model` as a float32 llama GGUF the way llama.cpp's convert_hf_to_gguf writes it (q/k rows permuted)."""
    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    to_gguf = {
        hf.replace("{i}", str(i)): ours.replace("{i}", str(i))
        for ours, hf in ckpt.GGUF_NAMES.items()
        for i in range(c.num_hidden_layers)
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_rope_dimension_count(c.hidden_size // heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_context_length(c.max_position_embeddings)
    for name, param in model.state_dict().items():
        w = param.float().numpy()
        if ".q_proj." in name or ".k_proj." in name:
            n = heads if ".q_proj." in name else kv_heads
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        writer.add_tensor(to_gguf[name], np.ascontiguousarray(w))
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_file(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path, llama)
    return path


def test_tiny_gguf_matches_torch(llama, gguf_file):
    valid = np.ones((2, 10), bool)
    valid[1, :3] = False
    tokens = np.where(valid, np.random.default_rng(1).integers(0, 256, valid.shape), 0).astype(np.int32)
    v = jnp.asarray(valid)
    ours = np.asarray(load_gguf(gguf_file)(jnp.asarray(tokens), positions_from_mask(v), causal_mask(v))[0])
    reference = torch_logits(llama, tokens, valid, np.asarray(positions_from_mask(v)))
    assert np.abs(ours - reference)[valid].max() <= 1e-4


def _cut(edit):
    """A corruption of the file's bytes: `edit(bytes) -> bytes`."""

    def corrupt(path) -> None:
        path.write_bytes(edit(path.read_bytes()))

    return corrupt


def _tensor_info(edit):
    """A corruption of the tensor-info fields, in place: `edit(tensors in data order)` sets their parts."""

    def corrupt(path) -> None:
        reader = gguf.GGUFReader(str(path), "r+")
        edit(sorted(reader.tensors, key=lambda t: t.data_offset))
        reader.data.flush()

    return corrupt


def _point_second_at_first(tensors) -> None:
    tensors[1].field.parts[-1][0] = tensors[0].field.parts[-1][0]


def _label_first(qtype):
    def edit(tensors) -> None:
        tensors[0].field.parts[-2][0] = qtype

    return _tensor_info(edit)


# (case, corruption of the file, pattern the one-line message must match after the file's path)
GGUF_CASES = [
    ("zero bytes", _cut(lambda b: b""), r"not a valid GGUF file \(ValueError: cannot mmap an empty file\)"),
    ("4-byte file", _cut(lambda b: b[:4]), r"not a valid GGUF file \(IndexError"),
    ("bad magic", _cut(lambda b: b"XXXX" + b[4:]), r"not a valid GGUF file \(ValueError: GGUF magic invalid\)"),
    ("truncated header", _cut(lambda b: b[:200]), r"not a valid GGUF file"),
    ("truncated data", _cut(lambda b: b[: len(b) // 2]), r"not a valid GGUF file"),
    ("tensor count past the end", _cut(lambda b: b[:8] + (2**40).to_bytes(8, "little") + b[16:]), r"not a valid GGUF"),
    ("overlapping offsets", _tensor_info(_point_second_at_first), r"GGUF tensor \S+'s bytes run into \S+"),
    ("float bytes labelled I32", _label_first(gguf.GGMLQuantizationType.I32), r"GGUF tensor \S+ has integer type I32"),
    ("F32 bytes labelled F16", _label_first(gguf.GGMLQuantizationType.F16), r"GGUF tensor \S+ leaves \d+ bytes unread"),
]


@pytest.mark.parametrize("corrupt,pattern", [c[1:] for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_corrupted_gguf(gguf_file, tmp_path, no_device_put, corrupt, pattern):
    path = tmp_path / "broken.gguf"
    shutil.copy(gguf_file, path)
    corrupt(path)
    with pytest.raises(CheckpointError) as err:
        load_gguf(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.match(rf"{re.escape(str(path))}: {pattern}", msg), msg


def test_gguf_missing_hyper_parameter(gguf_file, tmp_path):
    reader = gguf.GGUFReader(str(gguf_file))
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data))
    _finish(writer)
    with pytest.raises(CheckpointError, match=r"x\.gguf: GGUF field llama\.attention\.head_count is missing$"):
        read_gguf(tmp_path / "x.gguf")
