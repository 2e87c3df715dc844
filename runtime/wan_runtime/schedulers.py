"""Flow-matching samplers for Wan 2.1 / 2.2, written to be run inside `jax.lax.scan`.

Two schedulers, numerically matching diffusers as the Wan pipelines configure them:

* ``"unipc"``: `UniPCMultistepScheduler` with flow_prediction, use_flow_sigmas, solver_order=2,
  solver_type="bh2", predict_x0, lower_order_final, final_sigmas_type="zero".
* ``"euler"``: `FlowMatchEulerDiscreteScheduler(shift=s)`.
* ``"euler-linear"``: Euler on ``linspace(1, 0, N + 1)`` shifted (``s * t / (1 + (s - 1) * t)``): the sampler
  the step-distilled Wan LoRAs were trained for (lightx2v's 4-step ``[1000, 750, 500, 250]``, Wan2.2-Lightning).

Everything that depends only on the sigma schedule (timesteps, solver orders, UniPC B(h)
coefficients) is built once on the host with numpy by `make_schedule`.  `step` then only indexes
those [N] tables with a (possibly traced) step index, so it is shape-static and branch-free.

    sched = make_schedule("unipc", num_steps=50, shift=5.0)
    state = init_state(sched, latents)
    def body(carry, i):
        x, st = carry
        v = model(x, jnp.asarray(sched.timesteps)[i])
        x, st = step(sched.arrays, st, i, v, x)
        return (x, st), None
    (latents, _), _ = jax.lax.scan(body, (latents, state), jnp.arange(sched.num_steps))
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class UniPCConfig:
    """UniPC (order 2, bh2, x0-predicting) on shifted flow sigmas."""

    shift: float = 5.0
    num_train_timesteps: int = 1000
    disable_corrector: tuple[int, ...] = ()  # same meaning as diffusers' `disable_corrector`


@dataclasses.dataclass(frozen=True)
class EulerConfig:
    """First-order flow-matching Euler."""

    shift: float = 5.0
    num_train_timesteps: int = 1000


CONFIGS = {"unipc": UniPCConfig, "euler": EulerConfig, "euler-linear": EulerConfig}


# ----------------------------------------------------------------------------- tables / state


class UniCoefs(NamedTuple):
    """Per-step scalars, each [N] float32, of one UniPC update (predictor or corrector):

    x_new = ratio*x - a*m0 - g*(rho_hist*(m1 - m0)/rk + rho_t*(m_t - m0))
    with m0 / m1 the newest / previous x0 predictions of the update's base point and m_t the
    x0 prediction at the update's target (corrector only).
    """

    ratio: np.ndarray
    a: np.ndarray
    g: np.ndarray
    rk: np.ndarray
    rho_hist: np.ndarray
    rho_t: np.ndarray


class UniPCArrays(NamedTuple):
    sigma: np.ndarray  # [N] float32, sigma of the sample entering step i
    use_corrector: np.ndarray  # [N] bool
    predictor: UniCoefs  # step i: sigma[i] -> sigma[i+1]
    corrector: UniCoefs  # step i: re-does sigma[i-1] -> sigma[i] using this step's x0


class EulerArrays(NamedTuple):
    dt: np.ndarray  # [N] float32, sigma[i+1] - sigma[i]


class UniPCState(NamedTuple):
    """Fixed-shape carry; every field has the latents' shape, in the compute dtype."""

    x0_prev: jnp.ndarray  # x0 prediction of step i-1
    x0_prev2: jnp.ndarray  # x0 prediction of step i-2
    last_sample: jnp.ndarray  # (corrected) sample that entered step i-1


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    config: Union[UniPCConfig, EulerConfig]
    timesteps: np.ndarray  # [N] transformer timesteps: int64 (unipc) / float32 (euler)
    sigmas: np.ndarray  # [N+1] float32, sigmas[N] == 0
    arrays: Union[UniPCArrays, EulerArrays]  # pytree passed to `step`

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


# ----------------------------------------------------------------------------- host-side builders


def make_schedule(kind: str, num_steps: int, shift: float, start: int = 0, **config_kwargs) -> Schedule:
    """Builds timesteps, sigmas and all per-step coefficient tables (host numpy).

    ``start``: the first step that runs (video-to-video keeps the last steps of the schedule, as diffusers'
    ``get_timesteps``); a multistep sampler warms up from there as diffusers' does when its first call is
    at that step (UniPC: first order and no corrector at ``start``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= start < num_steps:
        raise ValueError(f"start must be in [0, {num_steps}), got {start}")
    config = CONFIGS[kind](shift=shift, **config_kwargs)
    if kind == "euler":
        return _make_euler(config, num_steps)
    if kind == "euler-linear":
        return _make_euler_linear(config, num_steps)
    return _make_unipc(config, num_steps, start)


def _make_euler(cfg: EulerConfig, n: int) -> Schedule:
    f32 = np.float32
    train = cfg.num_train_timesteps

    def shift32(s):  # the scheduler's __init__ shifts its float32 training sigmas
        return f32(cfg.shift) * s / (f32(1) + f32(cfg.shift - 1) * s)

    # set_timesteps interpolates between the *shifted* training sigma extremes and then shifts
    # again, so the last sigma is shift applied twice to 1/num_train_timesteps.
    sigma_max = float(shift32(f32(train) / f32(train)))
    sigma_min = float(shift32(f32(1) / f32(train)))
    s = np.linspace(sigma_max * train, sigma_min * train, n) / train
    s = (cfg.shift * s / (1 + (cfg.shift - 1) * s)).astype(f32)
    sigmas = np.concatenate([s, np.zeros(1, f32)])
    return Schedule(cfg, s * f32(train), sigmas, EulerArrays(dt=sigmas[1:] - sigmas[:-1]))


def _make_euler_linear(cfg: EulerConfig, n: int) -> Schedule:
    t = np.linspace(1.0, 0.0, n + 1)[:-1]
    s = (cfg.shift * t / (1 + (cfg.shift - 1) * t)).astype(np.float32)
    sigmas = np.concatenate([s, np.zeros(1, np.float32)])
    return Schedule(cfg, s * np.float32(cfg.num_train_timesteps), sigmas, EulerArrays(dt=sigmas[1:] - sigmas[:-1]))


def _make_unipc(cfg: UniPCConfig, n: int, start: int = 0) -> Schedule:
    train = cfg.num_train_timesteps
    s = np.linspace(1.0, 1.0 / train, n + 1)[:-1]
    s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6  # keeps log(alpha) finite at the first step
    timesteps = (s * train).astype(np.int64)  # truncation, as diffusers' int64 cast
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32)

    # Coefficients use float64 on the float32 sigmas (alpha = 1 - sigma is exact either way).
    sig = sigmas.astype(np.float64)
    with np.errstate(divide="ignore"):
        lam = np.log(1.0 - sig) - np.log(sig)  # lam[n] = +inf
    # Warm-up from order 1 (at the first step that runs), and lower_order_final: the last step is always
    # first order.
    order = [max(1, min(2, n - i, i - start + 1)) for i in range(n)]

    pred = np.zeros((n, 6))
    corr = np.zeros((n, 6))
    pred[:, 3] = corr[:, 3] = 1.0  # rk: harmless value where unused
    for i in range(n):
        pred[i] = _uni_coefs(sig, lam, i, i + 1, order[i], corrector=False)
        if i > 0:
            corr[i] = _uni_coefs(sig, lam, i - 1, i, order[i - 1], corrector=True)
    use_corr = np.array([i > start and (i - 1) not in cfg.disable_corrector for i in range(n)])

    def pack(c):
        return UniCoefs(*(np.ascontiguousarray(c[:, k], np.float32) for k in range(6)))

    arrays = UniPCArrays(sigmas[:-1], use_corr, pack(pred), pack(corr))
    return Schedule(cfg, timesteps, sigmas, arrays)


def _uni_coefs(sig, lam, src: int, dst: int, order: int, corrector: bool) -> np.ndarray:
    """[ratio, a, g, rk, rho_hist, rho_t] of the bh2 update sigma[src] -> sigma[dst]."""
    h = lam[dst] - lam[src]
    hh = -h  # predict_x0
    h_phi_1 = np.expm1(hh)
    b_h = h_phi_1  # bh2: B(h) = e^hh - 1
    alpha_t = 1.0 - sig[dst]
    ratio, a, g = sig[dst] / sig[src], alpha_t * h_phi_1, alpha_t * b_h
    rk = (lam[src - 1] - lam[src]) / h if order == 2 else 1.0
    if not corrector:
        rho_hist, rho_t = (0.5 if order == 2 else 0.0), 0.0
    elif order == 1:
        rho_hist, rho_t = 0.0, 0.5
    else:  # solve the 2x2 system R rho = b of UniC-2
        phi_2 = h_phi_1 / hh - 1.0
        phi_3 = phi_2 / hh - 0.5
        b = np.array([phi_2 / b_h, 2.0 * phi_3 / b_h])
        rho_hist, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
    return np.array([ratio, a, g, rk, rho_hist, rho_t])


def expert_boundary_index(timesteps, boundary_ratio: float, num_train_timesteps: int = 1000) -> int:
    """Number of leading steps run by the high-noise expert (`transformer`, while t >= boundary).

    Steps [0, k) use `transformer`, steps [k, N) use `transformer_2`.  The comparison is done in
    float32, as torch promotes `int64_tensor >= python_float`.
    """
    high = np.asarray(timesteps).astype(np.float32) >= np.float32(boundary_ratio * num_train_timesteps)
    k = int(high.sum())
    if not high[:k].all():
        raise ValueError("timesteps must be non-increasing")
    return k


# ----------------------------------------------------------------------------- jittable step


def init_state(schedule: "Schedule | UniPCArrays | EulerArrays", latents, dtype=jnp.float32):
    """Initial carry for `step` (from a Schedule or its arrays): a UniPCState of zeros (unipc) or () (euler)."""
    arrays = schedule.arrays if isinstance(schedule, Schedule) else schedule
    if isinstance(arrays, EulerArrays):
        return ()
    zeros = jnp.zeros(latents.shape, dtype)
    return UniPCState(x0_prev=zeros, x0_prev2=zeros, last_sample=zeros)


def _at(table, i, dtype=None):
    value = jnp.asarray(table)[i]
    return value if dtype is None else value.astype(dtype)


def _uni_update(c: UniCoefs, i, x, m0, m1, m_t, dtype):
    ratio, a, g, rk, rho_hist, rho_t = (_at(t, i, dtype) for t in c)
    res = rho_hist * ((m1 - m0) / rk) + rho_t * (m_t - m0)
    return ratio * x - a * m0 - g * res


def step(arrays, state, i, model_output, sample, *, dtype=jnp.float32):
    """One sampler step at (traced or static) index i: sample at sigma[i] -> sample at sigma[i+1].

    model_output is the transformer's flow prediction v for `sample` at timesteps[i].  Math runs
    in `dtype`; the returned sample has sample.dtype.  Returns (prev_sample, new_state).
    """
    out_dtype = sample.dtype
    v = model_output.astype(dtype)
    x = sample.astype(dtype)
    if isinstance(arrays, EulerArrays):
        return (x + _at(arrays.dt, i, dtype) * v).astype(out_dtype), state
    if not isinstance(arrays, UniPCArrays):
        raise TypeError(f"unknown schedule arrays {type(arrays).__name__}")

    x0 = x - _at(arrays.sigma, i, dtype) * v  # flow_prediction -> x0
    # UniC: redo the previous step with this step's x0 (the result replaces `sample`).
    corrected = _uni_update(
        arrays.corrector, i, state.last_sample, state.x0_prev, state.x0_prev2, x0, dtype
    )
    x = jnp.where(_at(arrays.use_corrector, i), corrected, x)
    # UniP: predict the next sample from x0 history [x0, x0_prev].
    prev = _uni_update(arrays.predictor, i, x, x0, state.x0_prev, x0, dtype)
    return prev.astype(out_dtype), UniPCState(x0_prev=x0, x0_prev2=state.x0_prev, last_sample=x)
