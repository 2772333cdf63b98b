"""The write lock (issue #16): where it lives, who it names, that a dead holder frees it, that
readers are refused only what another process is still writing, and that every writing command
takes it before it looks at its output. The holder is a real second process (``tests.concurrency``)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml
from typer.testing import CliRunner

from soupkit.cli import app
from soupkit.errors import SoupkitError
from soupkit.locking import check_not_being_written, lock_file, writer_of, writing
from soupkit.storage import atomic_output_dir
from tests.concurrency import hold

runner = CliRunner()


def test_lock_lives_beside_the_output_and_survives_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "soup"
    monkeypatch.chdir(tmp_path)
    assert lock_file("runs/soup/") == lock_file(out) == lock_file(tmp_path / "runs" / "." / "soup")
    assert lock_file(out) == tmp_path / "runs" / ".soup.lock"
    with writing([out]):
        with atomic_output_dir(out) as tmp:  # merge's temporary sibling, renamed over OUT
            (tmp / "a").write_text("x")
        with atomic_output_dir(out, force=True) as tmp:  # and --force's replacement
            (tmp / "b").write_text("y")
        assert lock_file(out).is_file()
        with writing([out]):  # this process holds it already: nested, not refused
            pass
        assert lock_file(out).is_file()
        assert writer_of(out / "b") is None  # our own output is not "someone else's partial result"
    assert not lock_file(out).exists()  # released and removed
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["soup"]


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with hold(out) as holder:
        started = time.monotonic()
        with pytest.raises(SoupkitError) as caught:
            with writing([out]):
                raise AssertionError("the body must not run")
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"output {out} is being written by another process (pid {holder.pid} on ")
    assert "started 20" in message and " UTC: " in message and "-c" in message  # start time, command
    assert not out.exists()


def test_kill_9_leaves_a_lock_file_that_locks_nothing(tmp_path):
    out = tmp_path / "out"
    with hold(out) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert lock_file(out).is_file()  # the dead holder's file stays ...
        assert writer_of(out) is None  # ... but nobody holds it
        with writing([out]):
            assert str(os.getpid()) in lock_file(out).read_text()


def test_reader_is_refused_only_while_another_process_writes(tmp_path):
    run = tmp_path / "align" / "seed-0"
    with hold(run) as holder:
        assert f"pid {holder.pid} " in writer_of(run / "final" / "model.safetensors")  # inside counts
        assert writer_of(tmp_path / "align" / "seed-1") is None
        run.mkdir()
        with pytest.raises(SoupkitError, match=rf"^eval: align run {run} is still being written \(pid {holder.pid} "):
            check_not_being_written([run], "eval: align run")
    check_not_being_written([run], "eval: align run")


def test_readers_refuse_partial_inputs(tmp_path, llama_pair):
    from soupkit.merge import run_merge
    from soupkit.pipeline import run_eval

    recipe = {"merge": {"method": "uniform", "models": [str(p) for p in llama_pair]}}
    with hold(llama_pair[1]), pytest.raises(SoupkitError, match=rf"merge: ingredient {llama_pair[1]} is still being written"):
        run_merge(recipe, out=tmp_path / "soup")
    assert not (tmp_path / "soup").exists()

    align = {"ref": "r", "reward": "m:f", "prompts": "p.txt", "output": str(tmp_path / "al"), "seeds": [0, 1]}
    evaluation = {"prompts": "p.txt", "output": str(tmp_path / "eval")}
    (tmp_path / "al" / "align" / "seed-1").mkdir(parents=True)  # align writes in place
    with hold(tmp_path / "al" / "align" / "seed-1"), pytest.raises(SoupkitError, match="seed-1 is still being written"):
        run_eval({"align": align, "eval": evaluation})


def _recipe(tmp_path, llama_pair) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "merge": {"method": "uniform", "models": [str(p) for p in llama_pair], "output": str(tmp_path / "soup")},
        "align": {"ref": str(tmp_path / "soup"), "reward": "m:f", "prompts": "p.txt", "output": str(tmp_path / "al")},
        "eval": {"prompts": "p.txt", "output": str(tmp_path / "eval")}}))
    return str(path)


@pytest.mark.parametrize("command, locked", [
    (["merge", "{recipe}", "--force"], "soup"),
    (["align", "--ref", "{a}", "--reward", "m:f", "--prompts", "p.txt", "--out", "{tmp}/run", "--resume"], "run"),
    (["run", "{recipe}", "--only", "merge"], "soup"),
    (["run", "{recipe}", "--only", "align"], "al/align/seed-0"),
    (["eval", "{recipe}", "--force"], "eval"),
    (["inspect", "{a}", "{b}", "--json", "{tmp}/report.json"], "report.json"),
    (["inspect", "{a}", "{b}", "--plots", "{tmp}/plots"], "plots"),
    (["demo", "--out", "{tmp}/demo", "--small"], "demo"),
])
def test_every_writing_command_refuses_a_held_output_in_one_line(tmp_path, llama_pair, command, locked):
    """The lock comes before each command's first look at its output (even --force, --resume)."""
    fill = {"recipe": _recipe(tmp_path, llama_pair), "a": str(llama_pair[0]), "b": str(llama_pair[1]),
            "tmp": str(tmp_path)}
    out = tmp_path / locked
    with hold(out) as holder:
        before = sorted(tmp_path.rglob("*"))
        result = runner.invoke(app, [arg.format(**fill) for arg in command])
        assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a directory
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert f"output {out} is being written by another process (pid {holder.pid} " in result.output
