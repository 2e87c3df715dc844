"""Step caching inside the one scanned loop: plans with no skips are dense bitwise, skipped branches run
no transformer blocks, the CFG cache rebuilds the unconditional branch, and both Wan 2.2 experts work."""
import numpy as np
import pytest

from wan_runtime.pipeline import WanPipeline

KW = dict(height=32, width=48, num_frames=9, guidance_scale=4.0, seed=5)
STEPS = 6


def _run(pipe, plan=None, **kw):
    return pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=STEPS, step_plan=plan, **{**KW, **kw})


def _plan(cond, uncond, from_diff=None):
    from_diff = [0] * len(cond) if from_diff is None else from_diff
    return np.array([cond, uncond, from_diff], bool).T


@pytest.fixture(scope="module", params=["wan2.1-t2v", "wan2.2-t2v-a14b"])
def pipe(request, converted):
    return WanPipeline.from_converted(converted[request.param], dtype="float32")


def test_plan_without_skips_is_dense_bitwise(pipe):
    dense = _run(pipe)
    full = _run(pipe, _plan([1] * STEPS, [1] * STEPS))
    assert np.array_equal(dense, full)
    assert pipe.last_block_runs.tolist() == [STEPS, STEPS]


def test_skipped_branches_run_no_blocks(pipe):
    cond = [1, 1, 0, 1, 0, 1]
    uncond = [1, 0, 1, 1, 0, 1]
    out = _run(pipe, _plan(cond, uncond))
    assert pipe.last_block_runs.tolist() == [sum(cond), sum(uncond)]
    assert np.isfinite(out).all()
    assert not np.array_equal(out, _run(pipe))  # reusing residuals changes the result a little


def test_cfg_cache_rebuilds_uncond(pipe):
    cond = [1] * STEPS
    uncond = [1, 1, 0, 1, 0, 1]
    from_diff = [0, 0, 1, 0, 1, 0]
    out = _run(pipe, _plan(cond, uncond, from_diff))
    assert pipe.last_block_runs.tolist() == [STEPS, sum(uncond)]
    dense = _run(pipe)
    assert np.isfinite(out).all() and np.abs(out - dense).max() < 0.5


def test_no_guidance_single_branch(pipe):
    out = _run(pipe, _plan([1, 0, 1, 0, 1, 1], [0] * STEPS), guidance_scale=1.0, guidance_scale_2=1.0)
    assert pipe.last_block_runs.tolist() == [4]
    assert np.isfinite(out).all()


def test_calibration_tool_records_ratios(converted):
    import calibrate_magcache

    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"], dtype="float32")
    ratios = calibrate_magcache.calibrate(pipe, "a fox", 5, negative_prompt="blurry", **{**KW, "guidance_scale": 4.0})
    assert len(ratios) == 10 and ratios[:2] == [1.0, 1.0]
    assert all(0.2 < r < 5.0 for r in ratios[2:]) and len(set(ratios[2:])) > 1


def test_policies_end_to_end_with_two_experts(converted):
    """MagCache (published Wan 2.2 curve) and CFG cache through the one loop, across the expert switch;
    thresh 0 is dense bitwise; the block-run count equals the host plan's."""
    from wan_runtime import caching, schedulers

    pipe = WanPipeline.from_converted(converted["wan2.2-t2v-a14b"], dtype="float32")
    steps = 12
    dense = pipe(
        "a red fox runs through fresh snow", "blurry", num_inference_steps=steps, **KW)
    zero = caching.CacheConfig(policy="magcache", model="wan2.2_t2v_A14B", thresh=0.0)
    same = pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=steps, cache=zero, **KW)
    assert np.array_equal(dense, same) and pipe.last_block_runs.tolist() == [steps, steps]
    sched = schedulers.make_schedule("unipc", steps, pipe.scheduler_config.get("flow_shift", 3.0))
    k = schedulers.expert_boundary_index(sched.timesteps, pipe.boundary_ratio)
    for cfg in (caching.CacheConfig(policy="magcache", model="wan2.2_t2v_A14B", thresh=0.5, K=3, retention=0.2),
                caching.CacheConfig(policy="cfg", cfg_interval=2, cfg_start=2)):
        plan = caching.step_plan(cfg, steps, calibration=caching.load_calibration(), boundary_index=k)
        out = pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=steps, cache=cfg, **KW)
        assert pipe.last_block_runs.tolist() == [int(plan[:, 0].sum()), int(plan[:, 1].sum())]
        assert pipe.last_block_runs.sum() < 2 * steps  # something was skipped
        assert plan[k, 0] and plan[k, 1]  # the first low-noise step computes both branches
        assert np.isfinite(out).all()
    assert pipe.last_warnings == [] or "flow_shift" in pipe.last_warnings[0]


@pytest.mark.parametrize("policy", ["teacache", "firstblock"])
def test_data_dependent_policies(pipe, policy):
    """TeaCache and FirstBlockCache decide inside the loop (lax.switch on traced flags): thresh 0 is dense
    bitwise; a positive threshold skips blocks, on both Wan 2.2 experts too."""
    from wan_runtime import caching

    def cfg(thresh):
        if policy == "teacache":
            return caching.CacheConfig(policy="teacache", model="ret_steps_1.3B", teacache_thresh=thresh)
        return caching.CacheConfig(policy="firstblock", firstblock_thresh=thresh)

    dense = _run(pipe)
    same = pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=STEPS, cache=cfg(0.0), **KW)
    assert np.array_equal(dense, same) and pipe.last_block_runs.tolist() == [STEPS, STEPS]
    out = pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=STEPS, cache=cfg(0.5), **KW)
    assert pipe.last_block_runs.sum() < 2 * STEPS and np.isfinite(out).all()
