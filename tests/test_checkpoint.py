"""Checkpoint I/O against the safetensors library as oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soupkit.errors import SoupkitError
from soupkit.modeldir import open_checkpoint, read_safetensors_header
from soupkit.shards import PlannedTensor, ShardedWriter, parse_size
from soupkit.storage import atomic_output_dir


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
    }


def test_header_matches_safetensors(tmp_path):
    save_file(_tensors(), tmp_path / "m.safetensors")
    infos = read_safetensors_header(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert sorted(infos) == sorted(f.keys())
        for name in f.keys():
            assert list(infos[name].shape) == list(f.get_slice(name).get_shape())


def test_array_views_equal_safetensors_values(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file(_tensors(), tmp_path / "model.safetensors")
    ref = load_file(tmp_path / "model.safetensors")
    with open_checkpoint(str(tmp_path)) as ckpt:
        for name, tensor in ref.items():
            got = ckpt.array(name)
            want = tensor.reshape(-1)
            if tensor.dtype == torch.bfloat16:
                want = want.view(torch.int16)
            assert np.array_equal(got.view(want.numpy().dtype), want.numpy()), name


@pytest.mark.parametrize("cut", [4, 40, -3])
def test_truncated_file_is_named(tmp_path, cut):
    save_file(_tensors(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:cut])
    with pytest.raises(SoupkitError, match=r"m\.safetensors: (truncated|corrupt)"):
        read_safetensors_header(tmp_path / "m.safetensors")


def test_garbage_header_is_corrupt(tmp_path):
    (tmp_path / "m.safetensors").write_bytes((12).to_bytes(8, "little") + b"{not json!!}" + b"\0" * 16)
    with pytest.raises(SoupkitError, match="corrupt"):
        read_safetensors_header(tmp_path / "m.safetensors")


def test_sharded_writer_round_trip(tmp_path):
    tensors = _tensors()
    planned = [PlannedTensor(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                                 torch.int64: "I64"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, planned, max_shard_bytes=40)
    for name, t in tensors.items():
        flat = t.reshape(-1)
        flat = flat.view(torch.int16) if t.dtype == torch.bfloat16 else flat
        arr = flat.numpy()
        for start in range(0, max(arr.size, 1), 4):  # several writes per tensor
            writer.write(name, arr[start:start + 4])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(writer.names) > 1
    got = {}
    for file in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / file))
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name


def test_writer_refuses_early_close(tmp_path):
    writer = ShardedWriter(tmp_path, [PlannedTensor("x", "F32", (4,))], 1 << 20)
    writer.write("x", np.zeros(2, dtype=np.float32))
    with pytest.raises(RuntimeError):
        writer.close()


@pytest.mark.parametrize(("text", "value"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                             (123, 123), ("1.5KB", 1500)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_needs_force_and_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(SoupkitError, match="--force"), atomic_output_dir(out):
        pass
    assert (out / "keep").read_text() == "old"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(SoupkitError, match="not found"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    with pytest.raises(SoupkitError, match="config.json"):
        open_checkpoint(str(tmp_path / "m"))


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(SoupkitError, match="not available from the Hugging Face Hub"):
        open_checkpoint("no-such-org/no-such-model-xyz")


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(SoupkitError, match="model-00002-of-00002.safetensors is listed but missing"):
        open_checkpoint(str(tmp_path))


def test_write_config_records_dtype(tmp_path):
    from soupkit.shards import write_config

    write_config(tmp_path, {"torch_dtype": "float32", "model_type": "llama"}, "BF16")
    config = json.loads(Path(tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config


def test_atomic_output_has_normal_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_load_recipe_leaves_the_callers_dict_alone():
    from soupkit.recipe import load_recipe

    data = {"merge": {"models": ["a", "b"], "output": "o"}}
    load_recipe(data, ["merge.dtype=bfloat16"])
    assert data == {"merge": {"models": ["a", "b"], "output": "o"}}
