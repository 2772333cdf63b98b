"""Sampling, EOS truncation and teacher-forced log-probs against torch.nn.functional and HF."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soupkit.rlhf.rollout import (
    Samples,
    ended,
    entropy,
    generate,
    position_ids,
    response_logits,
    scaled_logits,
    token_logprobs,
    top_p_filter,
    truncate_at_stop,
)


def test_truncate_at_stop_keeps_the_first_eos_and_pads_after():
    response = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 9, 9, 9]])
    out, mask = truncate_at_stop(response, stop_ids=[3], pad_id=0)
    assert out.tolist() == [[5, 3, 0, 0], [5, 6, 7, 8], [3, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


def test_any_end_of_turn_token_ends_a_response():
    """Llama 3 style: EOS and another end-of-turn id (<|eot_id|>) both stop; the first one wins."""
    response = torch.tensor([[5, 9, 7, 3], [5, 6, 7, 8], [3, 9, 9, 9]])
    out, mask = truncate_at_stop(response, stop_ids=[3, 9], pad_id=0)
    assert out.tolist() == [[5, 9, 0, 0], [5, 6, 7, 8], [3, 0, 0, 0]]
    assert ended(out, mask, [3, 9]).tolist() == [True, False, True]
    assert ended(out, mask, [3]).tolist() == [False, False, True]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = lambda p: torch.isfinite(top_p_filter(probs.log(), p)).tolist()  # noqa: E731
    assert kept(0.7) == [[False, True, False, True]]  # 0.5 + 0.3 reaches 0.7
    assert kept(0.5) == [[False, True, False, False]]
    assert kept(1.0) == [[True] * 4]
    renormalised = torch.softmax(top_p_filter(probs.log(), 0.7), dim=-1)
    torch.testing.assert_close(renormalised, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))


def test_logprobs_and_entropy_match_torch_functional():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    expected = -F.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1), reduction="none").reshape(2, 3)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    torch.testing.assert_close(entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_entropy_in_slices_matches_the_whole_formula_on_a_long_response():
    """More positions than one slice (ENTROPY_POSITIONS), a 49k vocabulary like SmolLM2's."""
    torch.manual_seed(1)
    logits = torch.randn(2, 19, 49152) * 3
    exact = torch.distributions.Categorical(logits=logits.double()).entropy()  # float64 oracle
    # fp32 sums over 49k terms: a few ulps of the ~10-nat result
    torch.testing.assert_close(entropy(logits).double(), exact, rtol=1e-5, atol=1e-5)
    assert entropy(logits[:, :0]).shape == (2, 0)


def test_scaled_logits_make_one_fp32_copy_and_keep_gradients():
    torch.manual_seed(2)
    weight = torch.randn(7, 5, requires_grad=True)
    hidden, tokens = torch.randn(2, 3, 5), torch.randint(0, 7, (2, 3))
    fp32 = hidden @ weight.T
    assert scaled_logits(fp32, 0.7).data_ptr() == fp32.data_ptr()  # divided in place: no copy
    in_place = token_logprobs(scaled_logits(hidden @ weight.T, 0.7), tokens).sum()
    (grad,) = torch.autograd.grad(in_place, weight)
    oracle = torch.log_softmax((hidden @ weight.T) / 0.7, dim=-1).gather(-1, tokens[..., None]).sum()
    (expected,) = torch.autograd.grad(oracle, weight)
    torch.testing.assert_close(in_place, oracle)
    torch.testing.assert_close(grad, expected)
    bf16 = (hidden @ weight.T).bfloat16()
    out = scaled_logits(bf16, 0.7)
    assert out.dtype == torch.float32 and torch.equal(out, bf16.float() / 0.7)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def _left_padded_batch():
    from tests.conftest import tokenizer

    tok = tokenizer()
    enc = tok(["the cat sat on the", "dog"], return_tensors="pt", padding=True, add_special_tokens=False)
    return tok, enc["input_ids"], enc["attention_mask"]


def test_cached_generation_at_low_temperature_equals_hf_greedy(sft_a):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_a).eval()
    tok, ids, mask = _left_padded_batch()
    ours = generate(model, ids, mask, max_new_tokens=6, temperature=1e-4, top_p=1.0, stop_ids=[3], pad_id=0)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                        eos_token_id=3, pad_token_id=0)[:, ids.shape[1]:]
    ours, _ = truncate_at_stop(ours, [3], 0)
    hf, _ = truncate_at_stop(hf, [3], 0)
    assert ours.tolist() == hf[:, :ours.shape[1]].tolist()


def test_teacher_forced_logprobs_match_a_plain_forward(sft_a):
    # The left-padded batched pass equals each row run alone without padding.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_a).eval()
    _, ids, mask = _left_padded_batch()
    response = torch.tensor([[7, 8, 9], [10, 11, 0]])
    roll = Samples(ids, mask.bool(), response, torch.tensor([[True] * 3, [True, True, False]]))
    with torch.no_grad():
        logprobs = token_logprobs(response_logits(model, roll, temperature=0.7), response)
        for i in range(2):
            n = int(roll.mask[i].sum())
            row = torch.cat([ids[i][mask[i].bool()], response[i, :n]])[None]
            logits = model(input_ids=row).logits[0, -n - 1:-1] / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, response[i, :n, None]).squeeze(-1)
            torch.testing.assert_close(logprobs[i, :n], expected, atol=1e-5, rtol=1e-5)
