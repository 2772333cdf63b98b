"""The fused numba kernels (soupkit/merge/kernels.py) against the numpy reference (SOUPKIT_JIT=0):
bit for bit on float32 work; the radix-select cut against np.partition's; DARE's counter-based mask
and its exact L1 rescale against hand formulas (math.fsum is the correctly rounded sum)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from soupkit.merge import kernels, methods


def fused_and_reference(method: str, job: methods.TensorJob, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setenv("SOUPKIT_JIT", "1")
    fused = methods.merge_array(method, job)
    monkeypatch.setenv("SOUPKIT_JIT", "0")
    reference = methods.merge_array(method, job)
    return fused, reference


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def inputs(kind: str, n: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    base = rng.standard_normal(n).astype(np.float32)
    if kind == "random":
        deltas = [(0.02 * rng.standard_normal(n)).astype(np.float32) for _ in range(count)]
    elif kind == "cut-ties":  # one decimal: many equal magnitudes at every cut
        deltas = [np.round(rng.standard_normal(n), 1).astype(np.float32) for _ in range(count)]
    elif kind == "zeros":  # models equal to the base where the mask says, elsewhere small deltas
        deltas = [np.where(rng.random(n) < 0.6, 0, rng.standard_normal(n)).astype(np.float32) for _ in range(count)]
    elif kind == "negative-zero":
        base = np.where(rng.random(n) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
        deltas = [np.where(rng.random(n) < 0.5, np.float32(-0.0), rng.choice([-1.0, 1.0, 0.0], n)).astype(np.float32)
                  for _ in range(count)]
    else:  # all-equal magnitudes, random signs
        deltas = [(0.25 * rng.choice([-1.0, 1.0], n)).astype(np.float32) for _ in range(count)]
    return base, [base + d for d in deltas]


KINDS = ["random", "cut-ties", "zeros", "negative-zero", "all-equal"]
SETTINGS = {
    "task_arithmetic": [({"weight": 0.7, "density": 1.0}, {"normalize": False, "rescale": False, "lambda": 1.0}),
                        ({"weight": -0.3, "density": 1.0}, {"normalize": True, "rescale": False, "lambda": 0.8})],
    "ties": [({"weight": 0.6, "density": 0.3}, {"normalize": True, "rescale": False, "lambda": 1.0}),
             ({"weight": 1.1, "density": 0.05}, {"normalize": False, "rescale": True, "lambda": 1.3}),
             ({"weight": 0.5, "density": 0.0}, {"normalize": True, "rescale": False, "lambda": 1.0})],
    "dare_ties": [({"weight": 0.5, "density": 0.5}, {"normalize": False, "rescale": True, "lambda": 1.0}),
                  ({"weight": 0.9, "density": 0.1}, {"normalize": True, "rescale": False, "lambda": 0.5}),
                  ({"weight": 0.5, "density": 1.0}, {"normalize": False, "rescale": True, "lambda": 1.0})],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(SETTINGS))
def test_fused_equals_numpy_bit_for_bit(monkeypatch, method, kind):
    """Whole tensors of odd sizes and chunks of 7 / 1000 elements (odd chunk ends), 1-3 models, every
    setting of the method: the fused kernels give the numpy reference's bits."""
    rng = np.random.default_rng(zlib.crc32(f"{method}{kind}".encode()))
    for count, n, chunk in ((1, 1, 7), (2, 4099, 1000), (3, 301, 7)):
        monkeypatch.setattr(methods, "CHUNK", chunk)
        base, models = inputs(kind, n, count, rng)
        for per_model, shared in SETTINGS[method]:
            # the weights and densities differ per model (the second one's density capped at 1)
            settings = [{**per_model, "weight": per_model["weight"] * (1 + i / 4),
                         "density": min(1.0, per_model["density"] * (1 + i))} for i in range(count)]
            job = methods.arrays_job(base, models, per_model=settings, shared=shared, name=f"t.{kind}", seed=3)
            fused, reference = fused_and_reference(method, job, monkeypatch)
            assert same_bits(fused, reference), (method, kind, count, n, shared)


def test_fused_empty_tensor(monkeypatch):
    empty = np.zeros(0, np.float32)
    for method, settings in SETTINGS.items():
        per_model, shared = settings[0]
        job = methods.arrays_job(empty, [empty, empty], per_model=[per_model] * 2, shared=shared)
        fused, reference = fused_and_reference(method, job, monkeypatch)
        assert fused.size == 0 and reference.size == 0


def test_jit_off_runs_the_numpy_reference(monkeypatch):
    def boom(*_):
        raise AssertionError("the fused path ran")

    monkeypatch.setattr(kernels, "prepared", boom)
    monkeypatch.setenv("SOUPKIT_JIT", "0")
    base = np.zeros(3, np.float32)
    job = methods.arrays_job(base, [base + 1], per_model=[{"weight": 2.0, "density": 1.0}],
                             shared={"normalize": False, "rescale": False, "lambda": 1.0})
    assert methods.merge_array("task_arithmetic", job).tolist() == [2.0, 2.0, 2.0]
    monkeypatch.setenv("SOUPKIT_JIT", "1")
    with pytest.raises(AssertionError, match="fused path"):
        methods.merge_array("task_arithmetic", job)


# ---------------------------------------------------------------------------------------------
# TIES: the radix select's cut is np.partition's


@pytest.mark.parametrize("kind", KINDS)
def test_radix_cut_equals_partition(monkeypatch, kind):
    rng = np.random.default_rng(11)
    monkeypatch.setattr(methods, "CHUNK", 333)
    for n in (1, 2, 1000, 5003):
        base, models = inputs(kind, n, 2, rng)
        job = methods.arrays_job(base, models)
        densities = [0.5, 0.013]
        got = kernels.radix_cuts(job, densities)
        for i, density in enumerate(densities):
            want = methods.magnitude_cut(job, i, density, np.empty(n, np.float32))
            assert (got[i].value, got[i].ties) == (want.value, want.ties), (kind, n, i)
            d = np.abs(models[i] - base)
            assert int((d > got[i].value).sum()) + got[i].ties == max(1, int(density * n))


def test_radix_cut_edges():
    base = np.zeros(4, np.float32)
    job = methods.arrays_job(base, [base + 1, base + 2, base + 3])
    full, none, _ = kernels.radix_cuts(job, [1.0, 0.0, 0.5])
    assert full is None and (none.value, none.ties) == (math.inf, 0)
    # bins far apart in the high 16 bits and neighbours in the low 16 bits
    d = np.array([1.0, np.nextafter(np.float32(1), np.float32(2)), 3e-38, 1e30, 1.0], np.float32)
    job = methods.arrays_job(np.zeros(5, np.float32), [d])
    for density, value, ties in ((0.2, 1e30, 1), (0.4, float(d[1]), 1), (0.6, 1.0, 1), (0.8, 1.0, 2), (0.99, 1.0, 2)):
        cut = kernels.radix_cuts(job, [density])[0]
        assert (cut.value, cut.ties) == (float(np.float32(value)), ties), density


# ---------------------------------------------------------------------------------------------
# TIES: the one-pass windowed select (a sample brackets the cut) is np.partition's too


def small_samples(monkeypatch, sigmas: float = 8.0) -> dict[str, int]:
    """Samples of 64+ elements in runs of 8, so tensors of a few thousand elements take the window
    path; returns counters of the windowed and radix selects that ran."""
    monkeypatch.setattr(kernels, "SAMPLE_MIN", 64)
    monkeypatch.setattr(kernels, "SAMPLE_RUN", 8)
    monkeypatch.setattr(kernels, "WINDOW_SIGMAS", sigmas)
    monkeypatch.setattr(kernels, "WINDOW_MAX", 1.0)  # such small samples give wide windows
    ran = {"window": 0, "radix": 0}
    window_count, radix_cuts = kernels.window_count, kernels.radix_cuts

    def counted_window(*args):
        ran["window"] += 1
        return window_count(*args)

    def counted_radix(*args):
        ran["radix"] += 1
        return radix_cuts(*args)

    monkeypatch.setattr(kernels, "window_count", counted_window)
    monkeypatch.setattr(kernels, "radix_cuts", counted_radix)
    return ran


@pytest.mark.parametrize("kind", KINDS)
def test_windowed_cut_equals_partition(monkeypatch, kind):
    """Every kind of magnitudes, densities at both ends and chunks that split the window pass: the
    windowed select's value and count of equal elements kept are np.partition's (``magnitude_cut``)."""
    rng = np.random.default_rng(12)
    monkeypatch.setattr(methods, "CHUNK", 777)
    ran = small_samples(monkeypatch)
    for n in (65, 2000, 9001):
        base, models = inputs(kind, n, 3, rng)
        job = methods.arrays_job(base, models)
        densities = [0.5, 0.013, 0.97]
        got = kernels.ties_cuts(job, densities)
        for i, density in enumerate(densities):
            want = methods.magnitude_cut(job, i, density, np.empty(n, np.float32))
            assert (got[i].value, got[i].ties) == (want.value, want.ties), (kind, n, i)
    assert ran["window"] > 0


def test_windowed_cut_reads_bfloat16_as_stored(monkeypatch):
    """bfloat16 inputs (uint16 bits, many equal magnitudes) through the window path: the cuts are
    np.partition's on the widened inputs."""
    ran = small_samples(monkeypatch)
    monkeypatch.setattr(methods, "CHUNK", 1000)
    rng = np.random.default_rng(18)
    base = rng.standard_normal(12001).astype(np.float32) * 0.02
    stored = [(a.view(np.uint32) >> 16).astype(np.uint16)
              for a in (base, *(base + 0.002 * rng.standard_normal(12001).astype(np.float32) for _ in range(2)))]
    widened = [(a.astype(np.uint32) << 16).view(np.float32) for a in stored]
    job = methods.arrays_job(widened[0], widened[1:])
    job.stored = lambda j, s, e: stored[j][s:e]
    got = kernels.ties_cuts(job, [0.5, 0.2])
    for i, density in enumerate((0.5, 0.2)):
        want = methods.magnitude_cut(job, i, density, np.empty(12001, np.float32))
        assert (got[i].value, got[i].ties) == (want.value, want.ties), i
        assert got[i].ties > 1  # equal magnitudes at the cut
    assert ran["window"] > 0


def test_windowed_cut_takes_one_pass_on_spread_magnitudes(monkeypatch):
    """Distinct magnitudes: every cut is settled by the window pass (no radix select)."""
    ran = small_samples(monkeypatch)
    rng = np.random.default_rng(13)
    base, models = inputs("random", 20000, 2, rng)
    job = methods.arrays_job(base, models)
    kernels.ties_cuts(job, [0.3, 0.6])
    assert ran == {"window": 1, "radix": 0}


@pytest.mark.parametrize("kind", ["random", "cut-ties", "zeros"])
def test_windowed_cut_with_the_shipped_sample_sizes(monkeypatch, kind):
    """A tensor of 300,000 elements (above SAMPLE_MIN) with the shipped sample and window sizes: the
    cuts are np.partition's, and spread magnitudes need no radix select."""
    ran = {"radix": 0}
    radix_cuts = kernels.radix_cuts

    def counted(*args):
        ran["radix"] += 1
        return radix_cuts(*args)

    monkeypatch.setattr(kernels, "radix_cuts", counted)
    n = 300_000
    base, models = inputs(kind, n, 2, np.random.default_rng(17))
    job = methods.arrays_job(base, models)
    got = kernels.ties_cuts(job, [0.5, 0.05])
    for i, density in enumerate((0.5, 0.05)):
        want = methods.magnitude_cut(job, i, density, np.empty(n, np.float32))
        assert (got[i].value, got[i].ties) == (want.value, want.ties), (kind, i)
    if kind == "random":
        assert ran["radix"] == 0


def test_a_wide_window_goes_to_the_radix_select(monkeypatch):
    ran = small_samples(monkeypatch)
    monkeypatch.setattr(kernels, "WINDOW_MAX", 0.0)
    base, models = inputs("random", 20000, 2, np.random.default_rng(16))
    job = methods.arrays_job(base, models)
    got = kernels.ties_cuts(job, [0.3, 1.0])
    want = methods.magnitude_cut(job, 0, 0.3, np.empty(20000, np.float32))
    assert (got[0].value, got[0].ties) == (want.value, want.ties) and got[1] is None
    assert ran == {"window": 0, "radix": 1}


@pytest.mark.parametrize("kind", ["random", "cut-ties", "zeros"])
@pytest.mark.parametrize("sample", ["smallest", "largest", "narrow"])
def test_windowed_cut_falls_back_when_the_sample_misleads(monkeypatch, kind, sample):
    """A sample that misleads puts the window below the true cut, above it, or (zero width) beside
    it: the radix select answers instead, with the same cut."""
    ran = small_samples(monkeypatch, sigmas=0.0)
    rng = np.random.default_rng(14)
    base, models = inputs(kind, 5000, 2, rng)
    job = methods.arrays_job(base, models)
    true_sample = kernels.sample_magnitudes

    def misleading(b, x, starts, run, out):
        true_sample(b, x, starts, run, out)
        if sample == "smallest":
            out[:] = out.min()
        elif sample == "largest":
            out[:] = np.abs(x - b).view(np.uint32).max()

    monkeypatch.setattr(kernels, "sample_magnitudes", misleading)
    got = kernels.ties_cuts(job, [0.1, 0.5])
    for i, density in enumerate((0.1, 0.5)):
        want = methods.magnitude_cut(job, i, density, np.empty(5000, np.float32))
        assert (got[i].value, got[i].ties) == (want.value, want.ties), (kind, i)
    if sample != "narrow":
        assert ran["radix"] == 1


def test_windowed_ties_merge_equals_numpy_bit_for_bit(monkeypatch):
    """The whole fused TIES merge with the window path and odd chunk ends gives numpy's bits."""
    small_samples(monkeypatch)
    monkeypatch.setattr(methods, "CHUNK", 1000)
    rng = np.random.default_rng(15)
    for kind in KINDS:
        base, models = inputs(kind, 7001, 3, rng)
        job = methods.arrays_job(base, models, per_model=[{"weight": 0.4 + i / 5, "density": 0.2 + i / 4}
                                                           for i in range(3)],
                                 shared={"normalize": True, "rescale": True, "lambda": 1.0})
        fused, reference = fused_and_reference("ties", job, monkeypatch)
        assert same_bits(fused, reference), kind


# ---------------------------------------------------------------------------------------------
# DARE: a counter-based mask


def test_dare_mask_is_independent_of_chunking_and_seeded():
    whole = methods.dare_mask(7, "model.layers.0.mlp.up_proj.weight", 1, 0, 100_003, 0.3)
    pieces = [methods.dare_mask(7, "model.layers.0.mlp.up_proj.weight", 1, s, min(s + 997, 100_003), 0.3)
              for s in range(0, 100_003, 997)]
    assert np.array_equal(whole, np.concatenate(pieces))
    for other in (methods.dare_mask(8, "model.layers.0.mlp.up_proj.weight", 1, 0, 100_003, 0.3),
                  methods.dare_mask(7, "model.layers.1.mlp.up_proj.weight", 1, 0, 100_003, 0.3),
                  methods.dare_mask(7, "model.layers.0.mlp.up_proj.weight", 0, 0, 100_003, 0.3)):
        # independent masks agree on p^2 + (1-p)^2 = 58% of the elements
        assert abs(float((whole == other).mean()) - 0.58) < 0.01


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9])
def test_dare_mask_kept_fraction_within_binomial_bound(density):
    n = 1_000_000
    kept = int(methods.dare_mask(123, "w", 0, 0, n, density).sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 5 * sigma
    assert not methods.dare_mask(1, "w", 0, 0, 1000, 0.0).any()


def test_dare_mask_matches_the_splitmix64_formula():
    """Element k of the mask, recomputed with Python integers from the documented formula."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    key = methods.dare_key(5, "emb", 2)
    mask = methods.dare_mask(5, "emb", 2, 40, 90, 0.37)
    for k in range(40, 90):
        assert mask[k - 40] == (mix((key + (k + 1) * 0x9E3779B97F4A7C15) % 2**64) >> 11 < int(0.37 * 2**53))


def test_dare_fused_mask_is_chunk_independent_and_rescale_is_the_l1_ratio(monkeypatch):
    """One model, weight 1, no sign conflict: the merge is base + d * mask * (|d|_1 / |d * mask|_1),
    the L1 norms summed exactly (math.fsum) and the scale rounded once to float32."""
    rng = np.random.default_rng(2)
    n = 10_007
    base = rng.standard_normal(n).astype(np.float32)
    x = base + rng.standard_normal(n).astype(np.float32)
    job = methods.arrays_job(base, [x], per_model=[{"weight": 1.0, "density": 0.4}], name="w", seed=9,
                             shared={"normalize": False, "rescale": True, "lambda": 1.0})
    monkeypatch.setenv("SOUPKIT_JIT", "1")
    outs = []
    for chunk in (n, 1000, 7):
        monkeypatch.setattr(methods, "CHUNK", chunk)
        outs.append(methods.merge_array("dare_ties", job))
    assert all(same_bits(o, outs[0]) for o in outs)
    d = x - base
    mask = methods.dare_mask(9, "w", 0, 0, n, 0.4)
    scale = np.float32(math.fsum(np.abs(d).astype(float)) / math.fsum(np.abs(d[mask]).astype(float)))
    want = base + (d * mask * scale) * np.float32(1.0)
    assert same_bits(outs[0], want.astype(np.float32))


def test_l1_norm_is_the_exactly_rounded_sum():
    rng = np.random.default_rng(4)
    for values in (np.abs(rng.standard_normal(5000)) * 10.0 ** rng.integers(-40, 38, 5000),
                   np.array([1e30, 1.0, -0.0, 1e-45, 3e-39]), np.zeros(0)):
        mags = np.abs(values.astype(np.float32))
        assert methods.l1_norm(methods.l1_histogram(mags)) == math.fsum(mags.astype(float))
    assert math.isnan(methods.l1_norm(methods.l1_histogram(np.array([np.inf, 1.0], np.float32))))


@pytest.mark.parametrize("method", list(SETTINGS))
def test_fused_reads_bfloat16_as_stored(monkeypatch, method):
    """Inputs stored as bfloat16 (uint16 bits): the kernels widen them in their loop and give the bits
    of the numpy reference on the widened float32 inputs."""
    rng = np.random.default_rng(8)
    monkeypatch.setattr(methods, "CHUNK", 1000)
    stored = [(rng.standard_normal(2501).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for _ in range(3)]
    widened = [(s.astype(np.uint32) << 16).view(np.float32) for s in stored]
    for per_model, shared in SETTINGS[method]:
        job = methods.arrays_job(widened[0], widened[1:], per_model=[per_model] * 2, shared=shared, name="w")
        job.stored = lambda j, s, e: stored[j][s:e]
        fused, reference = fused_and_reference(method, job, monkeypatch)
        assert same_bits(fused, reference), shared


# ---------------------------------------------------------------------------------------------
# slerp, task_slerp, model_stock: the statistics are float64 sums in another order (a few ulps of
# float64 apart); given numpy's statistics, the fused output pass gives numpy's bits


def numpy_dots(job: methods.TensorJob, delta: bool, count: int, rows: int, width: int, step=None) -> np.ndarray:
    """The reference's dot products, in ``kernels._dots``'s layout (rows x pairs)."""
    pairs = methods.stock_pairs(count)
    dots = np.zeros((rows, len(pairs)))
    for s, e in job.spans(step):
        vectors = methods._deltas(job, s, e) if delta else [job.read(0, s, e), job.read(1, s, e)]
        vectors = [v.astype(np.float64).reshape(-1, width if rows > 1 else e - s) for v in vectors]
        rows_here = slice(s // width, e // width) if rows > 1 else slice(0, 1)
        for j, (a, b) in enumerate(pairs):
            dots[rows_here, j] += (vectors[a] * vectors[b]).sum(axis=-1)
    return dots


CASES = [("slerp", 1, {"t": 0.3}, (4099,)), ("task_slerp", 2, {"t": 0.7}, (4099,)), ("task_slerp", 3, {"t": 0.5}, (501,)),
         ("model_stock", 2, {"filter_wise": False}, (4099,)), ("model_stock", 3, {"filter_wise": True}, (37, 29))]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_slerp_and_stock(monkeypatch, case):
    method, count, shared, shape = CASES[case]
    rng = np.random.default_rng(case)
    monkeypatch.setattr(methods, "CHUNK", 1000)
    n = math.prod(shape)
    base = rng.standard_normal(n).astype(np.float32)
    models = [base + (0.1 * rng.standard_normal(n)).astype(np.float32) for _ in range(count)]
    if method == "task_slerp" and count == 3:
        models[2] = models[0].copy()  # parallel task vectors: the linear fallback
    job = methods.arrays_job(base, models, shape=shape, shared=shared)
    rows = shape[0] if len(shape) > 1 and shared.get("filter_wise") else 1
    width = n // rows
    step = max(1, 1000 // width) * width if rows > 1 else None
    delta, vectors = method != "slerp", (count if method != "slerp" else 2)
    fused_dots = kernels._dots(job, delta, vectors, rows, width, step)
    exact = numpy_dots(job, delta, vectors, rows, width, step)
    np.testing.assert_allclose(fused_dots, exact, rtol=1e-12)
    fused, reference = fused_and_reference(method, job, monkeypatch)
    np.testing.assert_allclose(fused, reference, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(reference).max())
    monkeypatch.setattr(kernels, "_dots", numpy_dots)
    fused, reference = fused_and_reference(method, job, monkeypatch)
    assert same_bits(fused, reference)


def test_dots_are_float64_sums_of_exact_products():
    """math.fsum of the exact float64 products, against the kernel's reassociated sum."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(9001).astype(np.float32)
    x = (base + rng.standard_normal(9001)).astype(np.float32)
    job = methods.arrays_job(base, [x])
    dots = kernels._dots(job, True, 1, 1, 1)
    d = (x - base).astype(np.float64)
    assert dots[0, 0] == pytest.approx(math.fsum(d * d), rel=1e-13)


def test_numba_is_imported_only_by_the_task_vector_methods(tmp_path):
    """The uniform soup's path never pays numba's import (~0.35 s); task_arithmetic does."""
    import subprocess
    import sys

    from tests.conftest import make_model

    a, b = make_model(tmp_path / "a", seed=1), make_model(tmp_path / "b", seed=2)
    code = ("import sys; from soupkit import run_merge; "
            "run_merge({{'merge': {{'method': {method!r}, 'output': {out!r}, {models}}}}}); "
            "print('numba' in sys.modules)")
    uniform = code.format(method="uniform", out=str(tmp_path / "u"), models=f"'models': [{str(a)!r}, {str(b)!r}]")
    task = code.format(method="task_arithmetic", out=str(tmp_path / "t"),
                       models=f"'base': {str(a)!r}, 'models': [{{'model': {str(b)!r}, 'weight': 1.0}}]")
    runs = [subprocess.run([sys.executable, "-c", c], check=True, capture_output=True, text=True).stdout.split()[-1]
            for c in (uniform, task)]
    assert runs == ["False", "True"]


@pytest.mark.parametrize("spread", [0, 3, 40])
def test_kernel_l1_histograms_are_exact(spread):
    """The kernel's L1 sums (one int64 sum per block where the exponents span <= 26, a bin per element
    elsewhere) are math.fsum's, before and after DARE's drop; an infinity makes them NaN."""
    rng = np.random.default_rng(spread)
    n = 3 * kernels.BLOCK + 5
    base = np.zeros(n, np.float32)
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-spread, 1, n)).astype(np.float32)
    x[::7] = 0
    x[5] = 1e-45 if spread else x[5]  # a denormal
    before, after = np.zeros((1, methods.L1_BINS), np.int64), np.zeros((1, methods.L1_BINS), np.int64)
    key, thresh = methods.dare_key(1, "w", 0), methods.dare_threshold(0.3)
    kernels.l1_histograms(base, (x,), np.array([kernels.DROP]), np.zeros(1, np.float32), np.zeros(1, np.int64),
                          np.array([key], np.uint64), np.array([thresh], np.uint64), 0, before, after)
    keep = methods.dare_mask(1, "w", 0, 0, n, 0.3)
    assert methods.l1_norm(before[0]) == math.fsum(np.abs(x).astype(float))
    assert methods.l1_norm(after[0]) == math.fsum(np.abs(x[keep]).astype(float))
    x[100] = np.inf
    kernels.l1_histograms(base, (x,), np.array([kernels.DROP]), np.zeros(1, np.float32), np.zeros(1, np.int64),
                          np.array([key], np.uint64), np.array([thresh], np.uint64), 0, before, after)
    assert math.isnan(methods.l1_norm(before[0]))
    # a model kept whole is skipped: its histograms stay empty (its rescale, 1, is never applied)
    empty = np.zeros((1, methods.L1_BINS), np.int64), np.zeros((1, methods.L1_BINS), np.int64)
    kernels.l1_histograms(base, (x,), np.array([kernels.KEEP_ALL]), np.zeros(1, np.float32), np.zeros(1, np.int64),
                          np.zeros(1, np.uint64), np.zeros(1, np.uint64), 0, *empty)
    assert not empty[0].any() and not empty[1].any()


def test_narrow_bf16_equals_the_engines_rounding():
    """Random values, exact halfway cases (ties to even both ways), infinities, NaNs of both signs,
    denormals and the largest finite values (which round to infinity)."""
    from soupkit.merge.engine import Buffers, round_bf16

    rng = np.random.default_rng(9)
    bits = np.concatenate([rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F800000, 0xFF800000, 0x7FC00001,
                                     0xFFFFFFFF, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0, 0x80000000],
                                    np.uint32)])
    values = bits.view(np.float32)
    got = np.empty(values.size, np.uint16)
    kernels.narrow_bf16(values, got)
    assert np.array_equal(got, round_bf16(values, Buffers(values.size)))
