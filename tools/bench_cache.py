"""Step caching: denoise speed-up vs dense, against the skipped-forward bound, and quality vs dense.

    python tools/bench_cache.py [--size small] [--steps 20] [--height 128 --width 128 --frames 9]

On a random "small" Wan 2.1 model (tools/make_tiny_checkpoint.py --size small, bf16 checkpoint): the
model is first calibrated for MagCache with tools/calibrate_magcache.py's routine (random weights have
no published curve), then each policy runs the same generation as the dense baseline. The bound is
(dense block forwards) / (forwards the policy ran; FirstBlockCache's always-run first block counted in
block units): what skipping alone could give if the blocks were
all of the step's time. PSNR and SSIM (uint8 frames, peak 255) are against the dense output.
"""
from __future__ import annotations

import argparse
import json
import statistics
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames and channels (Gaussian window sigma 1.5, K1 0.01, K2 0.03, L 255)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for fa, fb in zip(a.astype(np.float64), b.astype(np.float64)):
        for ch in range(fa.shape[-1]):
            x, y = fa[..., ch], fb[..., ch]
            mx, my = gaussian_filter(x, 1.5), gaussian_filter(y, 1.5)
            sxx = gaussian_filter(x * x, 1.5) - mx * mx
            syy = gaussian_filter(y * y, 1.5) - my * my
            sxy = gaussian_filter(x * y, 1.5) - mx * my
            m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
            vals.append(m.mean())
    return float(np.mean(vals))


def measure(workdir: pathlib.Path, size: str = "small", steps: int = 20, height: int = 128, width: int = 128,
            frames: int = 9, repeat: int = 3) -> list[dict]:
    """One row per policy: forwards run, median denoise seconds, speed-up (median over the rounds of dense /
    policy in the same round), bound, PSNR, SSIM."""
    import calibrate_magcache
    import make_tiny_checkpoint as mtc
    from wan_runtime import caching
    from wan_runtime.pipeline import WanPipeline

    pipe = WanPipeline.from_converted(mtc.converted(workdir, size), dtype="bfloat16")  # the README's bf16 rows
    kw = dict(negative_prompt="blurry, static", height=height, width=width, num_frames=frames,
              guidance_scale=5.0, seed=0, output_type="uint8")
    prompt = "a red fox runs through fresh snow"
    ratios = calibrate_magcache.calibrate(pipe, "a cat walks on the grass", steps, **{**kw, "output_type": "np"})
    calibration = workdir / f"calibration-{size}-{steps}.json"
    calibration.write_text(json.dumps({"models": {"bench": {
        "steps": steps, "mag_ratios": ratios, "recommended": {"thresh": 0.1, "K": 2, "retention": 0.2}}}}))
    mag = lambda **k: caching.MagCache(model="bench", calibration=str(calibration), retention=0.2, **k)  # noqa: E731
    policies = {
        "dense": caching.Dense(),
        "magcache thresh 0 (all run)": mag(thresh=0.0, K=2),  # the caching machinery, nothing skipped
        "magcache thresh 0.06 K 2": mag(thresh=0.06, K=2),
        "magcache thresh 0.12 K 3": mag(thresh=0.12, K=3),
        "cfg cache interval 2": caching.CFGCache(interval=2),
        # TeaCache's published coefficients are for the real 1.3B; on random weights they only set a pace
        "teacache thresh 0.3": caching.TeaCache(thresh=0.3, model="ret_steps_1.3B"),
        "firstblock thresh 0.1": caching.FirstBlockCache(thresh=0.1),
    }
    for name, policy in policies.items():
        pipe(prompt, num_inference_steps=steps, cache=policy.validate(), **kw)  # compile + warm
    # interleaved rounds, median of each: these machines drift (+-10% run to run), and a slow minute must
    # not land on one policy
    times, runs = {name: [] for name in policies}, {}
    for _ in range(repeat):
        for name, policy in policies.items():
            gen = pipe(prompt, num_inference_steps=steps, cache=policy, **kw)
            times[name].append(gen.timings.denoise)
            forwards = 2 * steps if gen.block_runs is None else int(gen.block_runs.sum())
            if isinstance(policy, caching.FirstBlockCache):  # block 0 always runs: count in block units
                n_layers = pipe.tcfgs[0].num_layers
                forwards = (2 * steps + forwards * (n_layers - 1)) / n_layers
            runs[name] = (forwards, gen.frames)
    base_f, base_out = runs["dense"]
    rows = []
    for name, (f, out) in runs.items():
        # speed-up: median over rounds of dense / policy within the round (the machine drifts between rounds)
        speedup = statistics.median(d / t for d, t in zip(times["dense"], times[name]))
        rows.append(dict(policy=name, forwards=f, dense_forwards=base_f, denoise_s=statistics.median(times[name]),
                         speedup=speedup, bound=base_f / f, of_bound=speedup / (base_f / f), psnr=psnr(out, base_out),
                         ssim=ssim(out, base_out), times=times[name]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "wan-bench-runtime")
    args = ap.parse_args(argv)
    rows = measure(args.workdir, args.size, args.steps, args.height, args.width, args.frames, args.repeat)
    print(f"\nstep caching, {args.size} model, {args.height}x{args.width}x{args.frames}, {args.steps} steps, CFG 5, "
          f"median of {args.repeat} interleaved rounds")
    print(f"{'policy':<28} {'forwards':>9} {'denoise s':>10} {'speed-up':>9} {'bound':>6} {'of bound':>9} "
          f"{'PSNR dB':>8} {'SSIM':>6}")
    for r in rows:
        print(f"{r['policy']:<28} {r['forwards']:>5.4g}/{r['dense_forwards']:<3} {r['denoise_s']:>10.3f} "
              f"{r['speedup']:>9.2f} {r['bound']:>6.2f} {r['of_bound']:>9.2f} {r['psnr']:>8.2f} {r['ssim']:>6.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
