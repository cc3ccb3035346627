"""computed_once: same values, gradients and vmap as the plain call, as its own XLA computation."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.fusion import computed_once


def _tables(pos):
    return jnp.cos(pos * 0.5), jnp.sin(pos * 0.25)


def test_values_match_and_nan_first_element_is_fine():
    pos = jnp.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    for x in (pos, pos.at[0, 0].set(jnp.nan)):
        got = jax.jit(lambda p: computed_once(_tables, p))(x)
        want = _tables(x)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_is_a_separate_computation_in_the_compiled_program():
    f = jax.jit(lambda p, x: x * computed_once(jnp.cos, p)[None] + x)
    hlo = f.lower(jnp.ones(8), jnp.ones((4, 8))).compile().as_text()
    assert "conditional" in hlo


def test_gradient_and_vmap_are_those_of_fn():
    x = jnp.linspace(-1.0, 2.0, 7)
    g = jax.grad(lambda v: jnp.sum(computed_once(jnp.sin, v) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(2 * jnp.sin(x) * jnp.cos(x)), rtol=1e-6)
    batched = jax.vmap(lambda v: computed_once(jnp.exp, v))(x.reshape(7, 1))
    np.testing.assert_allclose(np.asarray(batched), np.asarray(jnp.exp(x.reshape(7, 1))), rtol=1e-6)


def test_no_array_leaves_runs_inline():
    assert computed_once(lambda a, b: a + b, 2, 3) == 5
    assert computed_once(lambda e: e.shape, jnp.zeros((0, 3))) == (0, 3)
