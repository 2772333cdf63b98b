"""Native task-vector merges checked against mergekit (run on the same files) and their closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from soupkit import run_merge
from soupkit.errors import SoupkitError
from soupkit.merge import methods
from soupkit.recipe import TASK_METHODS
from tests.conftest import load_state, make_model

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A base and two fine-tunes of it (base + small noise), four layers, float32."""
    root = tmp_path_factory.mktemp("trio")
    base = make_model(root / "base", seed=41, layers=4)
    state = load_state(base)
    paths = []
    for seed in (42, 43):
        torch.manual_seed(seed)
        tuned = {k: v + 0.02 * torch.randn_like(v) for k, v in state.items()}
        paths.append(_save_like(base, root / f"ft{seed}", tuned))
    return base, paths[0], paths[1]


def _save_like(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file({k: v.contiguous() for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def merge(tmp_path: Path, name: str, method: str, models, base, backend="auto", **extra) -> dict[str, torch.Tensor]:
    spec = {"method": method, "models": models, "base": str(base), "output": str(tmp_path / name),
            "backend": backend, **extra}
    return load_state(run_merge({"merge": spec}))


def both(tmp_path, method, models, base, **extra):
    ours = merge(tmp_path, "ours", method, models, base, **extra)
    theirs = merge(tmp_path, "theirs", method, models, base, backend="mergekit", **extra)
    assert sorted(ours) == sorted(theirs)
    return ours, theirs


def test_task_methods_table_matches_recipe():
    assert tuple(methods.METHODS) == TASK_METHODS


# ---------------------------------------------------------------------------------------------
# bit for bit where the arithmetic is the same: elementwise float32 in the same order


EXACT = {
    "task_arithmetic": ([0.7, 0.4], {}, {"lambda": 0.8, "normalize": True}),
    "task_arithmetic-gradient": ([[0.0, 1.0], {"mlp": 0.3, "default": 0.6}], {}, {}),
    "ties": ([0.7, 0.4], {"density": 0.5}, {}),
    "ties-gradients": ([1.0, [0.0, 0.3, 0.7, 1.0]], {"density": [1.0, 0.7, 0.1]},
                       {"normalize": False, "int8_mask": True, "lambda": 1.3}),
    "dare_ties-density-1": ([0.6, 0.5], {}, {}),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_equals_mergekit_bit_for_bit(tmp_path, trio, case):
    base, a, b = trio
    weights, per_model, shared = EXACT[case]
    models = [{"model": str(p), "weight": w, "parameters": per_model} for p, w in zip((a, b), weights)]
    ours, theirs = both(tmp_path, case.split("-")[0], models, base, parameters=shared)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_ties_bf16_equals_mergekit(tmp_path, trio):
    """bfloat16 inputs and output: both widen to float32, merge, and round once."""
    base, a, b = trio
    models = [{"model": str(p), "weight": 0.5, "parameters": {"density": 0.4}} for p in (a, b)]
    ours, theirs = both(tmp_path, "ties", models, base, dtype="bfloat16")
    # Magnitude ties at the density cut are likelier in bf16; mergekit's pick among equals is
    # argsort's (unspecified), so allow a handful of elements to differ and nothing else.
    differing = sum(int((ours[n] != theirs[n]).sum()) for n in ours)
    assert ours["model.norm.weight"].dtype == torch.bfloat16
    assert differing <= 4


def test_ties_drops_small_deltas_and_disagreeing_signs():
    """A hand-worked TIES case: density 0.5 keeps 2 of 4 per model; signs elected by the sum."""
    base = np.zeros(4, dtype=np.float32)
    d1 = np.array([3.0, -1.0, 0.5, 2.0], dtype=np.float32)   # keeps 3.0 and 2.0
    d2 = np.array([-1.0, 4.0, 0.1, -3.0], dtype=np.float32)  # keeps 4.0 and -3.0
    job = methods.arrays_job(base, [base + d1, base + d2], per_model=[{"weight": 1.0, "density": 0.5}] * 2,
                             shared={"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False})
    # element 0: 3 vs 0 -> +, 3; element 1: 0 vs 4 -> 4; element 2: nothing -> 0;
    # element 3: 2 vs -3 -> sum -1 elects -, keeps -3 alone
    assert methods.merge_array("ties", job).tolist() == [3.0, 4.0, 0.0, -3.0]


def test_ties_cut_is_chunk_independent(monkeypatch):
    """The top-k cut is global: chunking the output (here 7 elements a chunk) changes no bit, and
    equal magnitudes at the cut are kept earliest first, exactly k in all."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(100).astype(np.float32)
    deltas = [np.round(rng.standard_normal(100), 1).astype(np.float32) for _ in range(2)]  # many ties
    job = methods.arrays_job(base, [base + d for d in deltas], per_model=[{"weight": 0.6, "density": 0.3}] * 2,
                             shared={"normalize": True, "rescale": False, "lambda": 1.0})
    whole = methods.merge_array("ties", job)
    monkeypatch.setattr(methods, "CHUNK", 7)
    assert np.array_equal(methods.merge_array("ties", job), whole)
    d = (base + deltas[0]) - base
    cut = methods.magnitude_cut(job, 0, 0.3, np.empty(100, np.float32))
    kept = int((np.abs(d) > cut.value).sum()) + cut.ties
    assert kept == 30 and cut.ties <= int((np.abs(d) == cut.value).sum())


# ---------------------------------------------------------------------------------------------
# within a stated bound where a reduction (norm, dot) is summed in another order


def bound_ok(ours: torch.Tensor, theirs: torch.Tensor, scale: torch.Tensor, ulps: float) -> bool:
    return bool(torch.all((ours - theirs).abs() <= ulps * EPS32 * scale))


def test_slerp_within_4_ulps_of_mergekit(tmp_path, trio):
    """The angle comes from float64 sums here and float32 chunked sums in mergekit: the coefficients
    agree to ~1e-7 relative, so the results agree within 4 float32 ulps of the summands' magnitude
    (measured: 1.6)."""
    base, a, _ = trio
    t = {"self_attn": [0.0, 0.5, 0.3, 0.7, 1.0], "mlp": [1.0, 0.5, 0.7, 0.3, 0.0], "default": 0.5}
    ours, theirs = both(tmp_path, "slerp", [str(base), str(a)], base, parameters={"t": t})
    sb, sa = load_state(base), load_state(a)
    for name in ours:
        assert bound_ok(ours[name], theirs[name], sb[name].abs() + sa[name].abs(), 4), name
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], sb["model.layers.0.self_attn.q_proj.weight"])


def test_model_stock_within_stated_ulps_of_mergekit(tmp_path, trio):
    """The cosine is a float64 sum here and a float32 one in mergekit, and t = N c / (1 + (N-1) c)
    carries its rounding error to every element: within 2 float32 ulps (of the inputs' magnitude) for
    whole tensors (measured 0.8), 16 per row (``filter_wise``; measured 9.7 for rows of 16 elements: the
    error of a float32 row sum grows with the row length)."""
    base, a, b = trio
    for filter_wise, ulps in ((False, 2), (True, 16)):
        ours, theirs = both(tmp_path / str(filter_wise), "model_stock", [str(a), str(b)], base,
                            parameters={"filter_wise": filter_wise})
        states = [load_state(p) for p in (base, a, b)]
        for name in ours:
            assert bound_ok(ours[name], theirs[name], sum(s[name].abs() for s in states), ulps), name


def test_model_stock_closed_form():
    """Two task vectors at 60 degrees: c = 1/2, t = 2c/(1+c) = 2/3; result base + t * mean(d)."""
    base = np.array([1.0, 1.0], dtype=np.float32)
    d1, d2 = np.array([2.0, 0.0], dtype=np.float32), np.array([1.0, math.sqrt(3)], dtype=np.float32)
    got = methods.merge_array("model_stock", methods.arrays_job(base, [base + d1, base + d2],
                                                                shared={"filter_wise": False}))
    want = base + (2 / 3) * (d1 + d2) / 2
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# dare_ties: a seeded random mask (mergekit draws its own from torch's generator)


def test_dare_ties_formula_with_its_masks(tmp_path, trio):
    """The random masks are soupkit's own (keyed by seed, tensor and model), so mergekit cannot be the
    oracle for density < 1: torch recomputes the DARE-TIES formula from the same masks."""
    base, a, b = trio
    models = [{"model": str(p), "weight": w, "parameters": {"density": 0.5}} for p, w in zip((a, b), (0.6, 0.5))]
    ours = merge(tmp_path, "dare", "dare_ties", models, base, seed=7)
    states = [load_state(p) for p in (base, a, b)]
    kept = []
    for name, got in ours.items():
        x0 = states[0][name].float().reshape(-1)
        deltas = []
        for i, (w, state) in enumerate(zip((0.6, 0.5), states[1:])):
            d = state[name].float().reshape(-1) - x0
            mask = torch.from_numpy(methods.dare_mask(7, name, i, 0, d.numel(), 0.5))
            kept.append(mask.float().mean().item())
            m = d * mask
            if m.abs().sum() > 0:
                m = m * (d.abs().double().sum() / m.abs().double().sum()).float()
            deltas.append(m * w)
        stack = torch.stack(deltas)
        agree = torch.sign(stack) == torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        want = x0 + (stack * agree).sum(0)
        assert torch.allclose(got.reshape(-1), want, rtol=0, atol=8 * EPS32 * float(want.abs().max())), name
    assert abs(np.mean(kept) - 0.5) < 0.02
    again = merge(tmp_path, "dare2", "dare_ties", models, base, seed=7)
    other = merge(tmp_path, "dare3", "dare_ties", models, base, seed=8)
    assert all(torch.equal(ours[n], again[n]) for n in ours)
    assert not torch.equal(ours["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------
# task_slerp (WARP): SLERP of task vectors relative to the init


def task_slerp(init: np.ndarray, deltas: list[np.ndarray], t: float) -> np.ndarray:
    job = methods.arrays_job(init, [init + d for d in deltas], shared={"t": t})
    return methods.merge_array("task_slerp", job)


def slerp64(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    omega = math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_task_slerp_closed_form_by_hand():
    """d1 = (2, 0), d2 = (0, 2): O = pi/2, so at t = 1/2 both coefficients are sin(pi/4)."""
    init = np.array([1.0, -1.0], dtype=np.float32)
    got = task_slerp(init, [np.array([2.0, 0.0], np.float32), np.array([0.0, 2.0], np.float32)], 0.5)
    s = math.sin(math.pi / 4)
    np.testing.assert_allclose(got, [1 + 2 * s, -1 + 2 * s], rtol=1e-7)


def test_task_slerp_unequal_norms_closed_form():
    rng = np.random.default_rng(0)
    init, d1, d2 = (rng.standard_normal(50).astype(np.float32) for _ in range(3))
    d2 *= 3
    t = 0.3
    np.testing.assert_allclose(task_slerp(init, [d1, d2], t), init + slerp64(t, d1, d2), rtol=1e-5, atol=1e-5)


def test_task_slerp_is_mergekit_slerp_of_the_task_vectors():
    """mergekit's slerp kernel applied to the two task vectors, plus the init, is task_slerp."""
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    rng = np.random.default_rng(1)
    init, d1, d2 = (rng.standard_normal((6, 8)).astype(np.float32) for _ in range(3))
    for t in (0.0, 0.25, 0.5, 1.0):
        theirs = torch.from_numpy(init) + mk_slerp(torch.tensor([t]), torch.from_numpy(d1)[None], torch.from_numpy(d2)[None])[0]
        ours = task_slerp(init.reshape(-1), [d1.reshape(-1), d2.reshape(-1)], t).reshape(6, 8)
        scale = np.abs(init) + np.abs(d1) + np.abs(d2)
        assert np.all(np.abs(ours - theirs.numpy()) <= 4 * EPS32 * scale), t


def test_task_slerp_equal_norms_lies_on_the_arc():
    """Equal-norm task vectors: the merged task vector keeps their norm (it stays on the sphere)."""
    rng = np.random.default_rng(2)
    d1, d2 = rng.standard_normal(100), rng.standard_normal(100)
    d2 *= np.linalg.norm(d1) / np.linalg.norm(d2)
    init = np.zeros(100, dtype=np.float32)
    for t in (0.2, 0.5, 0.9):
        merged = task_slerp(init, [d1.astype(np.float32), d2.astype(np.float32)], t)
        assert math.isclose(np.linalg.norm(merged), np.linalg.norm(d1), rel_tol=1e-5)


def test_task_slerp_of_three_is_iterated():
    """M = 3: slerp(slerp(d1, d2, 1/2), d3, 1/3), the iterated definition used for M > 2; the running merge is
    never materialised (its norm and angles come from the task vectors' Gram matrix)."""
    rng = np.random.default_rng(3)
    init = rng.standard_normal(40).astype(np.float32)
    ds = [rng.standard_normal(40).astype(np.float32) for _ in range(3)]
    want = init + slerp64(1 / 3, slerp64(0.5, ds[0], ds[1]), ds[2])
    np.testing.assert_allclose(task_slerp(init, ds, 0.5), want, rtol=1e-5, atol=1e-5)


def test_task_slerp_models_equal_mergekit_nuslerp_with_base(tmp_path, trio):
    """On checkpoints: mergekit's nuslerp with a base (weights 1 - t, t) interpolates task vectors too;
    within 4 float32 ulps of the inputs' magnitude (measured: 1.6)."""
    base, a, b = trio
    ours = merge(tmp_path, "ours", "task_slerp", [str(a), str(b)], base, parameters={"t": 0.3})
    theirs = merge(tmp_path, "theirs", "nuslerp", [{"model": str(a), "weight": 0.7}, {"model": str(b), "weight": 0.3}],
                   base)
    states = [load_state(p) for p in (base, a, b)]
    for name in ours:
        assert bound_ok(ours[name], theirs[name], sum(s[name].abs() for s in states), 4), name


def test_task_slerp_endpoints(tmp_path, trio):
    base, a, b = trio
    sa, sb = load_state(a), load_state(b)
    for t, want in ((0.0, sa), (1.0, sb)):
        got = merge(tmp_path, f"t{t}", "task_slerp", [str(a), str(b)], base, parameters={"t": t})
        states = [load_state(base), sa, sb]
        for name in got:
            assert bound_ok(got[name], want[name], sum(s[name].abs() for s in states), 2), name


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the key, before any weight is read


@pytest.mark.parametrize(("method", "models", "extra", "message"), [
    ("ties", ["A", "B"], {}, "merge.models[0].weight: required by method ties"),
    ("ties", [{"model": "A", "weight": 1.0, "parameters": {"densty": 0.5}}], {},
     "merge.models[0].parameters.densty: unknown per-model parameter for ties (did you mean 'density'?)"),
    ("task_arithmetic", [{"model": "A", "weight": 1.0}], {"parameters": {"lamda": 2}}, "did you mean 'lambda'"),
    ("slerp", ["A", "B"], {"parameters": {"t": 0.5}}, "slerp needs exactly 2 models (counting the base); got 3"),
    ("slerp", ["BASE", "A"], {}, "merge.parameters.t: required by method slerp"),
    ("model_stock", [{"model": "A", "weight": 1.0}, "B"], {}, "merge.models[0].weight: method model_stock takes no weights"),
    ("task_slerp", ["A", "B", "C"], {"parameters": {"t": 0.2}}, "task_slerp of more than two models weighs them equally"),
    ("ties", [{"model": "A", "weight": "heavy"}], {}, None),
    ("ties", [{"model": "A", "weight": 1.0, "parameters": {"density": "half"}}], {},
     "merge.models[0].parameters.density: expected a finite number, got 'half'"),
])
def test_bad_settings_fail_before_reading(tmp_path, method, models, extra, message):
    spec = {"method": method, "models": models, "base": "BASE", "output": str(tmp_path / "out"), **extra}
    with pytest.raises(SoupkitError) as err:
        run_merge({"merge": spec})
    if message:
        assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_base_is_required(tmp_path):
    with pytest.raises(SoupkitError, match="merge.base: method ties needs a base model"):
        run_merge({"merge": {"method": "ties", "models": [{"model": "A", "weight": 1}], "output": str(tmp_path / "o")}})


def test_shipped_task_recipes_pass_native_checks():
    from soupkit.recipe import load_recipe

    root = Path(__file__).resolve().parents[2] / "recipes"
    specs = [load_recipe(p).merge for p in sorted(root.glob("*.yaml"))]
    native = [s for s in specs if s is not None and not isinstance(s, list) and s.method in TASK_METHODS
              and s.backend == "auto"]
    assert {s.method for s in native} >= {"ties", "task_slerp"}
    for spec in native:
        methods.roles(spec)
