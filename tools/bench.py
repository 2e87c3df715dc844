"""Every benchmark in one run: each row is ours against a baseline measured in the same run (these machines
are shared and noisy; only ratios hold), with the goal it is held to.

    python tools/bench.py [--quick] [--only convert,restore,step,generation,vae,caches] [--json out/bench.json]

Sections (each reuses its tools/bench_*.py ``measure``; see those files for the method):

- convert: wan-convert of a synthetic Wan2.1-T2V-1.3B (FP32, 5.7 GB) to bf16, GB/s of input, against the
  copy limit (numpy reading the same mmapped bytes and casting them into stacked bf16 buffers in RAM);
  peak RSS of the wan-convert process.
- restore: that checkpoint into device arrays, against loading the FP32 source with no converter
  (mmap, preallocated stacked buffers, threads, fused cast), against reading the checkpoint's bytes raw,
  and against the TensorStore path.
- step: one transformer call (1.3B widths, a few layers, batch 2, 512 text tokens) against diffusers'
  WanTransformer3DModel, float32 and bf16; MFU = XLA cost-analysis FLOPs / time / jnp.dot peak.
- generation: wan-run end to end on random tiny and small models: first process (cold compilation
  cache) vs second (warm), the TIMING SUMMARY split, and float32 generation against diffusers' WanPipeline.
- vae: decode against diffusers' AutoencoderKLWan on the same weights; XLA working memory vs frames.
- caches: step-caching policies against the dense loop: speed-up, bound, PSNR.

``--quick`` (about 10 minutes on 2 cores) keeps every section, the 1.3B convert and restore included,
with fewer repeats, smaller VAE / caching runs and fewer steps.
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
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]

from report import fmt  # noqa: E402  (one number format for the printed table and the README)

SECTIONS = ("convert", "restore", "step", "generation", "vae", "caches")


def row(section, metric, ours, baseline=None, goal=None, note="", value=None, ratio=None):
    """One table row. ratio = ours / baseline unless given; ``goal`` = (text, predicate on the ratio or on
    ``value``)."""
    ratio = ratio if ratio is not None else ours / baseline if baseline else None
    text, check = goal if goal else ("-", None)
    met = None if check is None else bool(check(ratio if value is None else value))
    return dict(section=section, metric=metric, ours=ours, baseline=baseline, ratio=ratio, goal=text, met=met, note=note)


# ------------------------------------------------------------------------------------------ sections
def section_convert(a) -> tuple[list, dict]:
    import bench_convert

    r = bench_convert.measure(a.workdir, repeat=2 if a.quick else 3, fsync=not a.quick)
    runs = r["runs"]
    med = lambda k: statistics.median(x[k] for x in runs)  # noqa: E731
    rows = [row("convert", f"1.3B FP32 -> bf16, GB/s of input vs the copy limit (median of {len(runs)})",
                med("convert_gbps"), med("copy_gbps"), (">= 0.50", lambda x: x >= 0.5)),
            row("convert", "peak RSS of wan-convert, GB vs the FP32 input", max(x["peak_rss_gb"] for x in runs),
                runs[0]["input_gb"])]
    if "fsync_gbps" in runs[0]:
        rows.insert(1, row("convert", "  with --fsync (durable before the rename), GB/s vs the copy limit",
                           med("fsync_gbps"), med("copy_gbps")))
    return rows, r


def section_restore(a) -> tuple[list, dict]:
    import bench_restore

    r = bench_restore.measure(a.workdir, repeat=3 if a.quick else 5)
    s, gb = r["seconds"], r["checkpoint_gb"]
    n = len(r["times"]["ours"])
    note = f"{gb:.2f} GB bf16; ours {gb / s['ours']:.2f} GB/s"
    return [row("restore", f"1.3B -> device arrays, s vs no-converter FP32 load (median of {n})", s["ours"],
                s["no_converter"], ("<= 0.50", lambda x: x <= 0.5), note),
            row("restore", "  s vs reading the checkpoint's bytes raw (no checksum, no arrays)", s["ours"], s["raw"]),
            row("restore", "  s vs the TensorStore path (restore before this change)", s["ours"], s["tensorstore"])], r


def section_step(a) -> tuple[list, dict]:
    import bench_step

    r = bench_step.measure(layers=4, repeat=3, rounds=1 if a.quick else 2)
    rows = []
    for name in ("float32", "bfloat16"):
        d = r["dtypes"][name]
        rows.append(row("step", f"{name} step s vs diffusers (1.3B widths, {r['layers']} layers, 2x"
                                f"{r['tokens_per_item']} tokens)", d["ours_s"], d["diffusers_s"],
                        ("<= 1.00", lambda x: x <= 1.0) if name == "float32" else None,
                        f"median ratio {d['median_ratio']:.2f}; rel err {d['rel_err_vs_diffusers']:.1e}"))
        rows.append(row("step", f"  {name} MFU, ours (jnp.dot peak) vs diffusers (torch.mm peak)", d["ours_mfu"],
                        d["diffusers_mfu"], (">= 0.50 (ours)", lambda x: x >= 0.5) if name == "float32" else None,
                        f"{d['ours_gflops']:.0f} vs {d['diffusers_gflops']:.0f} GFLOP/s; peaks "
                        f"{r['peaks_gflops'][f'jax_{name}']:.0f} / {r['peaks_gflops'][f'torch_{name}']:.0f}",
                        value=d["ours_mfu"]))
        rows.append(row("step", f"  {name} step as our loop runs it (text + cross K/V once per generation) s "
                                "vs diffusers", d["cached_s"], d["diffusers_s"], None,
                        f"MFU {d['cached_mfu']:.2f}"))
    return rows, r


def section_generation(a) -> tuple[list, dict]:
    import bench_runtime

    rows, raw = [], {}
    for size in ("tiny", "small"):
        g = bench_runtime.generation(a.workdir / "runtime", size, 128, 128, 9, steps=4, diffusers=True)
        raw[size] = g
        cold, warm = g["cold"], g["warm"]
        split = ", ".join(f"{k} {warm[k]:.2f}" for k in ("load", "compile", "conditioning", "denoise", "decode"))
        rows.append(row("generation", f"{size}: compile s, 2nd wan-run process vs 1st (persistent cache)",
                        warm["compile"], cold["compile"], ("<= 0.05", lambda x: x <= 0.05)))
        rows.append(row("generation", f"  {size}: wan-run total s (bf16, 128x128x9, 4 steps), warm vs cold process",
                        warm["total"], cold["total"], None, f"warm: {split}"))
        f32, dif = g["ours_fp32"], g["diffusers_fp32"]
        gen = f32["conditioning"] + f32["denoise"] + f32["decode"]
        rows.append(row("generation", f"  {size}: float32 text+denoise+decode s vs diffusers WanPipeline", gen,
                        dif["generation"], None, f"load: ours {f32['load']:.2f} s, diffusers {dif['load']:.2f} s"))
    return rows, raw


def section_vae(a) -> tuple[list, dict]:
    import bench_vae

    frames = (3, 5, 9) if a.quick else (5, 11, 21, 41)
    r = bench_vae.measure(base_dim=32, size=64 if a.quick else 128, frames=frames, chunks=(),
                          repeats=1 if a.quick else 2)
    rows = [row("vae", f"decode {x['latent_frames']} latent frames ({x['video_frames']} video, {r['size']}px) s "
                       "vs diffusers", x["ours_s"], x["diffusers_s"], ("<= 1.00", lambda v: v <= 1.0),
                f"rel err {x['rel_err']:.1e}") for x in r["frames"]]
    lo, hi = r["frames"][0], r["frames"][-1]
    rows.append(row("vae", f"  XLA working memory MB, {hi['latent_frames']} vs {lo['latent_frames']} latent frames",
                    hi["temp_mb"], lo["temp_mb"], ("flat (<= 1.05)", lambda v: v <= 1.05),
                    f"output {lo['output_mb']:.1f} -> {hi['output_mb']:.1f} MB"))
    return rows, r


def section_caches(a) -> tuple[list, dict]:
    import bench_cache

    steps = 10 if a.quick else 20
    res = bench_cache.measure(a.workdir / "runtime", "small", steps=steps, repeat=5)
    rows = []
    for x in res[1:]:  # ratio: median over rounds of policy / dense in the same round
        rows.append(row("caches", f"{x['policy']}: denoise s vs dense ({steps} steps, 5 rounds)", x["denoise_s"],
                        res[0]["denoise_s"], None,
                        f"forwards {x['forwards']:.4g}/{x['dense_forwards']}: bound {x['bound']:.2f}, speed-up "
                        f"{x['speedup']:.2f}; PSNR {x['psnr']:.1f} dB", ratio=1 / x["speedup"]))
    return rows, res


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cores": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version()}
    try:
        cpu = pathlib.Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")))
        info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except (OSError, StopIteration):
        pass
    import importlib.metadata as md

    for pkg in ("jax", "jaxlib", "numpy", "tensorstore", "torch", "diffusers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def print_table(rows: list[dict]) -> None:
    w = max(len(r["metric"]) for r in rows)
    print(f"\n{'section':<10} {'metric':<{w}} {'ours':>8} {'baseline':>9} {'ratio':>7} {'goal':>16} {'met':>4}  note")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['section']:<10} {r['metric']:<{w}} {fmt(r['ours']):>8} {fmt(r['baseline']):>9} "
              f"{ratio:>7} {r['goal']:>16} {met:>4}  {r['note']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller VAE and caching runs (~10 min)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument("--json", type=pathlib.Path, default=ROOT / "out" / "bench.json")
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/wan-bench"),
                    help="synthetic sources, checkpoints and random models (kept between runs)")
    a = ap.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"bench: --only: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    a.workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["load_average_start"] = os.getloadavg()
    print(f"machine: {info.get('cpu', '?')}, {info['cores']} cores, {info['ram_gib']} GiB; jax {info['jax']}, "
          f"torch {info['torch']}; load average {info['load_average_start'][0]:.1f}", flush=True)
    funcs = {"convert": section_convert, "restore": section_restore, "step": section_step,
             "generation": section_generation, "vae": section_vae, "caches": section_caches}
    rows, raw, seconds, failed = [], {}, {}, {}
    t_all = time.perf_counter()
    for name in SECTIONS:
        if name not in only:
            continue
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        try:
            got, raw[name] = funcs[name](a)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' results
            failed[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        finally:
            seconds[name] = time.perf_counter() - t0
        rows.extend(got)
        print_table(got)
        print(f"[{name}] {seconds[name]:.0f} s", flush=True)
    info["load_average_end"] = os.getloadavg()
    total = time.perf_counter() - t_all
    print(f"\n== wan-jax benchmarks ({'quick' if a.quick else 'full'}), {info['date']}: {info.get('cpu', '?')}, "
          f"{info['cores']} cores, {info['ram_gib']} GiB; {total / 60:.1f} min; load average "
          f"{info['load_average_start'][0]:.1f} -> {info['load_average_end'][0]:.1f}")
    if rows:
        print_table(rows)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"machine": info, "quick": a.quick, "sections": only, "rows": rows,
                                  "seconds": seconds, "total_seconds": total, "failed": failed, "raw": raw},
                                 indent=1, default=str) + "\n")
    print(f"\nJSON: {a.json}")
    for name, err in failed.items():
        print(f"section {name} FAILED: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
