"""The MKL baseline of the SALSA paper: the mean of the per-token KLs to several references."""

from __future__ import annotations

import pytest

from soupkit.rlhf import train
from tests.rlhf.test_trainer import metrics, spec_for


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_mean_kl_is_the_mean_of_the_kls_to_each_reference(tmp_path, sft_a, sft_b, prompts_txt, estimator):
    # Policy starts at SFT-A; refs are SFT-A and SFT-B. At step 0 every per-token estimate against
    # SFT-A is exactly 0, so the MKL penalty is half the estimate against SFT-B, which the run also
    # logs on its own through --watch (same samples, same estimator).
    spec = spec_for([sft_a, sft_b], prompts_txt, None, "ref_mode=mean_kl", f"kl_estimator={estimator}",
                    init=str(sft_a), steps=1, watch={"a": str(sft_a), "b": str(sft_b)})
    train(spec, out=tmp_path / "mkl")
    first = metrics(tmp_path / "mkl")[0]
    assert first["kl_a"] == pytest.approx(0.0, abs=1e-6)
    assert abs(first["kl_b"]) > 1e-3  # k1 may be negative on a sample; k3 never is
    assert first["kl"] == pytest.approx(first["kl_b"] / 2, rel=1e-5, abs=1e-6)
