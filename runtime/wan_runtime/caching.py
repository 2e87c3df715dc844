"""Step-caching planners (host side, numpy; they run before tracing).

MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache") skips the
transformer blocks of a CFG branch when the calibrated magnitude ratios gamma of its block residual
say the cached residual is still good. The rule below is the one of the authors' Wan scripts
(Zehong-Ma/MagCache, MagCache4Wan2.1 and MagCache4Wan2.2 ``magcache_generate.py``, ``magcache_forward``):

* the model is called once per branch per step, cond then uncond, and a call counter ``cnt`` runs over
  the 2N calls; branch b = cnt % 2 has its own accumulators (ratio R = 1, error E = 0, run length k = 0)
  and its own cached residual;
* a call is *eligible* unless it is a retention call (below); an eligible call first updates
  ``R *= gamma[cnt]``, ``k += 1``, ``E += |1 - R|`` and then skips iff ``E < thresh and k <= K``;
  otherwise it computes and resets R, E, k. A retention call computes and leaves R, E, k untouched;
* retention is counted in calls: Wan 2.1 and TI2V-5B retain ``cnt < int(2N * retention)``. Wan 2.2
  A14B (S = 2 * boundary_index, the first call of the low-noise expert) retains per expert phase:
  "t2v" mode ``cnt < int(S * retention)`` or ``S <= cnt <= (2N - S) * retention + S``; "i2v" mode
  (I2V-A14B) never caches the high-noise expert: ``cnt < int(S + (2N - S) * retention)``. Both experts
  share one counter, one set of accumulators and one residual cache (class attributes there): the
  accumulators are *not* reset at the switch; the cached residuals are refreshed by the low-noise
  retention calls.

One guard is added: steps 0 and ``boundary_index`` always compute both branches (as retention calls),
so a skip never reads an empty cache or the other expert's residual. It changes nothing unless the
retention window is shorter than one step (their scripts would then read a missing/stale residual).

The CFG cache (FasterCache-style) runs only the conditional branch on some steps and rebuilds the
unconditional prediction as ``cond - (cond - uncond)`` of the last full step (see ``cfg_cache_plan``).
TeaCache and first-block caching decide per step from data inside the loop; only their host-side
constants live here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, ClassVar, Mapping

import numpy as np

# ---------------------------------------------------------------------------------------- calibration
def calibration_path() -> pathlib.Path:
    """$WAN_JAX_CALIBRATION, else <repo root>/configs/cache_calibration.json."""
    env = os.environ.get("WAN_JAX_CALIBRATION")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2] / "configs" / "cache_calibration.json"


def load_calibration(path: str | os.PathLike | None = None) -> dict:
    """The calibration file: {"models": {key: {steps, recommended, mag_ratios, ...}}, "teacache_...": ...}."""
    path = pathlib.Path(path) if path is not None else calibration_path()
    if not path.is_file():
        raise FileNotFoundError(f"cache calibration file not found: {path} (set $WAN_JAX_CALIBRATION)")
    data = json.loads(path.read_text())
    if not isinstance(data.get("models"), dict):
        raise ValueError(f"{path}: no 'models' table")
    return data


def model_entry(calibration: Mapping[str, Any], key: str | None) -> dict:
    models = calibration["models"]
    if key not in models:
        raise ValueError(f"--cache-model: unknown calibration {key!r}; available: {', '.join(sorted(models))}")
    return models[key]


def curve_for_steps(mag_ratios, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(cond[N], uncond[N]) from an interleaved [c0, u0, c1, u1, ...] curve of L steps, by nearest
    neighbour per branch: step i reads idx = round(i * (L - 1) / (N - 1)) (numpy round: half to even);
    N = 1 reads the last entry, N = L is the curve itself."""
    m = np.asarray(mag_ratios, np.float64)
    if m.ndim != 1 or m.size % 2:
        raise ValueError("mag_ratios: expected an interleaved [cond, uncond] list of even length")
    cond, uncond = m[0::2], m[1::2]
    if cond.size == num_steps:
        return cond.copy(), uncond.copy()
    if num_steps == 1:
        idx = np.array([cond.size - 1])
    else:
        idx = np.round(np.arange(num_steps) * ((cond.size - 1) / (num_steps - 1))).astype(int)
    return cond[idx], uncond[idx]


# ---------------------------------------------------------------------------------------- MagCache
def _retained_calls(num_steps: int, retention: float, boundary_index: int | None,
                    cache_high_noise: bool) -> np.ndarray:
    """bool[2N] over the calls cnt = 2 * step + branch: calls that compute outside the skip rule."""
    n2 = 2 * num_steps
    cnt = np.arange(n2)
    if not boundary_index:  # one model (Wan 2.1, TI2V-5B)
        retained = cnt < int(n2 * retention)
    else:
        s = 2 * boundary_index
        if cache_high_noise:  # "t2v": retention at the start of each expert's phase
            retained = (cnt < int(s * retention)) | ((cnt >= s) & (cnt <= (n2 - s) * retention + s))
        else:  # "i2v": the high-noise expert always computes, retention counts from the switch
            retained = cnt < int(s + (n2 - s) * retention)
    retained[:2] = True  # guard: step 0 and the first step of the low-noise expert
    if boundary_index and boundary_index < num_steps:
        retained[2 * boundary_index:2 * boundary_index + 2] = True
    return retained


def magcache_plan(mag_ratios, num_steps: int, thresh: float, K: int, retention: float,
                  boundary_index: int | None = None, cfg: bool = True,
                  cache_high_noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(compute_cond bool[N], compute_uncond bool[N]) for one generation (see the module docstring).

    ``mag_ratios``: the interleaved calibration curve (resampled to N steps here). ``boundary_index``:
    first step of the low-noise expert for Wan 2.2 A14B (None or 0: one model). ``cache_high_noise``:
    False for I2V-A14B (its script's "i2v" mode). Without CFG the cond plan is the same (branches are
    independent) and compute_uncond is all False."""
    if boundary_index is not None and not 0 <= boundary_index <= num_steps:
        raise ValueError(f"boundary_index {boundary_index} outside [0, {num_steps}]")
    gamma = curve_for_steps(mag_ratios, num_steps)
    retained = _retained_calls(num_steps, retention, boundary_index, cache_high_noise).reshape(num_steps, 2)
    compute = np.ones((2, num_steps), bool)
    for b in range(2):
        ratio, err, run = 1.0, 0.0, 0
        for i in range(num_steps):
            if retained[i, b]:
                continue
            ratio *= gamma[b][i]
            run += 1
            err += abs(1.0 - ratio)
            if err < thresh and run <= K:
                compute[b, i] = False  # reuse this branch's cached residual
            else:
                ratio, err, run = 1.0, 0.0, 0
    return compute[0], (compute[1] if cfg else np.zeros(num_steps, bool))


def count_forwards(compute_cond, compute_uncond) -> int:
    """Block forwards a plan runs (one per computed branch per step)."""
    return int(np.count_nonzero(compute_cond) + np.count_nonzero(compute_uncond))


# ---------------------------------------------------------------------------------------- CFG cache
def cfg_cache_plan(num_steps: int, start: int, interval: int, end: int | None = None,
                   boundary_index: int | None = None) -> np.ndarray:
    """bool[N]: steps whose unconditional prediction comes from the cache (only cond runs; uncond is
    rebuilt as cond - (cond - uncond) of the last full step).

    Step i reuses iff start <= i < end (end None: N) and (i - start) % interval != 0; never step 0 and
    never the first step of the low-noise expert (``boundary_index``), so the difference reused always
    comes from the same expert. interval 1: never reuses."""
    if interval < 1:
        raise ValueError("--cfg-cache-interval: must be >= 1")
    i = np.arange(num_steps)
    end = num_steps if end is None else end
    reuse = (i >= start) & (i < end) & ((i - start) % interval != 0) & (i > 0)
    if boundary_index is not None and 0 < boundary_index < num_steps:
        reuse[boundary_index] = False
    return reuse


# ---------------------------------------------------------------------------------------- TeaCache
def teacache_coefficients(calibration: Mapping[str, Any], key: str) -> np.ndarray:
    """TeaCache4Wan2.1 rescaling polynomial (numpy poly1d order, highest power first), e.g. key '14B'
    or 'ret_steps_14B' (the variant measured on the modulated embedding e0, for use_ret_steps)."""
    table = calibration["teacache_coefficients_wan2.1"]
    if key.startswith("_") or key not in table:
        keys = ", ".join(k for k in sorted(table) if not k.startswith("_"))
        raise ValueError(f"--cache-model: no TeaCache coefficients {key!r}; available: {keys}")
    return np.asarray(table[key], np.float64)


def teacache_rescale(coefficients, x: float) -> float:
    """Estimated output change for a rel-L1 change x of the timestep embedding: poly(x)."""
    return float(np.polyval(np.asarray(coefficients, np.float64), x))


def teacache_forced_steps(num_steps: int, use_ret_steps: bool) -> np.ndarray:
    """bool[N]: steps TeaCache4Wan2.1 always computes (both branches) and where it resets its
    accumulator: calls cnt < ret_steps or cnt >= cutoff, with (ret_steps, cutoff) = (10, 2N) when
    use_ret_steps, else (2, 2N - 2), i.e. steps 0-4, or the first and the last step."""
    i = np.arange(num_steps)
    return i < 5 if use_ret_steps else (i < 1) | (i >= num_steps - 1)


# ---------------------------------------------------------------------------------------- warnings
def calibration_warning(model_entry: Mapping[str, Any], num_steps: int, flow_shift: float | None,
                        boundary_ratio: float | None) -> str | None:
    """A warning when a run's flow_shift or expert boundary differ from those the curve was calibrated
    at (only entries that list them: Wan 2.2 A14B); None when they match."""
    diffs = []
    for name, run in (("flow_shift", flow_shift), ("boundary_ratio", boundary_ratio)):
        cal = model_entry.get(name)
        if cal is not None and run is not None and abs(float(run) - float(cal)) > 1e-6:
            diffs.append(f"{name} {run:g} (calibrated at {cal:g})")
    if not diffs:
        return None
    return (f"MagCache: this run's {' and '.join(diffs)} differ from the calibration of the curve "
            f"({model_entry.get('steps')} steps, resampled to {num_steps}); the expert switch may not line "
            f"up with the curve's and skipping may cost quality")


# ---------------------------------------------------------------------------------------- policies
class StepView(tuple):
    """What a policy's traced decision may look at in one model evaluation: the block input ``tokens``
    (rows, S, D), the time embedding ``temb`` and its projection ``temb_proj`` (the modulation input),
    and ``first_block()``, which runs block 0 on every row and returns its output."""

    __slots__ = ()

    def __new__(cls, tokens, temb, temb_proj, first_block):
        return super().__new__(cls, (tokens, temb, temb_proj, first_block))

    tokens = property(lambda self: self[0])
    temb = property(lambda self: self[1])
    temb_proj = property(lambda self: self[2])
    first_block = property(lambda self: self[3])


def _bad(flag: str, msg: str):
    raise ValueError(f"--{flag}: {msg}")


def _number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A step-caching policy. The denoise loop calls one interface:

    - ``validate()``: the settings (flag-named errors), before any weights load;
    - ``plan(steps, boundary_index, do_cfg)``: the host-side plan, bool (steps, 3): (compute cond blocks,
      compute uncond blocks, uncond rebuilt from the CFG cache); for data-dependent policies the steps that
      must compute (column 0). None: dense, no caching machinery at all;
    - ``state(rows, tokens, dim, per_token)``: the policy's own traced state (thresholds live here, so one
      executable serves every value); ``per_token``: timestep embeddings are per token (TI2V with an image);
    - ``decide(state, plan_row, view)`` (traced): per batch row, whether its blocks run at this step;
      returns (compute bool (rows,), state, block input, first block to run).

    ``HOST`` names the fields only the host side reads: ``traced()`` drops them, so they are not part of the
    compiled executable's key."""

    name: ClassVar[str] = "none"
    HOST: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> "Policy":
        return self

    def plan(self, steps: int, *, boundary_index: int | None = None, do_cfg: bool = True) -> np.ndarray | None:
        return None

    def state(self, rows: int, tokens: int, dim: int, per_token: bool = False) -> dict:
        return {}

    def decide(self, state, plan_row, view: StepView):
        """Plan-driven policies: the host plan says which rows compute."""
        rows = view.tokens.shape[0]
        return plan_row[:rows], state, view.tokens, 0

    def traced(self) -> "Policy":
        return dataclasses.replace(self, **{f: None for f in self.HOST})

    def warning(self, steps: int, flow_shift: float | None, boundary_ratio: float | None) -> str | None:
        return None

    def settings(self) -> dict:
        """The settings as recorded in the sidecar JSON."""
        d = {"policy": self.name, **dataclasses.asdict(self)}
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """No caching: every step runs every block."""


@dataclasses.dataclass(frozen=True)
class FixedPlan(Policy):
    """A given plan, bool (steps, 3) as ``Policy.plan`` returns (tests, calibration, benchmarks)."""

    name: ClassVar[str] = "plan"
    HOST: ClassVar[tuple[str, ...]] = ("steps",)
    steps: Any = None

    def validate(self) -> "FixedPlan":
        a = np.asarray(self.steps)
        if a.ndim != 2 or a.shape[1] != 3:
            raise ValueError(f"step plan: expected a bool (steps, 3) array, got shape {list(a.shape)}")
        return self

    def plan(self, steps, *, boundary_index=None, do_cfg=True):
        a = np.asarray(self.steps, bool)
        if a.shape[0] != steps:
            raise ValueError(f"step plan: {a.shape[0]} rows for {steps} steps")
        return a


@dataclasses.dataclass(frozen=True)
class MagCache(Policy):
    """MagCache (see the module docstring): a branch skips its blocks while the accumulated error of the
    calibrated magnitude ratios stays under ``thresh``, at most ``K`` times in a row; decided on the host."""

    name: ClassVar[str] = "magcache"
    HOST: ClassVar[tuple[str, ...]] = ("thresh", "K", "retention", "model", "calibration", "high_noise")
    thresh: float | None = None      # --cache-thresh (None: the curve's recommended value)
    K: int | None = None             # --cache-k
    retention: float | None = None   # --cache-retention
    model: str | None = None         # --cache-model: key into the calibration file
    calibration: str | None = None   # --cache-calibration (default: configs/cache_calibration.json)
    high_noise: bool = True          # False: the high-noise expert always computes (MagCache4Wan2.2 "i2v")

    def validate(self) -> "MagCache":
        if self.thresh is not None and not (_number(self.thresh) and self.thresh >= 0):
            _bad("cache-thresh", "must be >= 0")
        if self.K is not None and not (_integer(self.K) and self.K >= 0):
            _bad("cache-k", "must be an integer >= 0")
        if self.retention is not None and not (_number(self.retention) and 0 <= self.retention <= 1):
            _bad("cache-retention", "must be in [0, 1]")
        if not isinstance(self.model, str):
            _bad("cache-model", "no published magcache calibration for this model; pass --cache-model (and "
                 "--cache-calibration, see tools/calibrate_magcache.py)")
        model_entry(self._calibration(), self.model)
        return self

    def _calibration(self) -> dict:
        try:
            return load_calibration(self.calibration)
        except (OSError, ValueError) as e:
            raise ValueError(f"--cache-calibration: {e}") from None

    def plan(self, steps, *, boundary_index=None, do_cfg=True):
        entry = model_entry(self._calibration(), self.model)
        ours = {"thresh": self.thresh, "K": self.K, "retention": self.retention}
        s = {k: entry["recommended"][k] if v is None else v for k, v in ours.items()}
        out = np.zeros((steps, 3), bool)
        out[:, 0], out[:, 1] = magcache_plan(entry["mag_ratios"], steps, s["thresh"], s["K"], s["retention"],
                                             boundary_index, do_cfg, cache_high_noise=self.high_noise)
        return out

    def warning(self, steps, flow_shift, boundary_ratio):
        return calibration_warning(model_entry(self._calibration(), self.model), steps, flow_shift, boundary_ratio)


@dataclasses.dataclass(frozen=True)
class CFGCache(Policy):
    """CFG cache (FasterCache-style): on cache steps only the conditional branch runs; the unconditional
    prediction is rebuilt as cond - (cond - uncond) of the last full step (see ``cfg_cache_plan``)."""

    name: ClassVar[str] = "cfg"
    HOST: ClassVar[tuple[str, ...]] = ("interval", "start", "end")
    interval: int | None = 2         # --cfg-cache-interval: one full step every `interval`
    start: int | None = None         # --cfg-cache-start (None: 20 % of the steps)
    end: int | None = None           # --cfg-cache-end (None: no end)

    def validate(self) -> "CFGCache":
        if not (_integer(self.interval) and self.interval >= 1):
            _bad("cfg-cache-interval", "must be an integer >= 1")
        for flag, v in (("cfg-cache-start", self.start), ("cfg-cache-end", self.end)):
            if v is not None and not (_integer(v) and v >= 0):
                _bad(flag, "must be an integer >= 0")
        if self.start is not None and self.end is not None and self.end <= self.start:
            _bad("cfg-cache-end", "must be > --cfg-cache-start")
        return self

    def plan(self, steps, *, boundary_index=None, do_cfg=True):
        if not do_cfg:
            return None
        start = int(0.2 * steps) if self.start is None else self.start
        reuse = cfg_cache_plan(steps, start, self.interval, self.end, boundary_index)
        out = np.zeros((steps, 3), bool)
        out[:, 0], out[:, 1], out[:, 2] = True, ~reuse, reuse
        return out


def _forced(forced: np.ndarray, boundary_index: int | None) -> np.ndarray:
    """A data-dependent policy's host plan: column 0 = steps that compute every row (and reset), the
    first step of the low-noise expert among them."""
    steps = forced.shape[0]
    if boundary_index is not None and 0 < boundary_index < steps:
        forced[boundary_index] = True
    out = np.zeros((steps, 3), bool)
    out[:, 0] = forced
    return out


def _relative_change(new, prev):
    """mean |new - prev| / mean |prev| per row (over every other axis)."""
    import jax.numpy as jnp

    axes = tuple(range(1, new.ndim))
    return jnp.abs(new - prev).mean(axes) / jnp.maximum(jnp.abs(prev).mean(axes), 1e-30)


@dataclasses.dataclass(frozen=True)
class TeaCache(Policy):
    """TeaCache4Wan2.1: per row, the relative L1 change of the timestep embedding (the modulated one, e0,
    for the ``ret_steps_*`` coefficients) is rescaled by the calibrated polynomial and accumulated; the
    row skips its blocks while the sum stays under ``thresh`` and computes (resetting it) otherwise."""

    name: ClassVar[str] = "teacache"
    HOST: ClassVar[tuple[str, ...]] = ("thresh", "calibration")
    thresh: float | None = 0.2       # --teacache-thresh (TeaCache4Wan2.1's default)
    model: str | None = None         # --cache-model: coefficients key, e.g. ret_steps_1.3B
    calibration: str | None = None   # --cache-calibration

    @property
    def modulated(self) -> bool:
        return str(self.model).startswith("ret_steps_")

    def validate(self) -> "TeaCache":
        if not (_number(self.thresh) and self.thresh >= 0):
            _bad("teacache-thresh", "must be >= 0")
        if not isinstance(self.model, str):
            _bad("cache-model", "no published teacache coefficients for this model; pass --cache-model")
        self._coefficients()
        return self

    def _coefficients(self) -> np.ndarray:
        try:
            cal = load_calibration(self.calibration)
        except (OSError, ValueError) as e:
            raise ValueError(f"--cache-calibration: {e}") from None
        return teacache_coefficients(cal, self.model)

    def plan(self, steps, *, boundary_index=None, do_cfg=True):
        return _forced(teacache_forced_steps(steps, self.modulated), boundary_index)

    def state(self, rows, tokens, dim, per_token=False):
        e = (rows,) + ((tokens,) if per_token else ()) + ((6, dim) if self.modulated else (dim,))
        return {"prev_e": np.zeros(e, np.float32), "acc": np.zeros((rows,), np.float32),
                "coef": self._coefficients().astype(np.float32), "thresh": np.float32(self.thresh)}

    def decide(self, state, plan_row, view):
        import jax.numpy as jnp

        e = (view.temb_proj if self.modulated else view.temb).astype(jnp.float32)
        acc = state["acc"] + jnp.polyval(state["coef"], _relative_change(e, state["prev_e"]))
        compute = plan_row[0] | (acc >= state["thresh"]) | (state["thresh"] <= 0)  # thresh 0: never skip
        return compute, {**state, "acc": jnp.where(compute, 0.0, acc), "prev_e": e}, view.tokens, 0


@dataclasses.dataclass(frozen=True)
class FirstBlockCache(Policy):
    """First-block cache: block 0 always runs; the remaining blocks of a row are skipped while block 0's
    residual changed less than ``thresh`` (relative L1) against the last computed step's."""

    name: ClassVar[str] = "firstblock"
    HOST: ClassVar[tuple[str, ...]] = ("thresh",)
    thresh: float | None = 0.05      # --firstblock-thresh (diffusers FirstBlockCacheConfig's default)

    def validate(self) -> "FirstBlockCache":
        if not (_number(self.thresh) and self.thresh >= 0):
            _bad("firstblock-thresh", "must be >= 0")
        return self

    def plan(self, steps, *, boundary_index=None, do_cfg=True):
        return _forced(np.arange(steps) < 1, boundary_index)

    def state(self, rows, tokens, dim, per_token=False):
        return {"r1": np.zeros((rows, tokens, dim), np.float32), "thresh": np.float32(self.thresh)}

    def decide(self, state, plan_row, view):
        import jax.numpy as jnp

        h1 = view.first_block()
        r1, prev = (h1 - view.tokens).astype(jnp.float32), state["r1"]
        compute = plan_row[0] | (_relative_change(r1, prev) >= state["thresh"])
        return compute, {**state, "r1": jnp.where(compute[:, None, None], r1, prev)}, h1, 1


#: --cache NAME -> policy class; one name per policy
POLICIES: dict[str, type[Policy]] = {c.name: c for c in (Dense, MagCache, CFGCache, TeaCache, FirstBlockCache)}

#: setting (flag) name -> (policy, field); the settings of policies other than the chosen one are ignored
SETTINGS = {"cache_thresh": ("magcache", "thresh"), "cache_k": ("magcache", "K"),
            "cache_retention": ("magcache", "retention"), "cfg_cache_interval": ("cfg", "interval"),
            "cfg_cache_start": ("cfg", "start"), "cfg_cache_end": ("cfg", "end"),
            "teacache_thresh": ("teacache", "thresh"), "firstblock_thresh": ("firstblock", "thresh")}


def from_settings(settings: Mapping[str, Any], family=None, variant=None, image: bool = False) -> Policy:
    """The policy named by ``settings["cache"]`` (None: "none") with its flag-named settings (None values
    are ignored); the calibration curve defaults to the published variant's (``families.Variant``),
    validated. Errors name the flag."""
    name = settings.get("cache") or "none"
    if name not in POLICIES:
        _bad("cache", f"must be one of {', '.join(POLICIES)}, not {name!r}")
    cls = POLICIES[name]
    kw = {field: settings[k] for k, (pol, field) in SETTINGS.items() if pol == name and settings.get(k) is not None}
    if name in ("magcache", "teacache"):
        kw["calibration"] = settings.get("cache_calibration")
        kw["model"] = settings.get("cache_model") or _published(variant, name, image)
    if name == "magcache" and family is not None:
        kw["high_noise"] = family.magcache_high_noise
    return cls(**kw).validate()


def _published(variant, policy: str, image: bool) -> str | None:
    key = getattr(variant, policy, None) if variant is not None else None
    return key[bool(image)] if isinstance(key, tuple) else key
