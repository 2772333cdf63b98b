"""soupkit.loading: the LM head's contiguous input (a speed fix that must not change a logit)."""

from __future__ import annotations

import copy

import torch

from soupkit.loading import causal_lm
from tests.conftest import make_model


def test_the_head_gets_a_contiguous_input_and_the_logits_do_not_change(tmp_path):
    path = make_model(tmp_path / "m")
    model = causal_lm(path, "model")
    plain = copy.deepcopy(model)
    plain.get_output_embeddings()._forward_pre_hooks.clear()
    seen = []
    head = copy.deepcopy(model).requires_grad_(False)  # frozen, as a reference is: the slow path
    head.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        kept = head(input_ids=ids, logits_to_keep=4).logits
        oracle = plain(input_ids=ids).logits[:, -4:]  # all logits, then the last 4: no strided input
    assert seen == [True]  # the deep copy kept the hook, and it made the strided slice contiguous
    torch.testing.assert_close(kept, oracle, rtol=1e-5, atol=1e-6)
