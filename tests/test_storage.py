"""Disk faults in a merge: too little space and unwritable outputs are refused before any weight is
read; an I/O error while writing is one line and leaves nothing (or the old output) behind.

Tests run as root here, and permission bits do not stop root: the read-only cases patch the probe
to fail as a read-only filesystem does (EROFS), and the real chmod case runs only for other users.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml

from soupkit import run_merge
from soupkit.errors import SoupkitError
from soupkit.shards import SUPPORT_FILES
from soupkit.storage import check_writable, human_bytes
from tests.conftest import load_state, must_not_run, read_only


def _recipe(pair, out: Path) -> dict:
    return {"merge": {"method": "uniform", "models": [str(p) for p in pair], "output": str(out)}}


def _soup_bytes(model: Path) -> int:
    """Oracle: a uniform soup of same-dtype models holds the first model's tensors byte for byte
    in size, plus the support files copied from it."""
    tensors = sum(t.numel() * t.element_size() for t in load_state(model).values())
    return tensors + sum((model / n).stat().st_size for n in SUPPORT_FILES if (model / n).is_file())


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (2_200_000_000, "2.2 GB"),
                                     (100_000_000, "100.0 MB"), (3 * 10**15, "3000.0 TB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_merge_into_a_too_small_filesystem_is_refused_with_both_sizes(tmp_path, llama_pair, monkeypatch):
    monkeypatch.setattr("soupkit.storage.free_bytes", lambda path: 1234)
    monkeypatch.setattr("soupkit.merge.engine.write_soup", must_not_run)
    out = tmp_path / "soup"
    with pytest.raises(SoupkitError) as caught:
        run_merge(_recipe(llama_pair, out))
    need = human_bytes(_soup_bytes(llama_pair[0]))
    assert f"the merge into {out} needs {need} but {tmp_path} has only 1.2 kB free" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_planned_size_is_what_a_merge_writes(tmp_path, llama_pair):
    """The free-space check asks for what the merge then writes: tensors and support files."""
    from soupkit.merge.preflight import preflight
    from soupkit.merge.run import load_merge_spec, planned_bytes

    out = run_merge(_recipe(llama_pair, tmp_path / "soup"))
    plan = preflight(load_merge_spec(_recipe(llama_pair, tmp_path / "other")), tmp_path / "other")
    written = sum(t.numel() * t.element_size() for t in load_state(out).values())
    written += sum((out / n).stat().st_size for n in SUPPORT_FILES if (out / n).is_file())
    assert planned_bytes(plan) == written == _soup_bytes(llama_pair[0])
    plan.close()


def test_disk_full_mid_merge_is_one_line_and_the_old_output_is_kept(tmp_path, llama_pair, monkeypatch):
    from soupkit.shards import ShardedWriter

    out = run_merge(_recipe(llama_pair, tmp_path / "soup"))
    before = load_state(out)
    real_write, calls = ShardedWriter.write, []

    def full_after_two(self, name, chunk):
        calls.append(name)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, name, chunk)

    monkeypatch.setattr(ShardedWriter, "write", full_after_two)
    with pytest.raises(SoupkitError, match=rf"cannot write {out}: No space left on device; {out} is unchanged"):
        run_merge(_recipe(llama_pair[::-1], out), force=True)
    assert not list(tmp_path.glob(".soup.partial-*"))
    assert load_state(out).keys() == before.keys()
    assert all((load_state(out)[k] == v).all() for k, v in before.items())


def test_read_only_output_is_refused_before_any_model_is_opened(tmp_path, llama_pair, monkeypatch):
    monkeypatch.setattr("soupkit.storage._probe", read_only)
    monkeypatch.setattr("soupkit.merge.run.preflight", must_not_run)
    with pytest.raises(SoupkitError, match=rf"output {tmp_path}/ro/soup: cannot write in {tmp_path}(/ro)? \(Read-only file system\)"):
        run_merge(_recipe(llama_pair, tmp_path / "ro" / "soup"))


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SoupkitError, match=r"output .*file/soup: .*file is a file, not a directory"):
        check_writable(tmp_path / "file" / "soup")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through permission bits")
def test_permission_denied_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(SoupkitError, match=r"cannot write in .*locked \(Permission denied\)"):
        check_writable(locked / "soup")


def test_soupkit_run_refuses_an_unwritable_later_output_before_the_first_stage(tmp_path, llama_pair, monkeypatch):
    """The eval output is on a read-only filesystem: refused before the merge reads any weight,
    not after it (and, in a real recipe, hours of SFT and PPO)."""
    from soupkit.pipeline import run_pipeline

    (tmp_path / "ro").mkdir()

    def read_only_ro(directory):
        if Path(directory).name == "ro":
            read_only(directory)

    monkeypatch.setattr("soupkit.storage._probe", read_only_ro)
    monkeypatch.setattr("soupkit.merge.run.preflight", must_not_run)
    soup = tmp_path / "soup"
    recipe = {**_recipe(llama_pair, soup),
              "align": {"ref": str(soup), "reward": "rewards.py:score", "prompts": "p.txt", "output": str(tmp_path / "a")},
              "eval": {"prompts": "p.txt", "output": str(tmp_path / "ro" / "eval")}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(SoupkitError, match=r"output .*ro/eval: cannot write in .*ro \(Read-only file system\)"):
        run_pipeline(tmp_path / "recipe.yaml", log=lambda line: None)
    assert not soup.exists()
    monkeypatch.undo()
    monkeypatch.setattr("soupkit.storage._probe", read_only_ro)  # stages not run are not checked
    assert run_pipeline(tmp_path / "recipe.yaml", only=["merge"], log=lambda line: None) == {"merge": ["ran"]}
