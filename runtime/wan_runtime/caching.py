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
from typing import Any, Mapping

import numpy as np

POLICIES = ("none", "magcache", "cfg", "teacache", "firstblock")

#: calibration keys whose published script runs MagCache4Wan2.2 in "i2v" mode (high-noise expert uncached)
HIGH_NOISE_UNCACHED = frozenset({"wan2.2_i2v_A14B"})

#: preset name (configs/*.toml stem) -> calibration key; TI2V-5B has a curve per task
#: preset -> TeaCache4Wan2.1 coefficients (the modulated-embedding variant); Wan 2.2 has none published
TEACACHE_MODELS = {
    "wan2.1-t2v-1.3b": "ret_steps_1.3B", "wan2.1-t2v-14b": "ret_steps_14B",
    "wan2.1-i2v-14b-480p": "ret_steps_i2v_480P", "wan2.1-i2v-14b-720p": "ret_steps_i2v_720P",
}

PRESET_MODELS = {
    "wan2.1-t2v-1.3b": "wan2.1_t2v_1.3B", "wan2.1-t2v-14b": "wan2.1_t2v_14B",
    "wan2.1-i2v-14b-480p": "wan2.1_i2v_14B_480P", "wan2.1-i2v-14b-720p": "wan2.1_i2v_14B_720P",
    "wan2.2-t2v-a14b": "wan2.2_t2v_A14B", "wan2.2-i2v-a14b": "wan2.2_i2v_A14B",
    "wan2.2-ti2v-5b": ("wan2.2_ti2v_5B_t2v", "wan2.2_ti2v_5B_i2v"),
}


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


def model_key_for_preset(preset: str, image: bool = False) -> str | None:
    """The calibration curve for a preset name (None: no published curve, e.g. 'tiny')."""
    key = PRESET_MODELS.get(preset)
    return key[bool(image)] if isinstance(key, tuple) else key


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


# ---------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Step-caching settings; the CLI flag of each field is in its comment. None: the curve's
    recommended value (MagCache) or the documented default."""
    policy: str = "none"             # --cache: none | magcache | cfg | teacache | firstblock
    thresh: float | None = None      # --cache-thresh: MagCache accumulated-error bound
    K: int | None = None             # --cache-k: MagCache max consecutive skips per branch
    retention: float | None = None   # --cache-retention: MagCache fraction of calls always computed
    model: str | None = None         # --cache-model: key into the calibration file
    cfg_interval: int = 2            # --cfg-cache-interval: one full step every `interval`
    cfg_start: int | None = None     # --cfg-cache-start: first step that may reuse (None: 20 % of the steps)
    cfg_end: int | None = None       # --cfg-cache-end: steps >= end run fully (None: no end)
    teacache_thresh: float = 0.2     # --teacache-thresh (TeaCache4Wan2.1's default)
    firstblock_thresh: float = 0.05  # --firstblock-thresh (diffusers FirstBlockCacheConfig's default)
    calibration: str | None = None   # --cache-calibration: a calibration JSON (default: configs/)

    FLAGS = {"policy": "cache", "thresh": "cache_thresh", "K": "cache_k", "retention": "cache_retention",
             "model": "cache_model", "cfg_interval": "cfg_cache_interval", "cfg_start": "cfg_cache_start",
             "cfg_end": "cfg_cache_end", "teacache_thresh": "teacache_thresh",
             "firstblock_thresh": "firstblock_thresh", "calibration": "cache_calibration"}

    @classmethod
    def from_preset(cls, preset: Mapping[str, Any]) -> "CacheConfig":
        """From preset/CLI settings named like the flags (cache, cache_thresh, cache_k, ...); other keys
        and None values are ignored."""
        kw = {f: preset[k] for f, k in cls.FLAGS.items() if preset.get(k) is not None}
        return cls(**kw).validate()

    def validate(self) -> "CacheConfig":
        def bad(field, msg):
            raise ValueError(f"--{self.FLAGS[field].replace('_', '-')}: {msg}")

        def number(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)

        def integer(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if self.policy not in POLICIES:
            bad("policy", f"must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        for f in ("thresh", "teacache_thresh", "firstblock_thresh"):
            v = getattr(self, f)
            if v is not None and not (number(v) and v >= 0):
                bad(f, "must be >= 0")
        if self.K is not None and not (integer(self.K) and self.K >= 0):
            bad("K", "must be an integer >= 0")
        if self.retention is not None and not (number(self.retention) and 0 <= self.retention <= 1):
            bad("retention", "must be in [0, 1]")
        if not (integer(self.cfg_interval) and self.cfg_interval >= 1):
            bad("cfg_interval", "must be an integer >= 1")
        for f in ("cfg_start", "cfg_end"):
            v = getattr(self, f)
            if v is not None and not (integer(v) and v >= 0):
                bad(f, "must be an integer >= 0")
        if self.cfg_start is not None and self.cfg_end is not None and self.cfg_end <= self.cfg_start:
            bad("cfg_end", "must be > --cfg-cache-start")
        if self.model is not None and not isinstance(self.model, str):
            bad("model", "must be a calibration key")
        return self


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


def step_plan(config: CacheConfig, num_steps: int, *, calibration: Mapping[str, Any] | None = None,
              boundary_index: int | None = None, do_cfg: bool = True) -> np.ndarray | None:
    """The pipeline's per-step plan, bool (N, 3): (compute cond blocks, compute uncond blocks, uncond
    from the CFG cache); None for a dense run. ``boundary_index``: first low-noise step (two experts)."""
    if config.policy == "none":
        return None
    plan = np.zeros((num_steps, 3), bool)
    if config.policy == "magcache":
        calibration = load_calibration() if calibration is None else calibration
        entry = model_entry(calibration, config.model)
        ours = {"thresh": config.thresh, "K": config.K, "retention": config.retention}
        s = {k: entry["recommended"][k] if v is None else v for k, v in ours.items()}
        plan[:, 0], plan[:, 1] = magcache_plan(
            entry["mag_ratios"], num_steps, s["thresh"], s["K"], s["retention"], boundary_index, do_cfg,
            cache_high_noise=config.model not in HIGH_NOISE_UNCACHED)
        return plan
    if config.policy == "cfg":
        if not do_cfg:
            return None
        start = int(0.2 * num_steps) if config.cfg_start is None else config.cfg_start
        reuse = cfg_cache_plan(num_steps, start, config.cfg_interval, config.cfg_end, boundary_index)
        plan[:, 0], plan[:, 1], plan[:, 2] = True, ~reuse, reuse
        return plan
    if config.policy in ("teacache", "firstblock"):
        # decided inside the loop from the data; the host plan only forces full steps (column 0): TeaCache's
        # retention / final steps, FirstBlockCache's first step, and the first step of each expert
        use_ret = config.policy == "teacache" and str(config.model or "").startswith("ret_steps_")
        forced = teacache_forced_steps(num_steps, use_ret) if config.policy == "teacache" else np.arange(num_steps) < 1
        if boundary_index is not None and 0 < boundary_index < num_steps:
            forced[boundary_index] = True
        plan[:, 0] = forced
        return plan
    raise ValueError(f"--cache: unknown policy {config.policy!r}")
