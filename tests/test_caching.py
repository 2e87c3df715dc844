"""Step caching inside the one scanned loop.

Structure: plans with no skips are dense bitwise, skipped branches run no transformer blocks, the block-run
counts equal the host plan's, both Wan 2.2 experts work.

Values: every policy against an independent reference on the same inputs: diffusers' WanTransformer3DModel(s)
and UniPCMultistepScheduler (torch, float32, the same tiny repo; text embeddings from diffusers'
``encode_prompt``; the same initial latents), driven piece by piece (patch embedding, condition embedder,
rotary, blocks, output head), with each policy's rule written out below in plain Python from its definition:
MagCache's decisions are the replay of the authors' scripts in test_caching_plans.py, and a skipped branch
is its tokens plus the residual of its last computed step; the CFG cache rebuilds uncond as
``cond - (cond - uncond)`` of the last full step; TeaCache (TeaCache4Wan2.1 ``teacache_forward``)
accumulates the polynomial-rescaled relative L1 change of the (modulated) timestep embedding and resets
when it computes; FirstBlockCache (diffusers' FBC hooks) compares block 0's residual with the one of the
last computed step. Compared: the final latents (float32 pipeline on a float32 checkpoint), the per-branch
block-run counts, and the per-step decisions and residual-norm ratios (``Generation.mag_ratios``: a branch
that reused its residual has ratio 1 there).
"""
import json

import numpy as np
import pytest

from wan_runtime import caching
from wan_runtime.pipeline import DEFAULT_NEGATIVE, WanPipeline

from tests.test_caching_plans import CAL_PATH, replay

PROMPT, NEGATIVE = "a red fox runs through fresh snow", "blurry"
KW = dict(height=32, width=48, num_frames=9, guidance_scale=4.0, seed=5)
STEPS = 6
FAMILIES = ("wan2.1-t2v", "wan2.2-t2v-a14b")


def _run(pipe, plan=None, **kw):
    cache = None if plan is None else caching.FixedPlan(plan).validate()
    return pipe(PROMPT, NEGATIVE, num_inference_steps=STEPS, cache=cache, **{**KW, **kw})


def _plan(cond, uncond, from_diff=None):
    from_diff = [0] * len(cond) if from_diff is None else from_diff
    return np.array([cond, uncond, from_diff], bool).T


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def f32(tiny_repos, tmp_path_factory):
    """family -> float32 pipeline on a float32 checkpoint (converted once, shared by every test here)."""
    from wan_convert.convert import convert

    root, pipes = tmp_path_factory.mktemp("f32cache"), {}

    def get(family):
        if family not in pipes:
            path = convert(str(tiny_repos[family]), root / family, weights_dtype="float32").output
            pipes[family] = WanPipeline.from_converted(path, dtype="float32")
        return pipes[family]
    return get


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request, f32):
    return f32(request.param)


@pytest.fixture(scope="module")
def reference(tiny_repos):
    """family -> Reference (diffusers' models of the same tiny repo, loaded once)."""
    refs = {}

    def get(family):
        if family not in refs:
            refs[family] = Reference(tiny_repos[family])
        return refs[family]
    return get


# ------------------------------------------------------------------------------------------- structure
def test_plan_without_skips_is_dense_bitwise(pipe):
    dense = _run(pipe).frames
    full = _run(pipe, _plan([1] * STEPS, [1] * STEPS))
    assert np.array_equal(dense, full.frames)
    assert full.block_runs.tolist() == [STEPS, STEPS]


def test_skipped_branches_run_no_blocks(pipe):
    cond = [1, 1, 0, 1, 0, 1]
    uncond = [1, 0, 1, 1, 0, 1]
    out = _run(pipe, _plan(cond, uncond))
    assert out.block_runs.tolist() == [sum(cond), sum(uncond)]
    assert np.isfinite(out.frames).all()
    assert not np.array_equal(out.frames, _run(pipe).frames)  # reusing residuals changes the result


def test_no_guidance_single_branch(pipe):
    out = _run(pipe, _plan([1, 0, 1, 0, 1, 1], [0] * STEPS), guidance_scale=1.0, guidance_scale_2=1.0)
    assert out.block_runs.tolist() == [4]
    assert np.isfinite(out.frames).all()


def test_calibration_tool_records_ratios(f32):
    import calibrate_magcache

    ratios = calibrate_magcache.calibrate(f32("wan2.1-t2v"), "a fox", 5, negative_prompt="blurry", **KW)
    assert len(ratios) == 10 and ratios[:2] == [1.0, 1.0]
    assert all(0.2 < r < 5.0 for r in ratios[2:]) and len(set(ratios[2:])) > 1


def test_calibration_tool_on_an_image_to_video_model(f32, tmp_path):
    """The tool's CLI on Wan 2.1 I2V: needs --image (one line, exit 2 without), then writes the curve
    with the checkpoint's flow shift."""
    import json

    import calibrate_magcache
    from PIL import Image

    ck, out, img = f32("wan2.1-i2v").ckpt.root, tmp_path / "calib.json", tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)).save(img)
    args = ["--checkpoint", str(ck), "--name", "mine", "--out", str(out), "--steps", "3", "--height", "32",
            "--width", "48", "--frames", "5", "--dtype", "float32"]
    with pytest.raises(SystemExit) as e:
        calibrate_magcache.main(args)
    assert e.value.code == 2 and not out.exists()
    assert calibrate_magcache.main(args + ["--image", str(img)]) == 0
    entry = json.loads(out.read_text())["models"]["mine"]
    assert len(entry["mag_ratios"]) == 6 and entry["steps"] == 3 and entry["flow_shift"] > 0


def test_policies_end_to_end_with_two_experts(f32):
    """MagCache (published Wan 2.2 curve) and CFG cache through the one loop, across the expert switch;
    thresh 0 is dense bitwise; the block-run count equals the host plan's."""
    from wan_runtime import schedulers

    pipe = f32("wan2.2-t2v-a14b")
    steps = 12
    dense = pipe(PROMPT, NEGATIVE, num_inference_steps=steps, **KW)
    zero = caching.MagCache(thresh=0.0, model="wan2.2_t2v_A14B").validate()
    same = pipe(PROMPT, NEGATIVE, num_inference_steps=steps, cache=zero, **KW)
    assert np.array_equal(dense.frames, same.frames) and same.block_runs.tolist() == [steps, steps]
    config = pipe.config()
    sched = schedulers.make_schedule("unipc", steps, config.flow_shift)
    k = schedulers.expert_boundary_index(sched.timesteps, config.boundary)
    for cfg in (caching.MagCache(thresh=0.5, K=3, retention=0.2, model="wan2.2_t2v_A14B").validate(),
                caching.CFGCache(interval=2, start=2).validate()):
        plan = cfg.plan(steps, boundary_index=k)
        out = pipe(PROMPT, NEGATIVE, num_inference_steps=steps, cache=cfg, **KW)
        assert out.block_runs.tolist() == [int(plan[:, 0].sum()), int(plan[:, 1].sum())]
        assert out.block_runs.sum() < 2 * steps  # something was skipped
        assert plan[k, 0] and plan[k, 1]  # the first low-noise step computes both branches
        assert np.isfinite(out.frames).all()
    assert out.warnings == () or "flow_shift" in out.warnings[0]


@pytest.mark.parametrize("policy", ["teacache", "firstblock"])
def test_data_dependent_policies_thresh_zero_is_dense(pipe, policy):
    """TeaCache and FirstBlockCache decide inside the loop (lax.switch on traced flags): thresh 0 is dense
    bitwise."""
    cfg = (caching.TeaCache(thresh=0.0, model="ret_steps_1.3B") if policy == "teacache"
           else caching.FirstBlockCache(thresh=0.0)).validate()
    dense = _run(pipe)
    same = pipe(PROMPT, NEGATIVE, num_inference_steps=STEPS, cache=cfg, **KW)
    assert np.array_equal(dense.frames, same.frames) and same.block_runs.tolist() == [STEPS, STEPS]


# ------------------------------------------------------------------------------------------- reference
class Reference:
    """diffusers' Wan transformer(s) and UniPC scheduler of one tiny repo (torch, float32), driven piece by
    piece, with the step-caching rules written out in plain Python.

    Per step and branch (0 cond, 1 uncond; one model call each, as diffusers' pipeline does) the
    "skippable" blocks (all of them; all but block 0 for FirstBlockCache) either run, and their residual
    (out - in) is kept for the branch, or are replaced by in + that kept residual."""

    def __init__(self, repo):
        import torch
        from diffusers import UniPCMultistepScheduler
        from diffusers import WanPipeline as DiffusersWan

        self.torch = torch
        dp = DiffusersWan.from_pretrained(repo, torch_dtype=torch.float32)
        self.experts = [m for m in (dp.transformer, dp.transformer_2) if m is not None]
        self.boundary_ratio = dp.config.boundary_ratio
        self.scheduler = lambda: UniPCMultistepScheduler.from_config(dp.scheduler.config)
        with torch.no_grad():
            pos, neg = dp.encode_prompt(PROMPT, DEFAULT_NEGATIVE, do_classifier_free_guidance=True,
                                        max_sequence_length=512, device=torch.device("cpu"))
        self.context = (pos, neg)
        self._dense = {}

    def expert_of_steps(self, steps):
        """Per step: 0 (``transformer``, while t >= boundary_ratio * num_train_timesteps) or 1."""
        sched = self.scheduler()
        sched.set_timesteps(steps)
        if self.boundary_ratio is None:
            return [0] * steps
        boundary = self.boundary_ratio * sched.config.num_train_timesteps
        return [0 if t >= boundary else 1 for t in sched.timesteps]

    @staticmethod
    def head(model, h, temb, shape):
        """diffusers' output norm (float32, shift/scale from temb), projection and unpatchify, one branch."""
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        h = model.proj_out(model.norm_out(h.float()) * (1 + scale) + shift)
        pt, ph, pw = model.config.patch_size
        _, _, f, hh, ww = shape
        h = h.reshape(1, f // pt, hh // ph, ww // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.reshape(1, -1, f, hh, ww)

    def run(self, latents, steps, guidance, policy, *, plan=None, thresh=None, coefficients=None,
            modulated=False, forced=()):
        """policy "plan": ``plan`` bool (steps, 3) as the pipeline takes it (compute cond, compute uncond,
        uncond from the CFG cache); "teacache" / "firstblock": decided here from the data, with ``forced``
        steps (and the first step of each expert) always computed. ``guidance``: per expert.

        Returns the final latents, ran bool (steps, 2), the residual-norm ratio (steps, 2) and the
        policy's metric (steps, 2; TeaCache's accumulator, FirstBlockCache's change; NaN where forced)."""
        torch = self.torch
        sched = self.scheduler()
        sched.set_timesteps(steps)
        experts = self.expert_of_steps(steps)
        x = torch.from_numpy(np.asarray(latents, np.float32))
        ran = np.zeros((steps, 2), bool)
        ratio = np.ones((steps, 2))
        metric = np.full((steps, 2), np.nan)
        kept = [None, None]  # per branch: residual of the skippable blocks at its last computed step
        prev_e, acc = [None, None], [0.0, 0.0]  # TeaCache
        prev_r1 = [None, None]  # FirstBlockCache: block 0's residual at the last computed step
        diff = None  # CFG cache: cond - uncond of the last step that computed both
        poly = None if coefficients is None else np.poly1d(coefficients)
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                k = experts[i]
                model = self.experts[k]
                first_of_expert = i == 0 or experts[i - 1] != k
                rope = model.rope(x)
                tokens = model.patch_embedding(x).flatten(2).transpose(1, 2)
                v = []
                for b in (0, 1):
                    temb, proj, ctx, _ = model.condition_embedder(t.expand(1), self.context[b])
                    proj = proj.unflatten(1, (6, -1))
                    blocks, h_in = list(model.blocks), tokens
                    if policy == "plan":
                        compute = bool(plan[i][b])
                    elif policy == "teacache":
                        e = (proj if modulated else temb).float()
                        if i in forced or first_of_expert:
                            compute = True
                        else:
                            rel = ((e - prev_e[b]).abs().mean() / prev_e[b].abs().mean()).item()
                            acc[b] += poly(rel)
                            metric[i, b] = acc[b]
                            compute = acc[b] >= thresh
                        if compute:
                            acc[b] = 0.0
                        prev_e[b] = e
                    elif policy == "firstblock":
                        h_in = blocks.pop(0)(tokens, ctx, proj, rope)
                        r1 = h_in - tokens
                        if i in forced or first_of_expert:
                            compute = True
                        else:
                            change = ((r1 - prev_r1[b]).abs().mean() / prev_r1[b].abs().mean()).item()
                            metric[i, b] = change
                            compute = change >= thresh
                        if compute:
                            prev_r1[b] = r1
                    else:
                        raise ValueError(policy)
                    if compute:
                        h = h_in
                        for block in blocks:
                            h = block(h, ctx, proj, rope)
                    else:
                        h = h_in + kept[b]
                    new = h - h_in
                    if kept[b] is not None:  # the pipeline's MagCache calibration statistic
                        ratio[i, b] = (new.norm(dim=-1) / kept[b].norm(dim=-1)).mean().item()
                    if compute:
                        kept[b] = new
                    ran[i, b] = compute
                    v.append(self.head(model, h, temb, x.shape))
                cond, uncond = v
                if policy == "plan" and plan[i][2]:
                    uncond = cond - diff
                elif ran[i].all():
                    diff = cond - uncond
                x = sched.step(uncond + guidance[k] * (cond - uncond), t, x, return_dict=False)[0]
        return x.numpy(), ran, ratio, metric

    def dense(self, latents, steps, guidance):
        """The uncached run (cached per inputs)."""
        key = (np.asarray(latents).tobytes(), steps, tuple(guidance))
        if key not in self._dense:
            self._dense[key] = self.run(latents, steps, guidance, "plan", plan=np.ones((steps, 3), bool) & [1, 1, 0])[0]
        return self._dense[key]


# ------------------------------------------------------------------------------------------- values
VSTEPS = 8
LATENTS = (1, 16, 3, 4, 6)  # (9 frames, 32 x 48) in latent space
GUIDANCE = {"wan2.1-t2v": (4.0, 4.0), "wan2.2-t2v-a14b": (4.0, 3.0)}  # per expert
COEFFICIENTS = json.loads(CAL_PATH.read_text())["teacache_coefficients_wan2.1"]

# case -> (family, policy settings: ``_policy`` makes the caching.Policy). Thresholds are chosen (from the reference's metrics, 8 steps) so
# that each run skips some steps and computes others, with no metric near its threshold. The value tests use
# the long default negative prompt: with "blurry" the two branches' block-0 residuals differ by only 0.3 %
# (3 % with it), too little for a FirstBlockCache comparing against the other branch to change a decision.
CASES = {
    "magcache/wan2.1-t2v": ("wan2.1-t2v", dict(policy="magcache", model="wan2.1_t2v_1.3B", thresh=0.12, K=2,
                                                retention=0.2)),
    "magcache/wan2.2-t2v": ("wan2.2-t2v-a14b", dict(policy="magcache", model="wan2.2_t2v_A14B", thresh=0.5, K=3,
                                                     retention=0.4)),
    "cfg/wan2.1-t2v": ("wan2.1-t2v", dict(policy="cfg", cfg_start=2, cfg_interval=2)),
    "cfg/wan2.2-t2v": ("wan2.2-t2v-a14b", dict(policy="cfg", cfg_start=2, cfg_interval=2)),
    "teacache/wan2.1-t2v": ("wan2.1-t2v", dict(policy="teacache", model="1.3B", teacache_thresh=150.0)),
    "teacache/wan2.2-t2v": ("wan2.2-t2v-a14b", dict(policy="teacache", model="1.3B", teacache_thresh=150.0)),
    # the modulated-embedding (e0) variant: steps 0-4 forced; any polynomial serves (this one is positive here)
    "teacache-e0/wan2.1-t2v": ("wan2.1-t2v", dict(policy="teacache", model="ret_steps_i2v_720P",
                                                   teacache_thresh=150.0)),
    "firstblock/wan2.1-t2v": ("wan2.1-t2v", dict(policy="firstblock", firstblock_thresh=0.1)),
    "firstblock/wan2.2-t2v": ("wan2.2-t2v-a14b", dict(policy="firstblock", firstblock_thresh=0.1)),
}


#: a case's setting -> its flag name (caching.from_settings)
FLAGS = {"policy": "cache", "thresh": "cache_thresh", "K": "cache_k", "retention": "cache_retention",
         "model": "cache_model", "cfg_start": "cfg_cache_start", "cfg_interval": "cfg_cache_interval"}


def _policy(settings, **extra):
    """The caching.Policy of a case's settings (validated)."""
    return caching.from_settings({**{FLAGS.get(k, k): v for k, v in settings.items()}, **extra})


def reference_run(ref, settings, latents, guidance):
    """The reference's run of one policy: (latents, ran, ratio, metric), decisions made here."""
    steps, experts = VSTEPS, ref.expert_of_steps(VSTEPS)
    policy = settings["policy"]
    if policy == "magcache":  # the authors' decisions, split at the first low-noise step (t2v mode)
        split = experts.count(0) if len(ref.experts) > 1 else None
        curve = json.loads(CAL_PATH.read_text())["models"][settings["model"]]["mag_ratios"]
        cond, uncond = replay(curve, steps, settings["thresh"], settings["K"], settings["retention"], split, "t2v")
        plan = np.stack([cond, uncond, np.zeros(steps, bool)], 1)
        return ref.run(latents, steps, guidance, "plan", plan=plan)
    if policy == "cfg":  # uncond reused from `start` on, except every `interval`-th step, step 0, a switch
        start, interval = settings["cfg_start"], settings["cfg_interval"]
        reuse = np.array([i >= start and (i - start) % interval != 0 and i > 0 and experts[i] == experts[i - 1]
                          for i in range(steps)])
        plan = np.stack([np.ones(steps, bool), ~reuse, reuse], 1)
        return ref.run(latents, steps, guidance, "plan", plan=plan)
    if policy == "teacache":  # TeaCache4Wan2.1: ret_steps keys use e0 and compute calls < 10; else first, last
        modulated = settings["model"].startswith("ret_steps_")
        forced = set(range(5)) if modulated else {0, steps - 1}
        return ref.run(latents, steps, guidance, "teacache", thresh=settings["teacache_thresh"],
                       coefficients=COEFFICIENTS[settings["model"]], modulated=modulated, forced=forced)
    return ref.run(latents, steps, guidance, "firstblock", thresh=settings["firstblock_thresh"], forced={0})


@pytest.mark.parametrize("case", list(CASES))
def test_policy_matches_reference(case, f32, reference, measured):
    """Our run of a policy (``cache=``, same latents) against the reference's: the same decisions per step
    and branch, the same block runs, the same residual-norm ratios and final latents (float32 noise)."""
    family, settings = CASES[case]
    pipe, ref = f32(family), reference(family)
    guidance = GUIDANCE[family]
    latents = np.random.default_rng(0).standard_normal(LATENTS, dtype=np.float32)
    want, ran, ratio, metric = reference_run(ref, settings, latents, guidance)

    # the check sees something: the run computes both branches at step 0, skips some later ones ...
    assert ran[0].all() and not ran.all(), ran
    if settings["policy"] in ("teacache", "firstblock"):  # ... decides some of them from the data ...
        decided = ~np.isnan(metric)
        assert ran[decided].any() and not ran[decided].all(), (ran, metric)
        thresh = settings.get("teacache_thresh", settings.get("firstblock_thresh"))
        margin = float(np.nanmin(np.abs(metric - thresh)) / thresh)
        # ... with no metric near its threshold (smallest relative margin measured: 1.8e-2)
        assert margin > 1e-3, f"a metric within {margin:.1e} of the threshold: {metric}"
    # ... computed steps move the residual norm (|ratio - 1| >= 7.7e-4 measured), so the ratios tell decisions
    assert np.abs(ratio[1:][ran[1:]] - 1.0).min() > 1e-4
    # ... and the policy moves the latents far more than the tolerance below (measured >= 7.1e-3)
    effect = float(np.abs(want - ref.dense(latents, VSTEPS, guidance)).max())
    assert effect > 10 * 1e-4, effect

    cache = _policy(settings, cache_calibration=str(CAL_PATH))
    gen = pipe(PROMPT, DEFAULT_NEGATIVE, height=32, width=48, num_frames=9, num_inference_steps=VSTEPS,
               guidance_scale=guidance[0], guidance_scale_2=guidance[1], latents=latents, cache=cache)
    got = np.asarray(gen.latents, np.float32)
    ratios = np.asarray(gen.mag_ratios, np.float64)
    ran_ours = np.abs(ratios - 1.0) > 1e-5  # a reused residual gives ratio 1 (measured: exactly 1.0)
    ran_ours[0] = True  # step 0 has no previous residual: ratio 1 by definition
    np.testing.assert_array_equal(ran_ours.T, ran.T, err_msg=f"{case}: decisions (step x [cond, uncond])")
    assert gen.block_runs.tolist() == ran.sum(0).tolist()

    err = float(np.abs(got - want).max())
    err_ratio = float(np.abs(ratios - ratio).max())
    skipped = int(ran.size - ran.sum())
    measured(f"caching/{case}/latents_max_abs", err, steps=VSTEPS, skipped=skipped, effect=effect)
    measured(f"caching/{case}/mag_ratio_max_abs", err_ratio, steps=VSTEPS)
    print(f"{case}: latents max abs {err:.2e} (|latents| <= {np.abs(want).max():.1f}; cached - dense {effect:.1e}), "
          f"ratios {err_ratio:.1e}, {skipped} of {ran.size} branch-steps skipped; min |computed ratio - 1| "
          f"{np.abs(ratio[1:][ran[1:]] - 1.0).min():.1e}" + (f"; threshold margin {margin:.1e}" if not
                                                              np.isnan(metric).all() else ""))
    assert err < 1e-4, err  # measured 3.2e-6 .. 9.4e-6 over runs (latents up to ~4.4)
    assert err_ratio < 1e-5, err_ratio  # measured 1.2e-7 .. 6.0e-7 over runs
