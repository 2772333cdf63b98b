"""Every TRL dataset format (and the public mixes) into prompts, SFT examples and preference pairs,
checked against hand-written expected rows; every malformed shape gets one line naming the row."""

from __future__ import annotations

import json

import pytest

from soupkit.errors import SoupkitError
from soupkit.formats import normalise, preference_pair, prompt_of, sft_example
from soupkit.rlhf.prompts import load_prompts

Q = "What is the capital of Japan?"
A = "Tokyo."
USER, ASSISTANT = {"role": "user", "content": Q}, {"role": "assistant", "content": A}
SYSTEM = {"role": "system", "content": "Be brief."}
WRONG = {"role": "assistant", "content": "Kyoto."}


@pytest.mark.parametrize("row, expected", [
    ({"prompt": Q}, Q),                                                  # standard prompt-only
    ({"prompt": [USER]}, [USER]),                                        # conversational prompt-only
    ({"prompt": [SYSTEM, USER]}, [SYSTEM, USER]),
    ({"prompt": Q, "completion": A}, Q),                                 # prompt-completion
    ({"prompt": [USER], "completion": [ASSISTANT]}, [USER]),
    ({"messages": [SYSTEM, USER, ASSISTANT]}, [SYSTEM, USER]),           # language modelling, conversational
    ({"prompt": Q, "prompt_id": "x", "messages": [USER, ASSISTANT]}, Q),  # UltraChat 200k
    ({"prompt": Q, "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}, Q),  # UltraFeedback-binarized
    ({"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}, [USER]),  # implicit-prompt preference
    ({"prompt": [USER, ASSISTANT]}, [USER]),                             # a trailing answer is not prompted
])
def test_prompt_of_every_format(row, expected):
    assert prompt_of(row, "row") == expected


@pytest.mark.parametrize("row, message", [
    ({"text": Q}, "no prompt: .* the row has text"),
    ({"question": Q}, "no prompt: .* the row has question"),
    ({"prompt": ""}, "field 'prompt': expected a non-empty string or a list of messages, got an empty string"),
    ({"prompt": 3}, "field 'prompt': expected a non-empty string or a list of messages, got int"),
    ({"prompt": []}, "field .prompt.: expected a list of {role, content} messages, got an empty list"),
    ({"prompt": [{"role": "human", "content": Q}]}, r"field 'prompt'\[0\].role: expected one of"),
    ({"prompt": [{"role": "user", "content": None}]}, r"field 'prompt'\[0\].content: expected a string, got NoneType"),
    ({"messages": [ASSISTANT]}, "field 'messages': the conversation has no user turn"),
    (["a", "b"], "expected an object with named fields, got list"),
])
def test_prompt_of_refuses_with_one_line(row, message):
    with pytest.raises(SoupkitError, match=f"^f.jsonl:7: {message}"):
        prompt_of(row, "f.jsonl:7")


def test_text_rows_are_probe_texts_only_when_asked():
    assert prompt_of({"text": Q}, "row", text=True) == Q


@pytest.mark.parametrize("row, expected", [
    ({"messages": [USER, ASSISTANT], "prompt": Q}, {"messages": [USER, ASSISTANT]}),
    ({"prompt": Q, "completion": A}, {"prompt": Q, "completion": A}),
    ({"prompt": [USER], "completion": A}, {"prompt": [USER], "completion": [ASSISTANT]}),
    ({"prompt": Q, "completion": [ASSISTANT]}, {"prompt": [USER], "completion": [ASSISTANT]}),
    ({"text": "a b"}, {"text": "a b"}),
])
def test_sft_examples(row, expected):
    assert sft_example(row, "row") == expected


@pytest.mark.parametrize("row, message", [
    ({"messages": [USER]}, "field 'messages' has no assistant turn"),
    ({"prompt": Q}, "not an SFT example: .* the row has prompt"),
    ({"completion": A}, "not an SFT example: .* the row has completion"),
])
def test_bad_sft_rows(row, message):
    with pytest.raises(SoupkitError, match=f"^d row 2: {message}"):
        sft_example(row, "d row 2")


@pytest.mark.parametrize("row, expected", [
    # UltraFeedback-binarized: the string prompt is already the first turn of each answer
    ({"prompt": Q, "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG], "score_chosen": 8.0},
     {"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}),
    # explicit conversational prompt with answer turns only
    ({"prompt": [SYSTEM, USER], "chosen": [ASSISTANT], "rejected": [WRONG]},
     {"chosen": [SYSTEM, USER, ASSISTANT], "rejected": [SYSTEM, USER, WRONG]}),
    # a string prompt with answer turns only becomes the user turn
    ({"prompt": Q, "chosen": [ASSISTANT], "rejected": [WRONG]},
     {"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}),
    # conversational prompt, string answers
    ({"prompt": [USER], "chosen": A, "rejected": "Kyoto."},
     {"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}),
    # implicit conversational
    ({"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]},
     {"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}),
    # standard, explicit and implicit prompt
    ({"prompt": Q, "chosen": " " + A, "rejected": " Kyoto."}, {"prompt": Q, "chosen": " " + A, "rejected": " Kyoto."}),
    ({"chosen": "Q A", "rejected": "Q B"}, {"chosen": "Q A", "rejected": "Q B"}),
])
def test_preference_pairs(row, expected):
    assert preference_pair(row, "row") == expected


@pytest.mark.parametrize("row, message", [
    ({"prompt": Q, "chosen": A}, "not a preference pair: no 'rejected' field; the row has chosen, prompt"),
    ({"chosen": [ASSISTANT], "rejected": [WRONG]}, "field 'chosen': no prompt"),
    ({"prompt": Q, "chosen": [USER], "rejected": [USER, WRONG]}, "field 'chosen': the conversation must end with an assistant turn"),
    ({"prompt": Q, "chosen": "", "rejected": "x"}, "field 'chosen': expected a non-empty string"),
])
def test_bad_preference_rows(row, message):
    with pytest.raises(SoupkitError, match=f"^p.jsonl:3: {message}"):
        preference_pair(row, "p.jsonl:3")


def test_one_data_set_takes_one_shape():
    rows = [("f:1", {"prompt": Q, "completion": A}), ("f:2", {"prompt": [USER], "completion": A})]
    with pytest.raises(SoupkitError, match=r"^f:2: the row is shaped \{completion: messages, prompt: messages\} "
                                           r"but f:1 is shaped \{completion: string, prompt: string\}"):
        normalise(rows, sft_example)


def test_prompt_files_of_every_shape_and_errors_name_the_line(tmp_path):
    rows = [{"prompt": Q}, {"prompt": [USER]}, {"messages": [USER, ASSISTANT]},
            {"prompt": Q, "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_prompts(str(path)) == [Q, [USER], [USER], Q]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(SoupkitError, match=r"p.jsonl:3: field 'prompt'\[0\].content: expected a string"):
        load_prompts(str(path))


def test_saved_dataset_prompts_name_the_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": Q}, {"prompt": "  "}]).save_to_disk(tmp_path / "ds")
    with pytest.raises(SoupkitError, match="row 2: field 'prompt': expected a non-empty string"):
        load_prompts(str(tmp_path / "ds"))
