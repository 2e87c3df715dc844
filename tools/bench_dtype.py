"""Weight and compute dtypes against float32: the same generations (same seeds, so the same initial
latents) with a bf16 checkpoint + bf16 compute, and with the transformer blocks quantized to
float8_e4m3fn and to int8 (per-channel scales, float32 compute: ``--quantize`` at load, the converter's
rule); prints PSNR of the uint8 frames against the float32 run (peak 255) and the denoise-time ratio.

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

    variants = {"float32": ("float32", "float32", None), "bfloat16": ("bfloat16", "bfloat16", None),
                "float8_e4m3fn": ("float32", "float32", "float8_e4m3fn"), "int8": ("float32", "float32", "int8")}
    with tempfile.TemporaryDirectory() as tmp:
        runs, checkpoints = {}, {}
        for name, (stored, compute, quantize) in variants.items():
            if stored not in checkpoints:
                checkpoints[stored] = convert(args.source, pathlib.Path(tmp) / stored, weights_dtype=stored).output
            pipe = WanPipeline.from_converted(checkpoints[stored], dtype=compute, quantize=quantize)
            gens = [pipe("a red fox runs through fresh snow", height=args.height, width=args.width,
                         num_frames=args.frames, num_inference_steps=args.steps, seed=seed, output_type="uint8")
                    for seed in range(args.seeds)]
            runs[name] = ([g.frames for g in gens], sum(g.timings.denoise for g in gens))
        print(f"against float32 on {args.source} ({args.height}x{args.width}, {args.frames} frames, {args.steps} steps, "
              f"{args.seeds} seeds)")
        print(f"{'weights':>14} {'PSNR dB (uint8, peak 255)':>34} {'denoise time / float32':>24}")
        for name in list(variants)[1:]:
            vals = [psnr_uint8(runs[name][0][seed], runs["float32"][0][seed]) for seed in range(args.seeds)]
            span = f"{min(vals):.2f} - {max(vals):.2f} (mean {np.mean(vals):.2f})"
            print(f"{name:>14} {span:>34} {runs[name][1] / runs['float32'][1]:>24.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
