"""Parity of wan_runtime.schedulers with diffusers' UniPC / flow-match Euler schedulers (CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wan_runtime import schedulers

KINDS = ("unipc", "euler")
STEPS = (1, 2, 3, 5, 10, 20, 50)
SHIFTS = (3.0, 5.0, 12.0)
SHAPE = (1, 16, 3, 8, 10)  # (B, C, F, H, W) latents
# Worst step of a trajectory vs diffusers, relative L2. Measured: Euler 2.7e-8 - 4.9e-8 at every step count;
# UniPC grows with the step count as float32 rounding accumulates through its multistep history (4.6e-8 at
# 1 step, 2.0e-7 at 20, 3.6e-7 at 50), so its bound is set on the 50-step figure.
RTOL = {"unipc": 5e-6, "euler": 1e-6}


def diffusers_scheduler(kind, num_steps, shift):
    if kind == "unipc":  # as the Wan pipelines configure it
        sched = UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
            disable_corrector=[],
        )
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    sched.set_begin_index(0)  # as WanPipeline does
    return sched


def inputs(num_steps):
    """Initial latents, and the fake model's fixed noise tensors [2, *SHAPE] and per-step scales
    [N, 2]; the second, oscillating, term makes successive x0 predictions differ markedly."""
    rng = np.random.default_rng(num_steps)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((2,) + SHAPE).astype(np.float32)
    i = np.arange(num_steps)
    scale = np.stack([np.linspace(1.0, 0.2, num_steps), 0.5 * np.cos(i)], 1).astype(np.float32)
    return x, noise, scale


def fake_model(x, noise, scale_i):
    """Deterministic stand-in for the transformer's flow prediction v(x, t_i)."""
    return 0.3 * x + scale_i[0] * noise[0] + scale_i[1] * noise[1]


def torch_trajectory(kind, num_steps, shift):
    x, noise, scale = map(torch.from_numpy, inputs(num_steps))
    sched = diffusers_scheduler(kind, num_steps, shift)
    out = []
    for i, t in enumerate(sched.timesteps):
        v = fake_model(x, noise, scale[i])
        x = sched.step(v, t, x, return_dict=False)[0]
        out.append(x.numpy())
    return np.stack(out)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _jax_scan(arrays, state, x, noise, scale, num_steps):
    def body(carry, i):
        x, state = carry
        v = fake_model(x, noise, scale[i])
        x, state = schedulers.step(arrays, state, i, v, x)
        return (x, state), x

    _, xs = jax.lax.scan(body, (x, state), jnp.arange(num_steps))
    return xs


def jax_trajectory(kind, num_steps, shift):
    x, noise, scale = inputs(num_steps)
    sched = schedulers.make_schedule(kind, num_steps, shift)
    state = schedulers.init_state(sched, x)
    return np.asarray(_jax_scan(sched.arrays, state, x, noise, scale, num_steps))


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS + (100, 200))
@pytest.mark.parametrize("kind", KINDS)
def test_timesteps_and_sigmas_match(kind, num_steps, shift):
    ref = diffusers_scheduler(kind, num_steps, shift)
    ours = schedulers.make_schedule(kind, num_steps, shift)
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype
    np.testing.assert_array_equal(ours.timesteps, ref_t)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert ours.num_steps == num_steps


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("kind", KINDS)
def test_trajectory_matches_diffusers(kind, num_steps, shift, measured):
    ref = torch_trajectory(kind, num_steps, shift)
    got = jax_trajectory(kind, num_steps, shift)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    rel = np.linalg.norm((got - ref).reshape(num_steps, -1), axis=1) / np.linalg.norm(
        ref.reshape(num_steps, -1), axis=1
    )
    max_abs = np.abs(got - ref).reshape(num_steps, -1).max(axis=1)
    # the worst step of the trajectory; latents are ~N(0, 1) (scale: the largest |value| of the reference)
    measured(f"component/scheduler/{kind}/steps{num_steps}_shift{shift:g}/max_abs", max_abs.max(),
             rel_l2=float(rel.max()), scale=float(np.abs(ref).max()))
    bad = np.nonzero(rel > RTOL[kind])[0]
    assert bad.size == 0, (
        f"{kind} N={num_steps} shift={shift}: steps {bad.tolist()} exceed rel L2 {RTOL[kind]}; "
        f"rel={np.array2string(rel, precision=2)} max_abs={np.array2string(max_abs, precision=2)}"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_step_keeps_sample_dtype_and_computes_in_float32(kind):
    num_steps, shift = 4, 5.0
    x, noise, _ = inputs(num_steps)
    sched = schedulers.make_schedule(kind, num_steps, shift)
    state = schedulers.init_state(sched, x)
    xb = jnp.asarray(x, jnp.bfloat16)
    v = jnp.asarray(noise[0], jnp.bfloat16)
    out_b, state_b = schedulers.step(sched.arrays, state, 0, v, xb)
    out_f, _ = schedulers.step(sched.arrays, state, 0, v.astype(jnp.float32), xb.astype(jnp.float32))
    assert out_b.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state_b))
    np.testing.assert_array_equal(np.asarray(out_b), np.asarray(out_f.astype(jnp.bfloat16)))


@pytest.mark.parametrize("boundary_ratio", (0.875, 0.9, 0.0, 1.0))
@pytest.mark.parametrize("num_steps", (1, 10, 40, 50))
@pytest.mark.parametrize("kind", KINDS)
def test_expert_boundary_index_matches_pipeline_rule(kind, num_steps, boundary_ratio):
    ref = diffusers_scheduler(kind, num_steps, 12.0)
    boundary = boundary_ratio * ref.config.num_train_timesteps
    # WanPipeline: `transformer` while `t >= boundary_timestep`, else `transformer_2`.
    use_high = [bool(t >= boundary) for t in ref.timesteps]
    k = schedulers.expert_boundary_index(
        schedulers.make_schedule(kind, num_steps, 12.0).timesteps, boundary_ratio
    )
    assert use_high == [True] * k + [False] * (num_steps - k)


def test_unipc_orders_and_corrector_tables():
    sched = schedulers.make_schedule("unipc", 5, 5.0)
    a = sched.arrays
    # order 1 at warm-up and final step; corrector from step 1, of the previous predictor's order.
    np.testing.assert_array_equal(a.predictor.rho_hist, [0.0, 0.5, 0.5, 0.5, 0.0])
    np.testing.assert_array_equal(a.use_corrector, [False, True, True, True, True])
    assert a.corrector.rho_hist[1] == 0.0 and a.corrector.rho_t[1] == 0.5
    assert (a.corrector.rho_hist[2:] != 0.0).all()
    disabled = schedulers.make_schedule("unipc", 5, 5.0, disable_corrector=(0, 2))
    np.testing.assert_array_equal(disabled.arrays.use_corrector, [False, False, True, False, True])
