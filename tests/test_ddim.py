"""Our DDIM module vs diffusers' FlaxDDIMScheduler (the oracle) and analytic identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.method import ddim
from tests.ddim_oracle import ddim_oracle as _oracle


def test_reference_schedule():
    s = ddim.make_schedule(500)
    t = np.asarray(s.timesteps)
    assert t[0] == 999 and t[-1] == 1 and len(t) == 500 and np.all(np.diff(t) == -2)
    ac = np.asarray(s.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(s.abar_prev)[-1], ac[0])  # no "alpha to one"
    np.testing.assert_allclose(np.asarray(s.abar_prev)[:-1], ac[t[:-1] - 2])


@pytest.mark.parametrize("num_steps", [500, 50, 7])
def test_schedule_and_step_match_diffusers(num_steps):
    sched, state = _oracle(num_steps)
    ours = ddim.make_schedule(num_steps)
    np.testing.assert_array_equal(np.asarray(state.timesteps), np.asarray(ours.timesteps))
    # fp32 cumulative products of 1000 factors: diffusers (jnp.cumprod) and numpy round differently
    np.testing.assert_allclose(state.common.alphas_cumprod, ours.alphas_cumprod, rtol=1e-5)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(1, 4, 8, 8)), jnp.float32)
    for i in (0, num_steps // 2, num_steps - 1):
        eps = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
        t = int(ours.timesteps[i])
        ref = sched.step(state, eps, t, z, eta=0.0).prev_sample
        got = ddim.step(z, eps, ours.abar[i], ours.abar_prev[i])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_renoise_and_add_noise_are_the_forward_chain():
    """renoise(add_noise(x0, n1, a_prev), a, a_prev, n2) has the law of add_noise(x0, ., a)."""
    a, a_prev = 0.3, 0.6
    x0 = jnp.ones((200_000,)) * 0.7
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    z_prev = ddim.add_noise(x0, jax.random.normal(k1, x0.shape), a_prev)
    z = ddim.renoise(z_prev, a, a_prev, jax.random.normal(k2, x0.shape))
    np.testing.assert_allclose(float(z.mean()), np.sqrt(a) * 0.7, atol=5e-3)
    np.testing.assert_allclose(float(z.var()), 1 - a, atol=5e-3)


def test_inversion_inverts_a_step_with_the_same_eps():
    """With eps held fixed, a DDIM step and an inversion step are exact inverses."""
    rng = np.random.default_rng(1)
    z, eps = (jnp.asarray(rng.normal(size=(4, 16)), jnp.float32) for _ in range(2))
    s = ddim.make_schedule(50)
    z_prev = ddim.step(z, eps, s.abar[10], s.abar_prev[10])
    back = ddim.invert_step(z_prev, eps, s.abar[10], s.abar_prev[10])
    np.testing.assert_allclose(back, z, rtol=1e-4, atol=1e-4)


def test_eta_needs_noise_and_matches_formula():
    z, eps, n = jnp.ones(3), jnp.zeros(3), jnp.ones(3)
    with pytest.raises(ValueError):
        ddim.step(z, eps, 0.5, 0.8, eta=1.0)
    sigma = np.sqrt((1 - 0.8) / (1 - 0.5) * (1 - 0.5 / 0.8))
    want = np.sqrt(0.8) * (1 / np.sqrt(0.5)) + sigma
    np.testing.assert_allclose(ddim.step(z, eps, 0.5, 0.8, eta=1.0, noise=n), want, rtol=1e-6)
