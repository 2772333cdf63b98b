"""Terminal messages show user text as written: square brackets are not rich markup."""

from __future__ import annotations

from soupkit import display


def test_an_error_keeps_its_square_brackets(capsys):
    display.error("install soupkit[vllm] for rollout_engine: vllm; key [bold] stays")
    assert capsys.readouterr().err.strip() == "error: install soupkit[vllm] for rollout_engine: vllm; key [bold] stays"


def test_wrote_keeps_a_path_with_brackets(capsys):
    display.wrote("runs/[a]/soup", "2 files [x]")
    assert capsys.readouterr().out.strip() == "wrote runs/[a]/soup  (2 files [x])"
