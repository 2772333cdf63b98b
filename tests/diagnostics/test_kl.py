"""Exact token-level divergences: hand-checked properties and torch.nn.functional.kl_div."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from soupkit.diagnostics import kl as K
from soupkit.diagnostics import report
from tests.diagnostics.conftest import TEXTS
from tests.diagnostics.oracles import kl_stats


def random_logprobs(seed: int, shape=(3, 5, 11)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 3, -1)


def test_kl_of_a_distribution_with_itself_is_zero():
    lp = random_logprobs(0)
    assert torch.equal(K.token_kl(lp, lp), torch.zeros(3, 5, dtype=torch.float64))
    assert torch.allclose(K.token_js(lp, lp), torch.zeros(3, 5, dtype=torch.float64), atol=1e-15)


def test_kl_matches_torch_kl_div():
    lp, lq = random_logprobs(1), random_logprobs(2)
    want = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    torch.testing.assert_close(K.token_kl(lp, lq), want, rtol=1e-12, atol=1e-12)
    assert (K.token_kl(lp, lq) > 0).all()


def test_kl_hand_worked_case():
    p, q = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.9, 0.1]]])
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(K.token_kl(p.log(), q.log())) == pytest.approx(want, rel=1e-6)


def test_kl_ignores_zero_probability_tokens():
    p = torch.tensor([[[1.0, 0.0]]]).log()  # log 0 = -inf must not give nan
    q = torch.tensor([[[0.5, 0.5]]]).log()
    assert float(K.token_kl(p, q)) == pytest.approx(math.log(2.0))


def test_js_matches_its_definition_and_bound():
    lp, lq = random_logprobs(3), random_logprobs(4)
    logm = ((lp.exp() + lq.exp()) / 2).log()
    want = 0.5 * F.kl_div(logm, lp, log_target=True, reduction="none").sum(-1) \
        + 0.5 * F.kl_div(logm, lq, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(K.token_js(lp, lq), want, rtol=1e-10, atol=1e-12)
    assert (K.token_js(lp, lq) <= math.log(2) + 1e-12).all()


def test_top1_and_nll():
    lp = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]).log()
    lq = torch.tensor([[[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]]]).log()
    assert K.top1_agree(lp, lq).tolist() == [[True, False]]
    nll = K.token_nll(lp, torch.tensor([[1, 2]]))
    torch.testing.assert_close(nll, -torch.tensor([[0.2, 0.8]]).log())


def test_model_against_itself_has_zero_kl(family, texts_file):
    pair = report([str(family["ft1"]), str(family["ft1"])], prompts=texts_file)["pairs"][0]
    assert pair["kl"] == 0.0 and pair["kl_reverse"] == 0.0
    assert pair["js"] == pytest.approx(0.0, abs=1e-7)
    assert pair["top1_agreement"] == 1.0


def test_model_kl_matches_unbatched_kl_div(family, texts_file):
    """Batched, right-padded teacher forcing equals each text run alone through transformers."""
    pair = report([str(family["ft1"]), str(family["other"])], prompts=texts_file)["pairs"][0]
    want = kl_stats(family["ft1"], family["other"], TEXTS)
    for key, value in want.items():
        assert pair[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert pair["kl"] > 0 and pair["kl"] != pytest.approx(pair["kl_reverse"], rel=1e-3)


def test_gpt2_absolute_positions_are_not_shifted_by_padding(arch_pairs, texts_file):
    a, b = arch_pairs["gpt2"]
    pair = report([str(a), str(b)], prompts=texts_file)["pairs"][0]
    want = kl_stats(a, b, TEXTS)
    assert pair["kl"] == pytest.approx(want["kl"], rel=1e-4)


def test_soup_is_found_from_its_recipe_and_put_first(family, soup, texts_file):
    result = report([str(family["ft1"]), str(family["ft2"]), str(soup)], prompts=texts_file)
    pairs = result["pairs"]
    assert result["models"] == [str(family["ft1"]), str(family["ft2"]), str(soup)]
    assert [(p["a"], p["b"]) for p in pairs[:2]] == [(str(soup), str(family["ft1"])), (str(soup), str(family["ft2"]))]
    want = kl_stats(soup, family["ft1"], TEXTS)
    assert pairs[0]["kl"] == pytest.approx(want["kl"], rel=1e-4)
    # the soup sits between its ingredients: closer in KL to each than they are to each other
    assert max(pairs[0]["kl"], pairs[1]["kl"]) < pairs[2]["kl"]
