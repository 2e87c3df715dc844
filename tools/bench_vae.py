"""VAE decode benchmark: wan_runtime's scanned, chunked decode vs diffusers' AutoencoderKLWan, same random
weights and latents, float32 on CPU. Prints XLA's memory analysis (temp = working memory, output = the
video), compile and decode times per latent frame count, diffusers' decode time and the ratio, and the
chunk-size sweep at one frame count.

    python tools/bench_vae.py [--quick] [--base-dim 32] [--size 64] [--frames 5 11 21 41]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert")]

MB = 2.0**20


def measure(base_dim: int = 32, size: int = 128, frames=(5, 11, 21, 41), chunks=(1, 2, 4), chunk_frames: int = 21,
            repeats: int = 1) -> dict:
    """Per latent frame count: XLA memory analysis and decode time of ours (chunk 1), diffusers' decode time,
    the ratio and the relative error; then the chunk sweep at ``chunk_frames`` (empty ``chunks``: none)."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKLWan
    from wan_convert.mapping import tree_from_state_dict

    from wan_runtime.models import vae as V

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True]).eval()
    cfg_dict = dict(model.config)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax.device_put(tree_from_state_dict("vae", sd, cfg_dict, "float32"))
    cfg = V.VAEConfig.from_config(cfg_dict)
    lat = size // cfg.scale_factor_spatial
    res = dict(base_dim=base_dim, params_m=sum(v.size for v in sd.values()) / 1e6, size=size, latent=lat,
               torch_threads=torch.get_num_threads(), frames=[], chunks=[])

    def best(fn):
        """(best wall time over the repeats, last result)."""
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t)
        return min(ts), out

    exes = {}

    def compiled(z, chunk):
        """(executable, compile seconds) for this latent shape and chunk, compiled once."""
        key = (z.shape, chunk)
        if key not in exes:
            t = time.perf_counter()
            exes[key] = V.decode.lower(params, cfg, z, chunk=chunk).compile(), time.perf_counter() - t
        return exes[key]

    def latents(f):
        return np.random.RandomState(f).randn(1, cfg.z_dim, f, lat, lat).astype(np.float32)

    for f in frames:
        z = latents(f)
        exe, t_compile = compiled(z, 1)
        mem = exe.memory_analysis()
        zj = jnp.asarray(z)
        jax.block_until_ready(exe(params, zj))  # first call
        t_ours, out = best(lambda: jax.block_until_ready(exe(params, zj)))
        with torch.no_grad():
            model.decode(torch.from_numpy(z))  # first call at this shape (oneDNN primitives), as for ours
            t_diff, ref = best(lambda: model.decode(torch.from_numpy(z)).sample.numpy())
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref.astype(np.float64))
        res["frames"].append(dict(latent_frames=f, video_frames=int(out.shape[2]), temp_mb=mem.temp_size_in_bytes / MB,
                                  output_mb=mem.output_size_in_bytes / MB, compile_s=t_compile, ours_s=t_ours,
                                  diffusers_s=t_diff, ratio=t_ours / t_diff, rel_err=float(err)))
    z = latents(chunk_frames)
    zj = jnp.asarray(z)
    base = None
    for c in chunks:
        exe, t_compile = compiled(z, c)
        mem = exe.memory_analysis()
        jax.block_until_ready(exe(params, zj))  # first call
        t, out = best(lambda: jax.block_until_ready(exe(params, zj)))
        out = np.asarray(out, np.float64)
        base = out if base is None else base
        res["chunks"].append(dict(chunk=c, temp_mb=mem.temp_size_in_bytes / MB, compile_s=t_compile, decode_s=t,
                                  rel_diff_vs_chunk1=float(np.linalg.norm(out - base) / np.linalg.norm(base))))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64x64 px, frames 3 5 9, chunk sweep at 9 frames")
    ap.add_argument("--base-dim", type=int, default=32, help="Wan 2.1 VAE structure, this base width (real: 96)")
    ap.add_argument("--size", type=int, default=128, help="video height = width in pixels")
    ap.add_argument("--frames", type=int, nargs="+", default=[5, 11, 21, 41], help="latent frame counts")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--chunk-frames", type=int, default=21, help="latent frames for the chunk sweep")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per case (best is reported)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.frames, args.chunk_frames = 64, [3, 5, 9], 9

    import jax

    r = measure(args.base_dim, args.size, args.frames, args.chunks, args.chunk_frames, args.repeats)
    print(f"machine: {os.cpu_count()} cores ({platform.machine()}), jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch threads {r['torch_threads']}")
    print(f"Wan 2.1 VAE structure, base_dim {args.base_dim} ({r['params_m']:.1f} M params), "
          f"{args.size}x{args.size} px (latent {r['latent']}x{r['latent']}), float32, batch 1")
    print(f"\n{'latent F':>8} {'video F':>7} {'temp MB':>8} {'output MB':>9} {'compile s':>9} {'ours s':>7} "
          f"{'diffusers s':>11} {'ours/diff':>9} {'rel err':>8}")
    for x in r["frames"]:
        print(f"{x['latent_frames']:>8} {x['video_frames']:>7} {x['temp_mb']:>8.1f} {x['output_mb']:>9.1f} "
              f"{x['compile_s']:>9.1f} {x['ours_s']:>7.2f} {x['diffusers_s']:>11.2f} {x['ratio']:>9.2f} {x['rel_err']:>8.1e}")
    print(f"\nchunk sweep at {args.chunk_frames} latent frames (chunk = latent frames per scan step after frame 0)")
    print(f"{'chunk':>5} {'temp MB':>8} {'compile s':>9} {'decode s':>8} {'rel diff vs chunk 1':>19}")
    for x in r["chunks"]:
        print(f"{x['chunk']:>5} {x['temp_mb']:>8.1f} {x['compile_s']:>9.1f} {x['decode_s']:>8.2f} "
              f"{x['rel_diff_vs_chunk1']:>19.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
