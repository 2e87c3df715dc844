"""Batched generation: N same-shape jobs as one batch (``WanPipeline.generate_batch``) against the same N
jobs one ``generate`` call each, in the same process on the same weights.

    python tools/bench_batch.py [--size small] [--jobs 4] [--steps 4] [--height 128 --width 128 --frames 9]
                                [--repeat 3] [--json FILE]

On a random "small" Wan 2.1 model (tools/make_tiny_checkpoint.py --size small, ~50M transformer params:
compute, not dispatch, dominates), float32 on CPU (the platform's default dtypes), guidance 5 (CFG: the
batch runs 2N rows). Both ways are compiled and run once first (warm-up); then ``--repeat`` interleaved
rounds, each timing the batch and the N single calls back to back (which goes first alternates), and the
ratio batch / N singles is taken within each round (these machines drift run to run) and its median
reported, for the wall time and per stage (the Generations' timings). The batch's videos are checked
against the singles' (max abs on float32 frames).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]

PROMPTS = ("a red fox runs through fresh snow in a quiet forest at dawn",
           "waves crash on a rocky beach under a purple sky",
           "a small robot walks along a busy city street at night",
           "an astronaut rides a horse on the moon",
           "slow motion close-up of a hummingbird drinking from a flower",
           "aerial view of green mountains, rivers and clouds")
STAGES = ("conditioning", "denoise", "decode")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(workdir: pathlib.Path, size: str = "small", jobs: int = 4, steps: int = 4, height: int = 128,
            width: int = 128, frames: int = 9, repeat: int = 3) -> dict:
    """Wall and per-stage seconds of each round, both ways, their ratios, and the batch-vs-singles error."""
    import make_tiny_checkpoint as mtc
    from wan_runtime.pipeline import WanPipeline

    pipe = WanPipeline.from_converted(mtc.converted(workdir, size))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(jobs)]
    configs = [pipe.config(height=height, width=width, num_frames=frames, num_inference_steps=steps,
                           guidance_scale=5.0, seed=i, negative_prompt="blurry, static") for i in range(jobs)]
    batch = lambda: pipe.generate_batch(prompts, configs)  # noqa: E731
    singles = lambda: [pipe.generate(p, c) for p, c in zip(prompts, configs)]  # noqa: E731
    warm = {"batch": _timed(batch)[0], "singles": _timed(singles)[0]}  # compile + first run
    rounds = []
    for r in range(repeat):
        order = ("batch", "singles") if r % 2 == 0 else ("singles", "batch")
        got = {name: _timed(batch if name == "batch" else singles) for name in order}
        (tb, gb), (ts, gs) = got["batch"], got["singles"]
        rounds.append({"batch_s": tb, "singles_s": ts,
                       "batch_stages": {k: getattr(gb[0].timings, k) for k in STAGES},
                       "singles_stages": {k: sum(getattr(g.timings, k) for g in gs) for k in STAGES},
                       "max_abs": max(float(np.abs(b.frames - s.frames).max()) for b, s in zip(gb, gs))})
    ratio = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    return {"size": size, "jobs": jobs, "steps": steps, "height": height, "width": width, "frames": frames,
            "guidance": 5.0, "dtypes": pipe.dtypes.transformer, "warmup_s": warm, "rounds": rounds,
            "ratio_wall": ratio(lambda r: r["batch_s"] / r["singles_s"]),
            "ratio_stages": {k: ratio(lambda r: r["batch_stages"][k] / r["singles_stages"][k]) for k in STAGES},
            "max_abs": max(r["max_abs"] for r in rounds), "machine": platform.processor() or platform.machine()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=pathlib.Path, help="also write the result here")
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "wan-bench-runtime")
    args = ap.parse_args(argv)
    r = measure(args.workdir, args.size, args.jobs, args.steps, args.height, args.width, args.frames, args.repeat)
    n = r["jobs"]
    print(f"\nbatched generation, {args.size} model ({r['dtypes']}), {args.height}x{args.width}x{args.frames}, "
          f"{args.steps} steps, CFG 5: {n} jobs as one batch vs {n} single calls, median of {args.repeat} "
          f"interleaved rounds (after a warm-up of each)")
    print(f"{'':<14}{'batch s':>9}{f'{n} singles s':>13}{'ratio':>8}")
    med = lambda key: statistics.median(x[key] for x in r["rounds"])  # noqa: E731
    print(f"{'wall':<14}{med('batch_s'):>9.3f}{med('singles_s'):>13.3f}{r['ratio_wall']:>8.2f}")
    for k in STAGES:
        b = statistics.median(x["batch_stages"][k] for x in r["rounds"])
        s = statistics.median(x["singles_stages"][k] for x in r["rounds"])
        print(f"{k:<14}{b:>9.3f}{s:>13.3f}{r['ratio_stages'][k]:>8.2f}")
    print(f"batch vs singles, frames max abs: {r['max_abs']:.1e}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
