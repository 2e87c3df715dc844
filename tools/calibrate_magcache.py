"""Calibrate MagCache for any converted checkpoint (e.g. a fine-tune): run one dense generation and
record, per denoising step and branch, the mean over tokens of ||r_t|| / ||r_(t-1)|| of the
transformer-block residual r. Written in the layout of shared/reference/cache_calibration.json
(interleaved [cond, uncond] per step, the first step 1.0), so `wan-run --cache magcache
--cache-calibration FILE --cache-model NAME` can use it.

    python tools/calibrate_magcache.py --checkpoint CKPT --name my_finetune --out calib.json \
        [--prompt ...] [--steps 50] [--height 480 --width 832 --frames 81] [--flow-shift S] [--guidance G]
        [--image first_frame.png]   (image-to-video models: required)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime")]


def calibrate(pipe, prompt: str, steps: int, **kw) -> list[float]:
    from wan_runtime import caching

    plan = np.ones((steps, 3), bool)
    plan[:, 2] = False
    ratios = pipe(prompt, num_inference_steps=steps, cache=caching.FixedPlan(plan), **kw).mag_ratios  # (steps, branches)
    if ratios.shape[1] == 1:  # no guidance: duplicate so the layout stays [cond, uncond]
        ratios = np.repeat(ratios, 2, axis=1)
    return [round(float(v), 5) for v in ratios.reshape(-1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--name", required=True, help="model key in the output file")
    ap.add_argument("--out", type=pathlib.Path, required=True, help="JSON file (merged into if it exists)")
    ap.add_argument("--prompt", default="A cat walks on the grass, realistic style.")
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--guidance-2", type=float, default=None)
    ap.add_argument("--flow-shift", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--image", default=None, help="first frame (image-to-video models need one)")
    args = ap.parse_args(argv)

    from wan_runtime.pipeline import DEFAULT_NEGATIVE, WanPipeline

    pipe = WanPipeline.from_converted(args.checkpoint, dtype=args.dtype)
    if pipe.family.image_input == "required" and args.image is None:
        ap.error(f"--image: {pipe.ckpt.family} is an image-to-video model; give the first frame to calibrate with")
    ratios = calibrate(pipe, args.prompt, args.steps, negative_prompt=args.negative_prompt or DEFAULT_NEGATIVE,
                       height=args.height, width=args.width, num_frames=args.frames, guidance_scale=args.guidance,
                       guidance_scale_2=args.guidance_2, flow_shift=args.flow_shift, seed=args.seed, image=args.image)
    config = pipe.config(image=args.image is not None, flow_shift=args.flow_shift)
    entry = {"steps": args.steps, "flow_shift": config.flow_shift, "mag_ratios": ratios,
             "recommended": {"thresh": 0.06, "K": 2, "retention": 0.2}}
    if config.boundary is not None and len(pipe.experts) > 1:
        entry["boundary_ratio"] = config.boundary
    data = json.loads(args.out.read_text()) if args.out.exists() else {"models": {}}
    data.setdefault("models", {})[args.name] = entry
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.name}: {args.steps} steps, {len(ratios)} ratios -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
