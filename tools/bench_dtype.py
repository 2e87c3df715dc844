"""bf16 vs float32: the same generation (same initial latents) with a bf16 checkpoint + bf16 compute and
with a float32 checkpoint + float32 compute; prints PSNR (uint8 frames, peak 255) and the step-time ratio.

    python tools/bench_dtype.py [--source assets/tiny-wan2.1-t2v] [--height 64 --width 96 --frames 9 --steps 8]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert")]


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default=str(ROOT / "assets" / "tiny-wan2.1-t2v"))
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)

    from wan_convert.convert import convert
    from wan_runtime.pipeline import WanPipeline

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for dt in ("float32", "bfloat16"):
            ck = convert(args.source, pathlib.Path(tmp) / dt, weights_dtype=dt).output
            pipe = WanPipeline.from_converted(ck, dtype=dt)
            gens = [pipe("a red fox runs through fresh snow", height=args.height, width=args.width,
                         num_frames=args.frames, num_inference_steps=args.steps, seed=seed, output_type="uint8")
                    for seed in range(args.seeds)]
            runs[dt] = ([g.frames for g in gens], gens[-1].timings.denoise)
        print(f"bf16 vs float32 on {args.source} ({args.height}x{args.width}, {args.frames} frames, {args.steps} steps)")
        print(f"{'seed':>5} {'PSNR dB (uint8, peak 255)':>26}")
        vals = []
        for seed in range(args.seeds):
            v = psnr_uint8(runs["bfloat16"][0][seed], runs["float32"][0][seed])
            vals.append(v)
            print(f"{seed:>5} {v:>26.2f}")
        print(f"mean PSNR {np.mean(vals):.2f} dB; denoise time bf16/fp32 = {runs['bfloat16'][1] / runs['float32'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
