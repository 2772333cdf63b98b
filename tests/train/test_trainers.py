"""SFT and reward-model stages over TRL: they learn, they are seeded, they write HF outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.recipe import RewardModelSpec, SFTSpec
from soupkit.train import train_reward_model, train_sft
from tests.conftest import load_state, make_model

SFT_ROWS = [{"prompt": "the cat", "completion": " sat on the mat"}, {"prompt": "a dog", "completion": " ran in the sun"}] * 16
PREFS = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " bad bad bad"},
         {"prompt": "a dog", "chosen": " ran in the sun", "rejected": " sad sad sad"}] * 16


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _completion_loss(model_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["the cat sat on the mat"], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("train") / "base", seed=7)


def sft(tmp_path: Path, base: Path, name: str, seed: int, **kw) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    spec = SFTSpec(name=name, base=str(base), data=str(data), output=str(tmp_path / name), seed=seed,
                   **{"learning_rate": 5e-3, "batch_size": 8, "epochs": 4, "max_length": 32, **kw})
    return train_sft(spec)


def test_sft_learns_and_writes_a_loadable_model_with_provenance(tmp_path, base):
    out = sft(tmp_path, base, "a", seed=1)
    assert _completion_loss(out) < _completion_loss(base) - 0.5
    assert {"config.json", "model.safetensors", "tokenizer.json", "soupkit_recipe.yaml", "README.md"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "training_args.bin").exists()  # no pickles in outputs


def test_sft_seed_decides_the_result(tmp_path, base):
    a = load_state(sft(tmp_path / "1", base, "a", seed=1))
    again = load_state(sft(tmp_path / "2", base, "a", seed=1))
    b = load_state(sft(tmp_path / "3", base, "b", seed=2))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], again[name])  # same seed, same data order: the same model
    assert not torch.equal(a[name], b[name])  # another seed shuffles differently


def test_reward_model_prefers_the_chosen_answers(tmp_path, base):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    out = train_reward_model(RewardModelSpec(base=str(base), data=str(data), output=str(tmp_path / "rm"),
                                             learning_rate=5e-3, batch_size=8, epochs=2, max_length=32))
    model, tok = AutoModelForSequenceClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)

    def score(text: str) -> float:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            return float(model(**enc).logits[0, 0])

    for row in PREFS[:2]:
        assert score(row["prompt"] + row["chosen"]) > score(row["prompt"] + row["rejected"])


def test_missing_columns_are_named(tmp_path, base):
    data = _jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}])
    spec = SFTSpec(name="a", base=str(base), data=str(data), output=str(tmp_path / "a"))
    with pytest.raises(SoupkitError, match=r"bad.jsonl:1: not an SFT example: expected 'messages', 'prompt' \+ "
                                           r"'completion', or 'text'; the row has answer, question"):
        train_sft(spec)
    assert not (tmp_path / "a").exists()


CHAT_ROWS = [{"prompt": "the cat", "prompt_id": "1", "messages": [
    {"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]}] * 8
UF_ROWS = [{"prompt": "the cat", "chosen": [{"role": "user", "content": "the cat"},
                                            {"role": "assistant", "content": "sat on the mat"}],
            "rejected": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "bad bad"}],
            "score_chosen": 8.0, "score_rejected": 2.0}] * 8


def test_conversational_sft_needs_a_template_and_saves_the_one_it_used(tmp_path, base):
    from transformers import AutoTokenizer

    from soupkit.chat import CHATML

    data = _jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    spec = SFTSpec(name="a", base=str(base), data=str(data), output=str(tmp_path / "a"), batch_size=8, max_length=32)
    with pytest.raises(SoupkitError, match=r"^sft\[a\].data is conversational but .*base has no chat template; "
                                           r"set sft\[a\].chat_template: chatml or a .jinja file"):
        train_sft(spec)
    assert not (tmp_path / "a").exists()
    out = train_sft(spec.model_copy(update={"chat_template": "chatml"}))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    assert (out / "chat_template.jinja").read_text() == CHATML
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tok) and config["eos_token_id"] == tok.eos_token_id


@pytest.mark.smoke
def test_reward_model_trains_on_ultrafeedback_binarized_rows(tmp_path, base):
    """The row shape that crashed TRL's RewardTrainer ('list' object has no attribute 'endswith')."""
    sft_dir = train_sft(SFTSpec(name="c", base=str(base), data=str(_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)),
                                output=str(tmp_path / "c"), chat_template="chatml", batch_size=8, max_length=32))
    data = _jsonl(tmp_path / "uf.jsonl", UF_ROWS)
    out = train_reward_model(RewardModelSpec(base=str(sft_dir), data=str(data), output=str(tmp_path / "rm"),
                                             batch_size=8, max_length=32))
    assert (out / "chat_template.jinja").is_file()


def test_lora_sft_writes_an_adapter_that_merges_and_learns(tmp_path, base):
    """``lora_rank`` trains a PEFT adapter (TRL + PEFT); it records its base by absolute path and
    the rest of soupkit reads it as the merged model (checked against PEFT's merge_and_unload)."""
    from soupkit import run_merge
    from tests.lora import merged

    out = sft(tmp_path, base, "lora", seed=1, lora_rank=4, lora_alpha=8, learning_rate=3e-2, epochs=16)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "soupkit_recipe.yaml"} <= names
    assert "model.safetensors" not in names  # the adapter only, not a copy of the base
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    whole = merged(base, out, tmp_path / "whole")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "whole")
    # smoke: a rank-4 adapter on a 16-wide model learns slowly (measured 4.18 -> 3.93); it trained
    assert _completion_loss(tmp_path / "whole") < _completion_loss(base) - 0.15
    soup = load_state(run_merge({"merge": {"models": [str(out), str(out)], "output": str(tmp_path / "soup")}}))
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(soup[name], value, rtol=0, atol=1e-6)


def test_lora_sft_refuses_chatml_tokens_it_cannot_carry(tmp_path, base):
    with pytest.raises(SoupkitError, match=r"sft\[c\]: lora_rank with chat_template chatml needs a base"):
        sft(tmp_path, base, "c", seed=1, lora_rank=4, chat_template="chatml")
