"""Several ``--ref`` averaged in memory (``ref_mode: soup``) equal ``soupkit merge``'s soup bit for bit.

The oracle is the merge engine's documented contract (float32 sum of weight * tensor, left to right,
rounded once to the output dtype): the merged checkpoint on disk. Three fp32 models make the
left-to-right order matter (the mean of a stack rounds differently); bf16 checks the single
rounding, and tied embeddings that a tied tensor is averaged once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit import run_merge
from soupkit.loading import causal_lm
from soupkit.rlhf.models import load_models, preflight, soup_in_memory
from tests.conftest import load_state, make_model
from tests.rlhf.test_trainer import spec_for


def _merged(tmp_path: Path, arch: str, dtype: torch.dtype, count: int) -> tuple[list[Path], dict[str, torch.Tensor]]:
    paths = [make_model(tmp_path / f"m{i}", arch, seed=300 + i, dtype=dtype) for i in range(count)]
    merged = run_merge({"merge": {"method": "uniform", "models": [str(p) for p in paths]}}, out=tmp_path / "soup")
    return paths, load_state(merged)


def _assert_bit_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())  # a tied tensor appears once, as in the file
    assert params.keys() == expected.keys()
    for name, tensor in params.items():
        assert tensor.dtype == expected[name].dtype == dtype, name
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("dtype, count, flags", [(torch.float32, 3, {}), (torch.bfloat16, 2, {"bf16": True})])
def test_align_soup_of_refs_equals_soupkit_merge_bit_for_bit(tmp_path, prompts_txt, dtype, count, flags):
    paths, expected = _merged(tmp_path, "llama", dtype, count)
    spec = spec_for(paths, prompts_txt, **flags)
    [soup] = load_models(spec, preflight(spec), "cpu").refs
    _assert_bit_equal(soup, expected, dtype)


def test_tied_embeddings_are_averaged_once(tmp_path):
    paths, expected = _merged(tmp_path, "qwen2", torch.bfloat16, 3)  # qwen2's tiny config ties them
    soup = soup_in_memory([causal_lm(p, "ref", torch.bfloat16) for p in paths])
    assert soup.lm_head.weight is soup.model.embed_tokens.weight
    _assert_bit_equal(soup, expected, torch.bfloat16)
