"""One transformer step: diffusers' WanTransformer3DModel (torch CPU) against wan_runtime's transformer on
the same random weights and inputs, float32 and bf16, with MFU against this machine's measured matmul peak.

    python tools/bench_step.py [--layers 4] [--frames 3 --height 16 --width 16] [--repeat 3]

The model has Wan2.1-T2V-1.3B's widths (12 heads x 128, FFN 8960, text 4096) and ``--layers`` blocks;
the batch is 2 (the CFG pair), with 512 text tokens (the real length: both models project the text and
every block's cross-attention K/V inside the call). bf16: diffusers as ``from_pretrained(torch_dtype=
torch.bfloat16)`` loads it (``_keep_in_fp32_modules`` stay float32), ours with the converter's bf16 rule.

FLOPs are XLA's cost analysis of our compiled step. XLA counts a ``while`` loop's body once, so the
count is the compiled forward's plus (layers - 1) x one compiled block's. The same FLOPs divide both
models' times (the same math). Peak = a 4096^3 matmul in the same process (jnp.dot for ours, torch.mm
for diffusers), per dtype. MFU = FLOPs / time / peak. Each framework runs in its own process (in one
process, torch's OpenMP threads and XLA's pool spin against each other); a process times its matmul peak
and its step alternately ``--repeat`` times; every number is the best over its calls: the uncontended
speed on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]

WIDTHS = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)


class MatmulPeak:
    """An n x n x n matmul of one dtype in one framework: jnp.dot ("jax") or torch.mm ("torch")."""

    def __init__(self, dtype: str, framework: str, n: int = 4096):
        self.flops = 2 * n**3
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        if framework == "jax":
            import jax
            import jax.numpy as jnp

            a = jnp.asarray(a, dtype)
            f = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
            self.run = lambda: f(a, a).block_until_ready()
        else:
            import torch

            t = torch.from_numpy(a).to(getattr(torch, dtype))
            self.run = lambda: torch.mm(t, t)
        self.run()  # compile / first call
        self.times: list[float] = []

    def time(self):
        self.times.append(_timed(self.run))

    def gflops(self) -> float:
        return self.flops / min(self.times) / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build(layers: int, seed: int = 0):
    """(diffusers float32 model, its config dict, state dict as numpy), perturbed like the test models."""
    import torch
    from diffusers import WanTransformer3DModel

    import make_tiny_checkpoint as mtc

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, num_layers=layers,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", **WIDTHS).eval()
    mtc.perturb(m, torch.Generator().manual_seed(seed + 1))
    return m, dict(m.config), {k: v.detach().numpy() for k, v in m.state_dict().items()}


def to_bf16_like_from_pretrained(m):
    """What ``from_pretrained(..., torch_dtype=torch.bfloat16)`` gives: bf16, ``_keep_in_fp32_modules`` float32."""
    import torch

    m = m.to(torch.bfloat16)
    keep = set(getattr(m, "_keep_in_fp32_modules", None) or ())
    for name, module in m.named_modules():
        if keep & set(name.split(".")):
            module.float()
    return m


def cached_step(params, cfg, latents, timestep, kv, dtype):
    """The per-step work of our denoise loop: the text embedding and every block's cross-attention K/V
    are computed once per generation (the KV cache), so a step is patchify, time embedding, the blocks
    and the head (as ``transformer.forward`` without its first two stages)."""
    from wan_runtime.models import transformer as T

    pt, ph, pw = cfg.patch_size
    grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
    x = T.patchify(params, cfg, latents, dtype)
    temb, tp = T.embed_time(params, cfg, timestep, dtype)
    x = T.run_blocks(params, x, tp, T.rope_tables(cfg, grid), kv, cfg, dtype)
    return T.unpatchify_head(params, cfg, x, temb, grid)


def xla_flops(compiled, params, cfg, x, t, txt, dtype) -> float:
    """FLOPs of a compiled call that scans the blocks once: its count + (layers - 1) x one block's."""
    import jax
    import jax.numpy as jnp

    from wan_runtime.models import transformer as T

    def count(c):
        c = c.cost_analysis()
        return float((c[0] if isinstance(c, (list, tuple)) else c)["flops"])

    grid = (x.shape[2] // cfg.patch_size[0], x.shape[3] // cfg.patch_size[1], x.shape[4] // cfg.patch_size[2])
    h = T.patchify(params, cfg, jnp.asarray(x), dtype)
    _, tp = T.embed_time(params, cfg, jnp.asarray(t), dtype)
    kv = jax.tree.map(lambda a: a[0], T.cross_kv(params, cfg, T.embed_text(params, cfg, jnp.asarray(txt), dtype), dtype))
    layer = jax.tree.map(lambda a: a[0], params["blocks"])
    rope = tuple(jnp.asarray(r) for r in T.rope_tables(cfg, grid))
    blk = jax.jit(lambda p, h, tp, rope, kv: T.block(p, h, tp, rope, kv, cfg, dtype)).lower(layer, h, tp, rope, kv).compile()
    return count(compiled) + (cfg.num_layers - 1) * count(blk)


def inputs(frames: int, height: int, width: int, text_len: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, frames, height, width), dtype=np.float32)
    txt = (rng.standard_normal((2, text_len, WIDTHS["text_dim"]), dtype=np.float32) * 0.1).astype(np.float32)
    return x, np.array([500, 500], np.int64), txt


def worker(which: str, dtype: str, layers: int, frames: int, height: int, width: int, text_len: int, repeat: int,
           out: pathlib.Path) -> dict:
    """In this process, one framework only: its matmul peak and step time, interleaved ``repeat`` times;
    the step's output goes to ``out`` (.npy) for the error between the two."""
    x, t, txt = inputs(frames, height, width, text_len)
    model, cfg_dict, sd = build(layers)
    peak = MatmulPeak(dtype, "jax" if which == "ours" else "torch")
    times = []
    res: dict = {}
    if which == "ours":
        import jax
        import jax.numpy as jnp

        from wan_convert.mapping import tree_from_state_dict
        from wan_runtime.models import transformer as T

        del model
        cfg, jdt = T.WanTransformerConfig.from_config(cfg_dict), getattr(jnp, dtype)
        params = jax.device_put(tree_from_state_dict("transformer", sd, cfg_dict, dtype))
        xs, ts, txts = jnp.asarray(x), jnp.asarray(t), jnp.asarray(txt)
        exe = jax.jit(T.forward, static_argnames=("cfg", "dtype")).lower(params, cfg, xs, ts, txts, dtype=jdt).compile()
        np.save(out, np.asarray(exe(params, xs, ts, txts)))  # first call
        res["flops"] = xla_flops(exe, params, cfg, xs, ts, txts, jdt)
        step = lambda: exe(params, xs, ts, txts).block_until_ready()  # noqa: E731
        kv = jax.block_until_ready(T.cross_kv(params, cfg, T.embed_text(params, cfg, txts, jdt), jdt))
        cached = jax.jit(cached_step, static_argnames=("cfg", "dtype")).lower(params, cfg, xs, ts, kv, dtype=jdt).compile()
        cached(params, xs, ts, kv).block_until_ready()
        res["cached_flops"] = xla_flops(cached, params, cfg, xs, ts, txts, jdt)
        res["cached_times"] = []
    else:
        import torch
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # the .to(bf16) warning: to_bf16_like_from_pretrained handles it
        if dtype == "bfloat16":
            model = to_bf16_like_from_pretrained(model)
        tdt = getattr(torch, dtype)
        tx, tt, ttxt = torch.from_numpy(x).to(tdt), torch.from_numpy(t), torch.from_numpy(txt).to(tdt)
        torch.set_grad_enabled(False)
        np.save(out, model(tx, tt, ttxt, return_dict=False)[0].float().numpy())  # first call (oneDNN primitives)
        step = lambda: model(tx, tt, ttxt, return_dict=False)  # noqa: E731
    for _ in range(repeat):
        peak.time()
        times.append(_timed(step))
        if which == "ours":
            res["cached_times"].append(_timed(lambda: cached(params, xs, ts, kv).block_until_ready()))
    res.update(times=times, peak_gflops=peak.gflops())
    return res


def measure(layers: int = 4, frames: int = 3, height: int = 16, width: int = 16, text_len: int = 512,
            repeat: int = 3, rounds: int = 1) -> dict:
    """Step seconds of diffusers and ours at float32 and bf16 (best over ``rounds`` x ``repeat`` calls), FLOPs,
    peaks, MFU and ratios. Each framework runs in its own process, one after the other: in one process,
    torch's OpenMP threads and XLA's thread pool spin against each other on 2 cores and slow both."""
    import subprocess
    import tempfile

    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for dtype in ("float32", "bfloat16"):
                for which in ("ours", "diffusers"):
                    out = pathlib.Path(tmp) / f"{which}-{dtype}.npy"
                    cmd = [sys.executable, __file__, "--worker", which, "--dtype", dtype, "--layers", str(layers),
                           "--frames", str(frames), "--height", str(height), "--width", str(width),
                           "--text-len", str(text_len), "--repeat", str(repeat), "--out", str(out)]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode:
                        raise RuntimeError(f"bench_step worker {which} {dtype} failed: {r.stderr.strip()[-2000:]}")
                    got = json.loads(r.stdout.strip().splitlines()[-1])
                    prev = runs.setdefault((which, dtype), dict(times=[], peaks=[]))
                    prev["times"] += got["times"]
                    prev["peaks"].append(got["peak_gflops"])
                    prev["flops"] = got.get("flops", prev.get("flops"))
                    if "cached_times" in got:
                        prev.setdefault("cached_times", []).extend(got["cached_times"])
                        prev["cached_flops"] = got["cached_flops"]
            outs = {k: np.load(pathlib.Path(tmp) / f"{k[0]}-{k[1]}.npy") for k in runs}
    res = dict(layers=layers, tokens_per_item=frames * (height // 2) * (width // 2), batch=2, text_len=text_len,
               peaks_gflops={}, dtypes={})
    for dtype in ("float32", "bfloat16"):
        ours, diff = runs[("ours", dtype)], runs[("diffusers", dtype)]
        flops, o, d = ours["flops"], min(ours["times"]), min(diff["times"])
        pj, pt = max(ours["peaks"]), max(diff["peaks"])
        res["peaks_gflops"].update({f"jax_{dtype}": pj, f"torch_{dtype}": pt})
        a, b = outs[("ours", dtype)].astype(np.float64), outs[("diffusers", dtype)].astype(np.float64)
        res["dtypes"][dtype] = dict(
            ours_s=o, diffusers_s=d, ratio=o / d, flops=flops, ours_gflops=flops / o / 1e9,
            diffusers_gflops=flops / d / 1e9, ours_mfu=flops / o / 1e9 / pj, diffusers_mfu=flops / d / 1e9 / pt,
            rel_err_vs_diffusers=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            median_ratio=statistics.median(ours["times"]) / statistics.median(diff["times"]),
            ours_times=ours["times"], diffusers_times=diff["times"],
            cached_s=min(ours["cached_times"]), cached_flops=ours["cached_flops"],
            cached_mfu=ours["cached_flops"] / min(ours["cached_times"]) / 1e9 / pj, cached_times=ours["cached_times"])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=3, help="latent frames")
    ap.add_argument("--height", type=int, default=16, help="latent height")
    ap.add_argument("--width", type=int, default=16, help="latent width")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=1, help="processes per framework and dtype")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.layers, args.frames, args.height, args.width,
                                args.text_len, args.repeat, args.out)))
        return 0
    r = measure(args.layers, args.frames, args.height, args.width, args.text_len, args.repeat, args.rounds)
    import torch

    print(f"\ntransformer step: 1.3B widths, {args.layers} layers, batch 2 x {r['tokens_per_item']} tokens, "
          f"{args.text_len} text tokens; {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("matmul peaks GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peaks_gflops"].items()))
    print(f"{'dtype':<9} {'ours s':>7} {'diffusers s':>11} {'ours/diff':>9} {'GFLOP':>7} {'ours GF/s':>9} "
          f"{'ours MFU':>8} {'diff GF/s':>9} {'diff MFU':>8} {'rel err':>8}")
    for name, d in r["dtypes"].items():
        print(f"{name:<9} {d['ours_s']:>7.3f} {d['diffusers_s']:>11.3f} {d['ratio']:>9.2f} {d['flops'] / 1e9:>7.1f} "
              f"{d['ours_gflops']:>9.1f} {d['ours_mfu']:>8.2f} {d['diffusers_gflops']:>9.1f} {d['diffusers_mfu']:>8.2f} "
              f"{d['rel_err_vs_diffusers']:>8.1e}")
    print("as our denoise loop runs a step (text embedding and cross-attention K/V once per generation):")
    for name, d in r["dtypes"].items():
        print(f"{name:<9} {d['cached_s']:>7.3f} s, {d['cached_flops'] / 1e9:.1f} GFLOP, MFU {d['cached_mfu']:.2f}, "
              f"{d['cached_s'] / d['diffusers_s']:.2f} of diffusers' forward")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
