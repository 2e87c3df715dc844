"""Runtime optimizations, each against its baseline measured in the same run:

- compile: a second `wan-run` process (warm persistent compilation cache) vs the first (cold cache);
- startup: components restored in parallel threads vs one after another;
- cross-attention KV cache: denoise time with the K/V computed once vs recomputed every step.

    python tools/bench_runtime.py [--size small] [--height 128 --width 128 --frames 9 --steps 4]

Uses a random diffusers-format Wan 2.1 T2V model written by tools/make_tiny_checkpoint.py (--size small:
D=512, 8 layers, 256-wide UMT5; ~150 MB FP32), converted to bf16. Text length is the real 512 tokens.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}


def wan_run(ck, cache, args, out, *extra: str) -> dict[str, float]:
    """One ``wan-run`` process; its TIMING SUMMARY (seconds by stage, and the process's wall time)."""
    cmd = [sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(ck), "--prompt", "a red fox in the snow",
           "--height", str(args.height), "--width", str(args.width), "--frames", str(args.frames), "--steps",
           str(args.steps), "--compile-cache", str(cache), "--output", str(out), "-q", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    return {**{k: float(v) for k, v in re.findall(r"^\s+(\w+)\s+([\d.]+) s$", r.stdout, re.M)}, "process": wall}


def generation(workdir: pathlib.Path, size: str, height: int = 128, width: int = 128, frames: int = 9,
               steps: int = 4, diffusers: bool = False) -> dict:
    """End to end on a random model of ``size``: a first ``wan-run`` process (cold compilation cache) and
    a second (warm), TIMING SUMMARY of each; with ``diffusers``, also both at float32 against diffusers'
    WanPipeline on the same source repository (generation = text encoding + denoise + decode)."""
    import make_tiny_checkpoint as mtc

    ck = mtc.converted(workdir, size)
    args = argparse.Namespace(height=height, width=width, frames=frames, steps=steps)
    out = dict(size=size, height=height, width=width, frames=frames, steps=steps)
    with tempfile.TemporaryDirectory() as cache:
        out["cold"] = wan_run(ck, cache, args, workdir / "cold.mp4")
        out["warm"] = wan_run(ck, cache, args, workdir / "warm.mp4")
        if diffusers:
            # compile time is reported apart, so one process gives the generation time
            out["ours_fp32"] = wan_run(ck, cache, args, workdir / "fp32.mp4", "--dtype", "float32")
            out["diffusers_fp32"] = diffusers_generation(workdir / f"src-{size}", args)
    out["compile_warm_vs_cold"] = out["warm"]["compile"] / out["cold"]["compile"]
    return out


def diffusers_generation(src: pathlib.Path, args) -> dict[str, float]:
    """diffusers' WanPipeline (float32, torch CPU) on the source repository: load and one generation
    (the second call; the first creates oneDNN primitives) at the same size, steps and guidance."""
    import torch
    from diffusers import WanPipeline as DiffusersPipeline

    t0 = time.perf_counter()
    pipe = DiffusersPipeline.from_pretrained(src, torch_dtype=torch.float32)
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red fox in the snow", height=args.height, width=args.width, num_frames=args.frames,
              num_inference_steps=args.steps, guidance_scale=5.0, output_type="np")
    pipe(**kw, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    pipe(**kw, generator=torch.Generator().manual_seed(0))
    return {"load": load, "generation": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "wan-bench-runtime")
    args = ap.parse_args(argv)

    import make_tiny_checkpoint as mtc

    ck = mtc.converted(args.workdir, args.size)
    machine = f"{os.cpu_count()} cores"
    rows = []

    # 1. compile: cold vs warm persistent cache, whole wan-run processes
    with tempfile.TemporaryDirectory() as cache:
        cold = wan_run(ck, cache, args, args.workdir / "a.mp4")
        warm = wan_run(ck, cache, args, args.workdir / "b.mp4")
    rows.append(("compile, 2nd process vs 1st (persistent cache)", cold["compile"], warm["compile"]))

    # 2. startup: parallel vs serial restore (in-process, alternating, median)
    from wan_runtime.pipeline import WanPipeline

    par, ser = [], []
    for _ in range(args.repeat):
        for flag, acc in ((True, par), (False, ser)):
            t0 = time.perf_counter()
            WanPipeline.from_converted(ck, parallel_restore=flag, dtype="bfloat16")  # restore only: no upcast
            acc.append(time.perf_counter() - t0)
    rows.append(("restore, parallel vs serial components", statistics.median(ser), statistics.median(par)))

    # 3. KV cache: denoise time on vs off (compiled first, then timed)
    pipe = WanPipeline.from_converted(ck, dtype="bfloat16")
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps)
    times = {}
    for on in (True, False):
        variant = pipe.replace(kv_cache=on)
        variant("warm up", **kw)
        vals = [variant("a red fox in the snow", **kw).timings.denoise for _ in range(args.repeat)]
        times[on] = statistics.median(vals)
    rows.append((f"denoise, KV cache on vs off ({args.steps} steps, 512 text tokens)", times[False], times[True]))

    print(f"\nwan-run optimizations, {args.size} model, {args.height}x{args.width}x{args.frames}, {machine}")
    print(f"{'what':<62} {'baseline s':>11} {'optimized s':>12} {'ratio':>7}")
    for what, base, opt in rows:
        print(f"{what:<62} {base:>11.3f} {opt:>12.3f} {opt / base:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
