import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign.analysis import nspo
from jaxalign.train.step import init_state, make_train_step


def _orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return q.astype(np.float32)


def test_project_matrix_hand_case():
    g = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    e1 = jnp.array([[1.0], [0.0], [0.0]])
    np.testing.assert_allclose(nspo.project_matrix(g, e1, side="left"), [[0, 0], [3, 4], [5, 6]])
    e2 = jnp.array([[0.0], [1.0]])
    np.testing.assert_allclose(nspo.project_matrix(g, e2, side="right"), [[1, 0], [3, 0], [5, 0]])
    with pytest.raises(ValueError, match="side"):
        nspo.project_matrix(g, e1, side="middle")


@settings(max_examples=8, deadline=None)
@given(a=st.integers(2, 7), b=st.integers(1, 6), k=st.integers(1, 2), seed=st.integers(0, 1000))
def test_projection_removes_exactly_the_subspace(a, b, k, seed):
    rng = np.random.default_rng(seed)
    k = min(k, a)
    u = _orthonormal(rng, a, k)
    g = rng.normal(size=(a, b)).astype(np.float32)
    p = np.asarray(nspo.project_matrix(jnp.asarray(g), jnp.asarray(u), side="left"))
    np.testing.assert_allclose(u.T @ p, 0.0, atol=1e-5)  # nothing left in span(U)
    np.testing.assert_allclose(p + u @ (u.T @ g), g, atol=1e-5)  # only span(U) was removed
    p2 = np.asarray(nspo.project_matrix(jnp.asarray(p), jnp.asarray(u), side="left"))
    np.testing.assert_allclose(p2, p, atol=1e-5)  # idempotent
    # The right side is the transpose of the left side.
    pr = np.asarray(nspo.project_matrix(jnp.asarray(g.T), jnp.asarray(u), side="right"))
    np.testing.assert_allclose(pr, p.T, atol=1e-5)


def test_matrix_basis_spans_the_gradient_column_space():
    rng = np.random.default_rng(0)
    a_true = rng.normal(size=(6, 2))  # every sample's columns lie in span(a_true)
    samples = np.stack([a_true @ rng.normal(size=(2, 5)) for _ in range(3)]).astype(np.float32)
    u = np.asarray(nspo.matrix_basis(samples, rank=3, side="left"))
    assert u.shape == (6, 3)
    np.testing.assert_allclose(u[:, :2].T @ u[:, :2], np.eye(2), atol=1e-5)
    np.testing.assert_allclose(u[:, 2], 0.0, atol=1e-6)  # the column space has rank 2 only
    for g in samples:  # every capability gradient is removed entirely
        np.testing.assert_allclose(nspo.project_matrix(g, u, side="left"), 0.0, atol=1e-4)
    v = np.asarray(nspo.matrix_basis(np.swapaxes(samples, 1, 2), rank=2, side="right"))
    np.testing.assert_allclose(np.abs(v.T @ u[:, :2]) @ np.ones(2), [1.0, 1.0], atol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        nspo.matrix_basis(samples, rank=7, side="left")
    with pytest.raises(ValueError, match=r"\[n, a, b\]"):
        nspo.matrix_basis(samples[0], rank=1)


def test_matrix_basis_of_zero_gradients_is_empty():
    u = nspo.matrix_basis(np.zeros((2, 4, 3), np.float32), rank=2)
    np.testing.assert_array_equal(u, 0.0)  # LoRA's A at init: no direction to protect


def test_flat_basis_removes_every_sample():
    rng = np.random.default_rng(1)
    samples = {"a": rng.normal(size=(3, 4, 2)).astype(np.float32),
               "b": rng.normal(size=(3, 5)).astype(np.float32)}
    q = nspo.flat_basis(samples, rank=4)
    assert q["a"].shape == (4, 4, 2) and q["b"].shape == (4, 5)
    m = np.concatenate([np.asarray(q["a"]).reshape(4, -1), np.asarray(q["b"])], 1)
    np.testing.assert_allclose(m[:3] @ m[:3].T, np.eye(3), atol=1e-5)
    np.testing.assert_array_equal(m[3], 0.0)  # 3 samples span at most 3 directions
    for i in range(3):
        out = nspo.project_flat({"a": samples["a"][i], "b": samples["b"][i]}, q)
        np.testing.assert_allclose(out["a"], 0.0, atol=1e-5)
        np.testing.assert_allclose(out["b"], 0.0, atol=1e-5)
    g = {"a": rng.normal(size=(4, 2)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    out = nspo.project_flat(g, q)
    flat_out = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])
    np.testing.assert_allclose(m @ flat_out, 0.0, atol=1e-5)


def test_removed_fraction_hand_case():
    basis = {"left": {"w": jnp.array([[1.0], [0.0]])}, "right": {}, "flat": None}
    tree = {"w": jnp.array([[1.0], [1.0]]), "bias": jnp.array([0.0])}
    assert float(nspo.removed_fraction(tree, basis)) == pytest.approx(0.5)
    out = nspo.project(tree, basis)
    np.testing.assert_allclose(out["w"], [[0.0], [1.0]])
    np.testing.assert_array_equal(out["bias"], tree["bias"])  # uncovered leaves pass through
    with pytest.raises(ValueError, match="not in the tree"):
        nspo.project({"v": tree["w"]}, basis)


def test_nspo_basis_sides_and_selection():
    rng = np.random.default_rng(2)
    samples = {"params": {
        "embed_tokens": {"embedding": rng.normal(size=(2, 11, 8)).astype(np.float32)},
        "layers_0": {"attn": {"q_proj": {"kernel": rng.normal(size=(2, 8, 6)).astype(np.float32)}},
                     "input_layernorm": {"scale": rng.normal(size=(2, 8)).astype(np.float32)}}}}
    b = nspo.nspo_basis(samples, rank=3)
    assert set(b["left"]) == {"params/layers_0/attn/q_proj/kernel"}
    assert set(b["right"]) == {"params/embed_tokens/embedding"}
    assert b["left"]["params/layers_0/attn/q_proj/kernel"].shape == (8, 3)
    assert b["right"]["params/embed_tokens/embedding"].shape == (8, 3)
    only_q = nspo.nspo_basis(samples, rank=3, paths=lambda p: p.endswith("/kernel"))
    assert not only_q["right"]
    with pytest.raises(ValueError, match="mode"):
        nspo.nspo_basis(samples, rank=3, mode="diagonal")
    with pytest.raises(ValueError, match="no leaf selected"):
        nspo.nspo_basis(samples, rank=3, paths=lambda p: False)


def _toy_problem(seed=0):
    """A linear least-squares 'model' y = x W with a trainable kernel [6, 3]."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(6, 3)).astype(np.float32)
    xs = rng.normal(size=(16, 6)).astype(np.float32)
    ys = rng.normal(size=(16, 3)).astype(np.float32)

    def loss(trainable, batch):
        pred = batch["x"] @ trainable["params"]["dense"]["kernel"]
        return jnp.mean((pred - batch["y"]) ** 2)

    def objective(trainable, frozen, batch, rng, deterministic=False):
        value = loss(trainable, batch)
        return value, {"loss": value}

    return {"params": {"dense": {"kernel": jnp.asarray(w0)}}}, loss, objective, xs, ys


@pytest.mark.parametrize("where", ["updates", "grads"])
def test_train_step_projection(where):
    trainable, loss, objective, xs, ys = _toy_problem()
    # Capability inputs span only 2 of the 6 input directions.
    rng = np.random.default_rng(3)
    cap_x = (rng.normal(size=(8, 2)) @ rng.normal(size=(2, 6))).astype(np.float32)
    cap_batches = [{"x": cap_x[i:i + 4], "y": rng.normal(size=(4, 3)).astype(np.float32)}
                   for i in (0, 4)]
    basis, same = nspo.basis_for_training(loss, trainable, {}, cap_batches, rank=2)
    assert same is trainable
    u = np.asarray(basis["left"]["params/dense/kernel"])
    opt = optax.adam(0.05)
    kw = {"update_transform" if where == "updates" else "grad_transform": nspo.make_transform()}
    step = make_train_step(objective, opt, **kw)
    state = init_state(jax.tree.map(jnp.copy, trainable), opt, jax.random.PRNGKey(0))
    for i in range(3):
        state, m = step(state, {"nspo": basis}, {"x": xs[4 * i:4 * i + 4], "y": ys[4 * i:4 * i + 4]})
    dw = np.asarray(state["trainable"]["params"]["dense"]["kernel"] - trainable["params"]["dense"]["kernel"])
    assert np.abs(dw).max() > 1e-2  # training moved the weights
    out_change = np.abs(cap_x @ dw).max()
    if where == "updates":
        np.testing.assert_allclose(u.T @ dw, 0.0, atol=1e-5)  # the update stays in the null space
        assert out_change < 1e-4  # outputs on capability inputs are unchanged
        assert "update_norm" in m
    else:  # Adam's per-coordinate scaling takes a projected gradient out of the null space
        assert np.abs(u.T @ dw).max() > 1e-3
