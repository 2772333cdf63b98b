"""Two real ``soupkit merge`` processes into one output (issue #16): the first is stopped inside
the write (its lock held, the output not yet renamed into place) while the second starts, so the
order is fixed instead of raced. Before the lock, both printed ``wrote`` and the second soup won."""

from __future__ import annotations

import shutil

import yaml

from soupkit.locking import lock_file
from soupkit.merge import run_merge
from tests.concurrency import Paused, soupkit


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_second_merge_fails_and_the_first_soup_is_bit_identical_to_a_lone_run(tmp_path, llama_pair):
    uniform, weighted = tmp_path / "uniform.yaml", tmp_path / "weighted.yaml"
    models = [str(p) for p in llama_pair]
    uniform.write_text(yaml.safe_dump({"merge": {"method": "uniform", "models": models}}))
    weighted.write_text(yaml.safe_dump({"merge": {"method": "weighted", "models": [
        {"model": models[0], "weight": 0.9}, {"model": models[1], "weight": 0.1}]}}))
    out = tmp_path / "soup"
    alone = _files(run_merge(str(uniform), out=out))  # the oracle: the same merge, same path, by itself
    shutil.rmtree(out)

    first = Paused(tmp_path / "sync", "soupkit.merge.engine:write_soup", 1, "merge", str(uniform), "--out", str(out))
    first.wait_ready()
    second = soupkit("merge", str(weighted), "--out", str(out))
    assert second.returncode == 2, second.stderr
    [line] = second.stderr.strip().splitlines()  # one line: the output, the holder's pid, command
    assert line.startswith(f"error: output {out} is being written by another process (pid {first.proc.pid} on ")
    assert f"merge {uniform} --out {out}" in line
    assert "wrote" not in second.stdout and not out.exists()

    code, err = first.go()
    assert code == 0, err
    assert _files(out) == alone
    assert not lock_file(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial or lock left
