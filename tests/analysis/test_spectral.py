import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign.analysis import spectral


def test_intruder_count_of_w0_itself_is_zero():
    w0 = np.random.default_rng(0).normal(size=(8, 6))
    assert len(spectral.intruder_dimensions(w0, w0, k=6, threshold=0.99)) == 0
    np.testing.assert_allclose(spectral.max_cosine(w0, w0, k=6), 1.0, atol=1e-6)
    # A re-weighting of W0's own directions is not an intruder either.
    u, s, vh = np.linalg.svd(w0, full_matrices=False)
    reweighted = u @ np.diag(s[::-1] * 3) @ vh
    assert len(spectral.intruder_dimensions(w0, reweighted, k=6, threshold=0.99)) == 0


def test_intruder_hand_case():
    # W0 = diag(4, 3, 2, 1): its singular vectors are the standard basis. Adding 10 * v v^T with
    # v = (1, 1, 1, 1) / 2 makes v (nearly) the top singular vector; |cos| with every e_i is 0.5.
    w0 = np.diag([4.0, 3.0, 2.0, 1.0])
    v = np.full(4, 0.5)
    w_ft = w0 + 10.0 * np.outer(v, v)
    cos = spectral.max_cosine(w0, w_ft, k=1)
    assert 0.5 <= cos[0] < 0.65
    np.testing.assert_array_equal(spectral.intruder_dimensions(w0, w_ft, k=1, threshold=0.7), [0])
    assert len(spectral.intruder_dimensions(w0, w_ft, k=1, threshold=0.5)) == 0
    # Only W0's top-1 direction (e_1) as reference: lower-ranked directions become intruders too.
    assert len(spectral.intruder_dimensions(w0, w0, k=4, threshold=0.5, m=1)) == 3


def test_sides_are_input_and_output_spaces():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3))  # [in, out]
    s, vo = spectral.singular_vectors(w, side="output")
    _, vi = spectral.singular_vectors(w, side="input")
    assert vo.shape == (3, 3) and vi.shape == (5, 3)
    np.testing.assert_allclose(w @ vo, vi * s, atol=1e-5)  # W v_j = s_j u_j
    with pytest.raises(ValueError, match="side"):
        spectral.singular_vectors(w, side="left")
    with pytest.raises(ValueError, match="2-D"):
        spectral.singular_vectors(np.zeros(3))


def test_intruder_counts_over_param_trees():
    rng = np.random.default_rng(2)
    p0 = {"layers_0": {"q": {"kernel": rng.normal(size=(6, 6))}, "n": {"scale": np.ones(6)}},
          "layers_1": {"q": {"kernel": rng.normal(size=(6, 4))}}}
    p1 = {"layers_0": {"q": {"kernel": p0["layers_0"]["q"]["kernel"]}, "n": {"scale": np.ones(6)}},
          "layers_1": {"q": {"kernel": p0["layers_1"]["q"]["kernel"]
                             + 50.0 * np.outer(rng.normal(size=6), rng.normal(size=4))}}}
    counts = spectral.intruder_counts(p0, p1, k=10, threshold=0.6)
    assert counts["layers_0/q"] == 0 and set(counts) == {"layers_0/q", "layers_1/q"}
    assert counts["layers_1/q"] >= 0
    assert spectral.intruder_counts(p0, p1, select=lambda p: p.startswith("layers_0")) == {"layers_0/q": 0}
    with pytest.raises(ValueError, match="different kernels"):
        spectral.intruder_counts(p0, {"layers_0": p1["layers_0"]})


def test_effective_rank_hand_values():
    assert spectral.effective_rank([3.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert spectral.effective_rank([2.0, 2.0, 2.0, 2.0]) == pytest.approx(4.0)
    assert spectral.effective_rank([0.0, 0.0]) == 0.0


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 3), seed=st.integers(0, 1000))
def test_update_spectrum_of_rank_r_update(r, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(8, 6))
    dw = rng.normal(size=(8, r)) @ rng.normal(size=(r, 6))
    out = spectral.update_spectrum(w0, w0 + dw, k=r)
    s = out["singular_values"]
    assert np.sum(s > 1e-5 * s[0]) == r  # a rank-r update has r nonzero singular values
    assert 1.0 <= out["stable_rank"] <= r + 1e-5
    assert 1.0 - 1e-9 <= out["effective_rank"] <= r + 1e-3
    assert out["relative_norm"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w0), rel=1e-5)
    assert 0.0 <= out["overlap"] <= 1.0 + 1e-9


def test_update_spectrum_overlap_and_amplification_hand_case():
    w0 = np.diag([5.0, 1.0, 0.5])
    same = spectral.update_spectrum(w0, w0 + np.diag([1.0, 0, 0]), k=1)
    assert same["overlap"] == pytest.approx(1.0)  # dW boosts W0's top direction
    assert same["amplification"] == pytest.approx(1.0 / 5.0)
    new = spectral.update_spectrum(w0, w0 + np.diag([0, 0, 2.0]), k=1)
    assert new["overlap"] == pytest.approx(0.0, abs=1e-12)
    assert new["amplification"] == pytest.approx(2.0 / 0.5)


def test_plots(tmp_path):
    counts = {"full": {"layers_0/q": 0, "layers_1/q": 1}, "lora r=1": {"layers_0/q": 2, "layers_1/q": 3}}
    spectral.plot_intruder_counts(counts, tmp_path / "c.png")
    spectral.plot_spectra({"full": [3.0, 2.0, 1.0], "lora": [3.0, 1e-9, 0.0]}, tmp_path / "s.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "s.png").stat().st_size > 1000
