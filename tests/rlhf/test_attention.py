"""The attention kernel: ``attention: auto`` picks eager on a CPU only while its memory stays bounded,
every model of a run uses the kernel chosen, and the two kernels compute the same log-probs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.loading import EAGER_FP32, eager_attention_fp32, use_attention
from soupkit.rlhf import train
from soupkit.rlhf.config import EAGER_ATTENTION_BYTES, attention_for
from soupkit.rlhf.models import load_models, preflight
from tests.rlhf.test_trainer import spec_for

CONFIG = SimpleNamespace(num_attention_heads=9, num_hidden_layers=30)  # SmolLM2-135M's shape


def _spec(tmp_path, sft_a, prompts_txt, **flags):
    return spec_for(sft_a, prompts_txt, None, **flags)


def test_auto_is_eager_on_a_cpu_while_the_kept_probabilities_fit(tmp_path, sft_a, prompts_txt):
    spec = _spec(tmp_path, sft_a, prompts_txt, batch_size=8, minibatches=1)
    # by hand: 8 rows x 9 heads x 90^2 positions x 30 layers x 8 bytes = 140 MB kept for the backward
    assert 8 * 9 * 90 ** 2 * 30 * 8 == 139_968_000 <= EAGER_ATTENTION_BYTES
    assert attention_for(spec, "cpu", CONFIG, 90) == "eager"
    # 8 x 9 x 250^2 x 30 x 8 = 1.08e9 > 2^30 = 1.07e9: the same run with longer sequences stays on sdpa
    assert 8 * 9 * 250 ** 2 * 30 * 8 > EAGER_ATTENTION_BYTES
    assert attention_for(spec, "cpu", CONFIG, 250) == "sdpa"
    assert attention_for(spec, "cuda", CONFIG, 90) == "sdpa"
    assert attention_for(spec, "cpu", SimpleNamespace(), 90) == "sdpa"  # heads unknown: no estimate
    # a multimodal config keeps its shape in text_config
    assert attention_for(spec, "cpu", SimpleNamespace(text_config=CONFIG), 90) == "eager"


def test_the_no_grad_forward_batch_counts_too(tmp_path, sft_a, prompts_txt):
    # micro-batch 1 keeps little for the backward, but 64 rows of scores at once (12 bytes each) do not fit
    spec = _spec(tmp_path, sft_a, prompts_txt, batch_size=64, minibatches=64, forward_batch_size=64)
    assert 64 * 9 * 500 ** 2 * 12 > EAGER_ATTENTION_BYTES >= 1 * 9 * 500 ** 2 * 30 * 8
    assert attention_for(spec, "cpu", CONFIG, 500) == "sdpa"
    assert attention_for(spec.model_copy(update={"forward_batch_size": 8}), "cpu", CONFIG, 500) == "eager"


def test_an_explicit_kernel_is_kept_anywhere(tmp_path, sft_a, prompts_txt):
    for kernel in ("sdpa", "eager"):
        spec = _spec(tmp_path, sft_a, prompts_txt).model_copy(update={"attention": kernel})
        assert attention_for(spec, "cpu", CONFIG, 10_000) == kernel
        assert attention_for(spec, "cuda", CONFIG, 10) == kernel


def test_every_model_of_a_run_uses_the_kernel_chosen(tmp_path, sft_a, reward_model, prompts_txt):
    spec = spec_for(sft_a, prompts_txt, reward_model)
    models = load_models(spec, preflight(spec), torch.device("cpu"))
    assert models.attention == "eager"  # tiny models, short prompts, a CPU
    kernels = {m.config._attn_implementation for m in (models.policy, models.critic.seq_cls, *models.refs,
                                                       models.reward.model)}
    assert kernels == {EAGER_FP32}  # soupkit's float32 eager (transformers' eager where it cannot)
    forced = load_models(spec.model_copy(update={"attention": "sdpa"}), preflight(spec), torch.device("cpu"))
    assert forced.attention == "sdpa" and forced.policy.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_give_the_same_logprobs_with_left_padding(sft_a):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_a, dtype=torch.float32).eval()
    ids = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as rollouts have
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = {}
    for kernel in ("sdpa", "eager"):
        use_attention(model, kernel, strict=True)
        with torch.no_grad():
            out[kernel] = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
    real = mask.bool()
    torch.testing.assert_close(out["eager"][real], out["sdpa"][real], rtol=0, atol=1e-5)


def test_a_kernel_a_model_cannot_run_is_an_error_only_when_asked_for(sft_a):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_a, dtype=torch.float32)
    with pytest.raises(SoupkitError, match="attention flash_attention_2: LlamaForCausalLM cannot use it"):
        use_attention(model, "flash_attention_2", strict=True)  # not installed here
    use_attention(model, "flash_attention_2", strict=False)
    assert model.config._attn_implementation == "sdpa"


def test_the_run_records_the_kernel_it_used(tmp_path, sft_a, prompts_txt):
    out = train(spec_for(sft_a, prompts_txt, None, steps=1), out=tmp_path / "run")
    assert "attention: eager" in (out / "soupkit_recipe.yaml").read_text()  # auto, as decided
    # the saved model names no soupkit kernel: plain transformers loads it as it was
    assert EAGER_FP32 not in (out / "config.json").read_text()


def _attention_case(groups: int = 2):
    """bf16 queries, keys and values of 2 rows x 4 heads (2 key/value heads) x 7 positions, the
    first row left-padded by 3, and eager's additive causal mask."""
    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 4, 7, 16
    q = (2 * torch.randn(b, h, s, d, generator=g)).bfloat16()  # scaled scores of magnitude ~4
    k = (2 * torch.randn(b, h // groups, s, d, generator=g)).bfloat16()
    v = torch.randn(b, h // groups, s, d, generator=g).bfloat16()
    allowed = torch.ones(s, s).tril().bool().expand(b, 1, s, s).clone()
    allowed[0, :, :, :3] = False
    allowed[0, :, :3, 0] = True  # a padded query row attends somewhere, as transformers' masks allow
    mask = torch.zeros(b, 1, s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return q, k, v, mask, SimpleNamespace(num_key_value_groups=groups, training=False)


def test_soupkit_eager_is_float32_attention_even_on_bf16_inputs():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v, mask, module = _attention_case()
    scaling = 16 ** -0.5
    # the oracle: softmax(q k^T / sqrt(d) + mask) v in float64 on the same bf16 inputs
    kk, vv = (x.double().repeat_interleave(2, dim=1) for x in (k, v))
    probs = torch.softmax(q.double() @ kk.transpose(2, 3) * scaling + mask.double(), dim=-1)
    expected = (probs @ vv).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = eager_attention_fp32(module, q, k, v, mask, scaling)
        theirs, their_weights = eager_attention_forward(module, q, k, v, mask.bfloat16(), scaling)
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding
    # transformers' eager rounds the scores to bf16 before the softmax: its probabilities are off by
    # up to 0.0056 here, thousands of times more
    assert (their_weights.double() - probs).abs().max() > 1e-3
