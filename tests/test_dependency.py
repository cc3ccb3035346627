"""zero_from: always +0.0 (never -0.0 or NaN), whatever x holds, eager and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.dependency import zero_from


@pytest.mark.parametrize("first", [0.0, -0.0, 2.5, -7.0, np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_positive_zero_for_any_first_element(first, dtype):
    x = jnp.full((2, 3, 4), first, dtype)
    for z in (zero_from(x), jax.jit(zero_from)(x)):
        assert z.dtype == jnp.float32 and z.shape == ()
        assert np.asarray(z).view(np.uint32) == 0  # bit pattern of +0.0


def test_adding_it_changes_no_value():
    # (-0.0 + 0.0 is +0.0, and XLA:CPU flushes subnormals in any arithmetic op, so neither is kept)
    w = jnp.asarray([-0.0, 1e-30, -3.0, np.inf, np.nan], jnp.float32)
    out = jax.jit(lambda w, x: w + zero_from(x))(w, jnp.full((3,), np.nan))
    np.testing.assert_array_equal(np.asarray(out)[1:], np.asarray(w)[1:])
