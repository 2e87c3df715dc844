"""Host-side step-caching planners (wan_runtime.caching) against a plain replay of the MagCache authors'
Wan scripts (Zehong-Ma/MagCache: MagCache4Wan2.1 and MagCache4Wan2.2 magcache_generate.py)."""
import pathlib
from fractions import Fraction

import numpy as np
import pytest

from wan_runtime import caching, families

CAL_PATH = pathlib.Path("/work/shared/reference/cache_calibration.json")
if not CAL_PATH.is_file():
    CAL_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "cache_calibration.json"
CAL = caching.load_calibration(CAL_PATH)
MODELS = sorted(CAL["models"])
TWO_EXPERTS = [k for k in MODELS if "boundary_ratio" in CAL["models"][k]]
#: published curves whose family never caches the high-noise expert (MagCache4Wan2.2 "i2v" mode)
HIGH_NOISE_UNCACHED = frozenset(caching._published(v, "magcache", False) for f in families.FAMILIES
                                if not f.magcache_high_noise for v in f.variants)


# ---------------------------------------------------------------- the published algorithm, replayed
def their_nearest_interp(src, target_length):
    if target_length == 1:
        return np.array([src[-1]])
    scale = (len(src) - 1) / (target_length - 1)
    return src[np.round(np.arange(target_length) * scale).astype(int)]


def their_mag_ratios(curve, sample_steps):
    mag = np.array(curve)  # the calibration file already carries the [1.0, 1.0] padding
    if len(mag) != sample_steps * 2:
        con = their_nearest_interp(mag[0::2], sample_steps)
        ucon = their_nearest_interp(mag[1::2], sample_steps)
        mag = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
    return mag


def their_high_noise_steps(sample_steps, shift, boundary):
    """MagCache4Wan2.2 get_timesteps(...) >= num_train_timesteps * boundary, summed."""
    sigmas = np.linspace(1.0, 0.01, sample_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float32))
    sigma_last = ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    timesteps = (sigmas[:-1] * 1000).astype(np.int64)
    return int((timesteps >= 1000 * boundary).sum())


def replay(curve, sample_steps, thresh, K, retention_ratio, split_steps=None, mode="t2v"):
    """magcache_forward's decisions, call by call (cond, uncond, cond, ...): True = blocks skipped."""
    mag_ratios = their_mag_ratios(curve, sample_steps)
    num_steps = sample_steps * 2
    split_step = split_steps * 2 if split_steps else None
    accumulated_ratio, accumulated_err, accumulated_steps = [1.0, 1.0], [0.0, 0.0], [0, 0]
    skipped = []
    for cnt in range(num_steps):
        use_magcache = True
        if split_step is not None:
            if mode == "i2v":
                if cnt < int(split_step + (num_steps - split_step) * retention_ratio):
                    use_magcache = False
            else:
                if cnt < int(split_step * retention_ratio) or (
                        cnt <= ((num_steps - split_step) * retention_ratio + split_step) and cnt >= split_step):
                    use_magcache = False
        else:
            if cnt < int(num_steps * retention_ratio):
                use_magcache = False
        skip_forward = False
        if use_magcache:
            accumulated_ratio[cnt % 2] = accumulated_ratio[cnt % 2] * mag_ratios[cnt]
            accumulated_steps[cnt % 2] += 1
            accumulated_err[cnt % 2] += np.abs(1 - accumulated_ratio[cnt % 2])
            if accumulated_err[cnt % 2] < thresh and accumulated_steps[cnt % 2] <= K:
                skip_forward = True
            else:
                accumulated_err[cnt % 2] = 0
                accumulated_steps[cnt % 2] = 0
                accumulated_ratio[cnt % 2] = 1.0
        skipped.append(skip_forward)
    skipped = np.array(skipped).reshape(sample_steps, 2)
    return ~skipped[:, 0], ~skipped[:, 1]


def boundary_for(key, steps):
    e = CAL["models"][key]
    return their_high_noise_steps(steps, e["flow_shift"], e["boundary_ratio"]) if "boundary_ratio" in e else None


def mode_for(key):
    return "i2v" if key in HIGH_NOISE_UNCACHED else "t2v"


def plan(key, steps, thresh, K, retention, boundary=None, **kw):
    return caching.magcache_plan(CAL["models"][key]["mag_ratios"], steps, thresh, K, retention, boundary,
                                 cache_high_noise=key not in HIGH_NOISE_UNCACHED, **kw)


# ---------------------------------------------------------------- (a) equal to the replay
@pytest.mark.parametrize("key", MODELS)
def test_matches_published_replay(key):
    e = CAL["models"][key]
    rec = e["recommended"]
    settings = [(rec["thresh"], rec["K"], rec["retention"]), (0.04, 2, 0.2), (0.12, 4, 0.1), (0.3, 6, 0.3)]
    n_skipped = 0
    for steps in sorted({e["steps"], 20, 30, 25}):
        b = boundary_for(key, steps)
        for thresh, K, r in settings:
            want = replay(e["mag_ratios"], steps, thresh, K, r, b, mode_for(key))
            got = plan(key, steps, thresh, K, r, b)
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"{key} {steps} steps cond {thresh, K, r}")
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"{key} {steps} steps uncond {thresh, K, r}")
            n_skipped += 2 * steps - caching.count_forwards(*got)
    assert n_skipped > 0  # the comparison is not between two dense plans


def test_boundary_vs_pipeline_scheduler():
    """The authors' split (their simplified timesteps, sigmas linspace(1, 0.01)) is the runtime's expert
    boundary at the calibrated 40 steps; at some step counts it is one step late (e.g. T2V-A14B at 30
    steps: 20 vs 19). The pipeline passes its real boundary, so the plan then departs from the script
    there: the real first low-noise step computes instead of possibly reusing a high-noise residual."""
    from wan_runtime import schedulers
    for key in TWO_EXPERTS:
        e = CAL["models"][key]
        for steps in (e["steps"], 20, 25, 30, 50):
            sched = schedulers.make_schedule("unipc", steps, e["flow_shift"])
            real = schedulers.expert_boundary_index(sched.timesteps, e["boundary_ratio"])
            assert boundary_for(key, steps) - real in ((0,) if steps == e["steps"] else (0, 1))
    sched = schedulers.make_schedule("unipc", 30, 12.0)
    assert (schedulers.expert_boundary_index(sched.timesteps, 0.875), boundary_for("wan2.2_t2v_A14B", 30)) == (19, 20)


# ---------------------------------------------------------------- (b) the anchor
def test_anchor_wan22_t2v_a14b():
    key, steps = "wan2.2_t2v_A14B", 40
    b = boundary_for(key, steps)
    assert b == 26
    cond, uncond = plan(key, steps, 0.04, 2, 0.2, b)
    assert 2 * steps - caching.count_forwards(cond, uncond) == 34
    np.testing.assert_array_equal(cond, uncond)  # the two branches' curves are close enough here
    assert cond[:5].all() and cond[26:29].all()  # int(52 * 0.2) = 10 calls; 52 <= cnt <= 57.6
    rec = CAL["models"][key]["recommended"]
    assert 2 * steps - caching.count_forwards(*plan(key, steps, rec["thresh"], rec["K"], rec["retention"], b)) == 28


def test_step_plan_and_config():
    cal = str(CAL_PATH)
    cfg = caching.from_settings({"cache": "magcache", "cache_model": "wan2.2_t2v_A14B", "cache_calibration": cal,
                                 "cache_thresh": 0.04, "cache_k": 2, "cache_retention": 0.2, "steps": 40})
    p = cfg.plan(40, boundary_index=26)
    assert p.shape == (40, 3) and not p[:, 2].any()
    assert caching.count_forwards(p[:, 0], p[:, 1]) == 46
    i2v = families.get("wan2.2-i2v-a14b")  # its family sets the "i2v" mode (the high-noise expert uncached)
    rec = caching.from_settings({"cache": "magcache", "cache_model": "wan2.2_i2v_A14B", "cache_calibration": cal},
                                i2v).plan(40, boundary_index=15)
    want = replay(CAL["models"]["wan2.2_i2v_A14B"]["mag_ratios"], 40, 0.06, 2, 0.1, 15, "i2v")
    np.testing.assert_array_equal(rec[:, :2], np.stack(want, 1))
    assert rec[:15, :2].all()  # I2V-A14B: the high-noise expert is never cached
    no_cfg = cfg.plan(40, boundary_index=26, do_cfg=False)
    np.testing.assert_array_equal(no_cfg[:, 0], p[:, 0])
    assert not no_cfg[:, 1:].any()
    assert caching.from_settings({}).plan(40) is None
    with pytest.raises(ValueError, match="--cache-model"):
        caching.MagCache(model="nope", calibration=cal).plan(40)
    # data-dependent policies: the host plan only forces full steps (column 0), incl. the expert switch
    forced = caching.TeaCache(model="ret_steps_14B").validate().plan(40, boundary_index=30)
    assert forced[:5, 0].all() and forced[30, 0] and not forced[5:30, 0].any() and not forced[:, 1:].any()
    fb = caching.FirstBlockCache().validate().plan(40)
    assert fb[0, 0] and not fb[1:, 0].any()
    # a setting is validated with its policy (the settings of other policies are ignored)
    for bad, flag in [({"cache": "fast"}, "--cache:"),
                      ({"cache": "magcache", "cache_thresh": -0.1}, "--cache-thresh: must be >= 0"),
                      ({"cache": "magcache", "cache_k": 1.5}, "--cache-k"),
                      ({"cache": "magcache", "cache_retention": 1.2}, "--cache-retention"),
                      ({"cache": "cfg", "cfg_cache_interval": 0}, "--cfg-cache-interval"),
                      ({"cache": "cfg", "cfg_cache_start": 5, "cfg_cache_end": 5}, "--cfg-cache-end"),
                      ({"cache": "teacache", "teacache_thresh": float("nan")}, "--teacache-thresh")]:
        with pytest.raises(ValueError, match=flag):
            caching.from_settings(bad)
    ti2v = families.get("wan2.2-ti2v-5b").variant(preset="wan2.2-ti2v-5b")
    assert caching._published(ti2v, "magcache", True) == "wan2.2_ti2v_5B_i2v"
    assert all(caching._published(v, "magcache", False) in CAL["models"] for f in families.FAMILIES for v in f.variants)


def test_calibration_warning():
    e = CAL["models"]["wan2.2_t2v_A14B"]
    assert caching.calibration_warning(e, 40, 12.0, 0.875) is None
    assert "flow_shift 5" in caching.calibration_warning(e, 40, 5.0, 0.875)
    assert "boundary_ratio 0.9" in caching.calibration_warning(e, 30, 12.0, 0.9)
    assert caching.calibration_warning(CAL["models"]["wan2.1_t2v_14B"], 30, 3.0, None) is None


# ---------------------------------------------------------------- (c) settings that never skip
@pytest.mark.parametrize("key", MODELS)
def test_no_skip_settings(key):
    e = CAL["models"][key]
    for steps in (e["steps"], 20):
        b = boundary_for(key, steps)
        for thresh, K, r in [(0.0, 6, 0.2), (10.0, 0, 0.2), (10.0, 6, 1.0)]:
            cond, uncond = plan(key, steps, thresh, K, r, b)
            assert cond.all() and uncond.all(), (key, steps, thresh, K, r)
        cond, uncond = plan(key, steps, 10.0, 6, 0.0, b)
        assert not cond.all()  # the same curves do skip otherwise


def test_strict_threshold():
    """Skip iff E < thresh (strict): a flat curve (E stays 0) never skips at thresh 0, skips K in a row above."""
    flat = np.ones(40)
    assert all(c.all() for c in caching.magcache_plan(flat, 20, 0.0, 3, 0.2))
    cond, uncond = caching.magcache_plan(flat, 20, 1e-9, 3, 0.2)
    np.testing.assert_array_equal(cond, replay(flat, 20, 1e-9, 3, 0.2)[0])
    assert np.flatnonzero(cond).tolist() == [0, 1, 2, 3, 7, 11, 15, 19] and (cond == uncond).all()


# ---------------------------------------------------------------- (d) step 0 and the expert switch
@pytest.mark.parametrize("key", TWO_EXPERTS)
def test_boundary_step_computed(key):
    for steps in (40, 20, 30, 50):
        b = boundary_for(key, steps)
        for r in (0.0, 0.01, 0.1, 0.2, 0.4):
            for thresh, K in [(0.06, 2), (10.0, 10)]:
                cond, uncond = plan(key, steps, thresh, K, r, b)
                assert cond[0] and uncond[0] and cond[b] and uncond[b], (key, steps, r, thresh, K)
    # the guard is the only departure from the scripts: with no retention window they would skip
    # step 0 (an empty cache) and the switch step's uncond (the high-noise expert's residual)
    key, steps = "wan2.2_t2v_A14B", 40
    want = replay(CAL["models"][key]["mag_ratios"], steps, 10.0, 10, 0.0, 26, "t2v")
    got = plan(key, steps, 10.0, 10, 0.0, 26)
    assert not want[0][0] and not want[1][26] and got[0][0] and got[1][26]


def test_accumulators_carry_across_the_switch():
    """As in MagCache4Wan2.2 (both experts share one set of accumulators), the low-noise phase starts
    from the accumulators the high-noise phase left, not from fresh ones."""
    curve = np.full(40, 0.99)
    curve[:2] = 1.0
    cond, uncond = caching.magcache_plan(curve, 20, 0.035, 10, 0.2, boundary_index=10)
    want = replay(curve, 20, 0.035, 10, 0.2, 10, "t2v")
    np.testing.assert_array_equal(cond, want[0])
    np.testing.assert_array_equal(uncond, want[1])
    # E after skips: .01, .0299, then .0596 -> compute. Steps 8, 9 skip (R = .9801, E = .0299, k = 2 carried);
    # the low phase retains steps 10-11 and cond of 12 (cnt <= 24); at step 13 the carried state gives
    # E = .0596 -> compute, where fresh accumulators would give E = .01 -> skip.
    assert not cond[8] and not cond[9] and cond[13] and not cond[14]
    assert np.flatnonzero(~cond).tolist() == [2, 3, 5, 6, 8, 9, 14, 15, 17, 18]


# ---------------------------------------------------------------- (e) CFG cache
def test_cfg_cache_plan():
    reuse = caching.cfg_cache_plan(20, start=4, interval=3)
    assert np.flatnonzero(reuse).tolist() == [5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
    reuse = caching.cfg_cache_plan(20, start=4, interval=3, end=12, boundary_index=8)
    assert np.flatnonzero(reuse).tolist() == [5, 6, 9, 11]
    assert not caching.cfg_cache_plan(20, start=0, interval=2)[0]
    assert np.flatnonzero(caching.cfg_cache_plan(6, start=0, interval=2)).tolist() == [1, 3, 5]
    assert not caching.cfg_cache_plan(20, start=2, interval=1).any()
    with pytest.raises(ValueError, match="--cfg-cache-interval"):
        caching.cfg_cache_plan(20, 2, 0)
    p = caching.CFGCache(interval=2).validate().plan(40, boundary_index=26)
    assert p[:, 0].all() and (p[:, 1] == ~p[:, 2]).all()
    assert not p[:9, 2].any() and p[9:, 2].sum() == 16  # start = int(0.2 * 40) = 8: odd steps from 9 reuse
    assert caching.count_forwards(p[:, 0], p[:, 1]) == 40 + 24
    p = caching.CFGCache(interval=2).validate().plan(40, boundary_index=27)
    assert not p[27, 2] and p[25, 2] and p[29, 2] and p[9:, 2].sum() == 15  # the switch step runs fully
    assert caching.CFGCache().validate().plan(40, do_cfg=False) is None


# ---------------------------------------------------------------- (f) resampling
def test_curve_for_steps():
    for key in MODELS:
        m = np.array(CAL["models"][key]["mag_ratios"])
        L = len(m) // 2
        for T in (1, 2, 3, 7, 20, 25, 30, L, 75, 100, 149):
            cond, uncond = caching.curve_for_steps(m, T)
            np.testing.assert_array_equal(cond, their_nearest_interp(m[0::2], T))
            np.testing.assert_array_equal(uncond, their_nearest_interp(m[1::2], T))
            if T == 1:
                continue
            # the formula idx = round(i (L-1) / (T-1)); the scripts evaluate it in floating point,
            # which can fall on either side of an exact .5 tie (e.g. L=40, T=75, i=37: 19.5 -> 19)
            for i in range(T):
                exact = Fraction(i * (L - 1), T - 1)
                idx = np.flatnonzero(m[0::2] == cond[i])
                if exact.denominator == 2:
                    assert {int(exact - Fraction(1, 2)), int(exact + Fraction(1, 2))} & set(idx.tolist())
                else:
                    assert round(exact) in idx
    with pytest.raises(ValueError):
        caching.curve_for_steps([1.0, 1.0, 0.9], 10)


def test_teacache_helpers():
    c = caching.teacache_coefficients(CAL, "14B")
    assert caching.teacache_rescale(c, 0.1) == pytest.approx(float(np.poly1d(c)(0.1)), rel=1e-12)
    assert caching.teacache_rescale([2.0, 0.0, 1.0], 3.0) == 19.0
    with pytest.raises(ValueError, match="--cache-model"):
        caching.teacache_coefficients(CAL, "_about")
    np.testing.assert_array_equal(caching.teacache_forced_steps(8, False), [1, 0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(caching.teacache_forced_steps(8, True), [1, 1, 1, 1, 1, 0, 0, 0])


def test_load_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_JAX_CALIBRATION", str(CAL_PATH))
    assert caching.load_calibration()["models"].keys() == CAL["models"].keys()
    monkeypatch.setenv("WAN_JAX_CALIBRATION", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="WAN_JAX_CALIBRATION"):
        caching.load_calibration()
