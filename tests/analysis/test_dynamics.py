import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.analysis import dynamics
from jaxalign.analysis.tax import make_completion_scorer
from jaxalign.data.synthetic import sample_problems


def test_squeeze_first_order_hand_values():
    # Uniform over 4: sum p^2 = 0.25 = p_k, so every other class gains 0.25 per unit step.
    d = dynamics.squeeze_first_order(jnp.full(4, 0.25), 3)
    np.testing.assert_allclose(d, [0.25, 0.25, 0.25, -0.75], rtol=1e-6)
    # Peaked: p = (0.7, 0.1, 0.1, 0.1), pushing down class 3. sum p^2 = 0.52: the top class gains
    # 0.7 + 0.1 - 0.52 = 0.28 while the other unlikely classes lose 0.1 + 0.1 - 0.52 = -0.32.
    d = dynamics.squeeze_first_order(jnp.array([0.7, 0.1, 0.1, 0.1]), 3)
    np.testing.assert_allclose(d, [0.28, -0.32, -0.32, 0.1 - 1 + 0.1 - 0.52], rtol=1e-5)


def test_squeeze_first_order_matches_a_small_step():
    z = jnp.array([2.0, 0.5, -1.0, 0.0, 1.0])
    for k in range(5):
        eta = 1e-3
        new = dynamics.negative_gradient_step(z, k, eta)
        finite = (jax.nn.log_softmax(new) - jax.nn.log_softmax(z)) / eta
        np.testing.assert_allclose(finite, dynamics.squeeze_first_order(jax.nn.softmax(z), k),
                                   atol=2e-3)
        assert jax.nn.log_softmax(new)[k] < jax.nn.log_softmax(z)[k]  # the pushed class falls


def test_make_probe_set_groups(tiny):
    _, _, tok = tiny
    probe, groups = dynamics.make_probe_set(tok, n=3, seed=1, num_similar=2, num_random=2,
                                            greedy=["1", "22", "333"])
    assert {g: v.shape for g, v in groups.items()} == {
        "chosen": (3, 1), "rejected": (3, 1), "similar": (3, 2), "random": (3, 2), "greedy": (3, 1)}
    assert len(probe.examples) == 3 * (1 + 1 + 2 + 2 + 1)
    problems = sample_problems(3, seed=1, digits=2, operators="+", split="test")

    def completion(row):
        ex = probe.examples[row]
        ids = [t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
        return tok.decode(ids, skip_special_tokens=True)

    for i, pr in enumerate(problems):
        assert completion(groups["chosen"][i, 0]) == pr.answer
        wrong = {completion(r) for r in list(groups["rejected"][i]) + list(groups["similar"][i])}
        assert pr.answer not in wrong
    assert completion(groups["greedy"][2, 0]) == "333"
    with pytest.raises(ValueError, match="greedy"):
        dynamics.make_probe_set(tok, n=2, greedy=["1"])


def test_probe_logps_trajectory_and_change(tiny, tmp_path):
    model, params, tok = tiny
    probe, groups = dynamics.make_probe_set(tok, n=2, num_similar=1, num_random=1)
    scorer = make_completion_scorer(model)
    rec0 = dynamics.probe_logps(scorer, {"params": params}, probe, groups)
    assert rec0["chosen"].shape == (2, 1) and (rec0["chosen"] < 0).all()
    shifted = {g: v - 1.0 for g, v in rec0.items()}
    traj = dynamics.logp_trajectory([rec0, shifted, shifted])
    assert traj["random"].shape == (3, 2, 1)
    change = dynamics.per_step_change(traj)
    np.testing.assert_allclose(change["chosen"], [-1.0, 0.0], atol=1e-6)
    path = dynamics.plot_dynamics(traj, tmp_path / "dyn.png")
    assert (tmp_path / "dyn.png").stat().st_size > 1000 and path.endswith("dyn.png")
    with pytest.raises(ValueError, match="no records"):
        dynamics.logp_trajectory([])
