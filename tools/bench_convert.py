"""Conversion throughput against the copy limit, measured in the same run.

    python tools/bench_convert.py [--model wan2.1-t2v-1.3b] [--workdir /tmp/wan-bench] [--repeat 2]
    python tools/bench_convert.py --dtype float8_e4m3fn   # a quantized conversion against the same copy limit

1. writes (once) a synthetic FP32 transformer with tools/make_synthetic_checkpoint.py;
2. copy limit: numpy reads the same safetensors bytes (mmap) and casts them to bf16 into memory with
   the same threads and one preallocated stacked buffer per parameter, nothing written;
3. wan-convert in a subprocess (--only transformer), timed, with its peak RSS (ru_maxrss);
Prints GB/s of FP32 input for both, the ratio, and peak RSS. Page cache is warm for both (the source is
read once before timing). JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]


def copy_limit(src: pathlib.Path, threads: int) -> tuple[float, int]:
    """Seconds and bytes for reading + casting every transformer tensor into stacked bf16 buffers."""
    import ml_dtypes

    from wan_convert.mapping import plan
    from wan_convert.source import Component
    from wan_runtime.format import component_tree

    comp = Component(src / "transformer")
    targets = plan("transformer", comp.tensors, component_tree("transformer", comp.config, "bfloat16"))
    t0 = time.perf_counter()
    total = 0
    with ThreadPoolExecutor(threads) as ex:
        for t in targets:
            out = np.empty(t.leaf.shape, ml_dtypes.bfloat16 if t.leaf.dtype == "bfloat16" else np.float32)
            want = t.leaf.shape[1:] if t.stacked else t.leaf.shape

            def fill(i, t=t, out=out, want=want):
                a = comp.array(t.sources[i].name).reshape(want)
                np.copyto(out[i] if t.stacked else out, a, casting="unsafe")
                return a.nbytes

            total += sum(ex.map(fill, range(len(t.sources))))
            del out
    dt = time.perf_counter() - t0
    comp.close()
    return dt, total


def run_convert(src: pathlib.Path, out: pathlib.Path, threads: int | None, fsync: bool = False,
                dtype: str = "bfloat16") -> tuple[float, float, str]:
    shutil.rmtree(out, ignore_errors=True)
    # VmHWM (this process image's peak RSS) is printed at exit; ru_maxrss would include the fork
    wrapper = ("import atexit, sys, re\n"
               "atexit.register(lambda: print('VmHWM', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)))\n"
               "from wan_convert.cli import main\n"
               "sys.argv[0] = 'wan-convert'\n"
               "main()\n")
    cmd = [sys.executable, "-c", wrapper, str(src), str(out), "--only", "transformer", "-q", "--no-hash",
           "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    if fsync:
        cmd += ["--fsync"]
    env = {"PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}", "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"wan-convert failed: {res.stderr.strip()}")
    hwm = int(res.stdout.rsplit("VmHWM", 1)[1].split()[0])  # KiB
    return dt, hwm * 1024 / 1e9, res.stdout.splitlines()[0]


def measure(workdir: pathlib.Path, model: str = "wan2.1-t2v-1.3b", repeat: int = 2, threads: int | None = None,
            copy_threads: int = 2, fsync: bool = True, dtype: str = "bfloat16") -> dict:
    """Alternating rounds of the copy limit and wan-convert (and wan-convert --fsync); one row per round."""
    import make_synthetic_checkpoint as msc

    src = workdir / f"synthetic-{model}"
    if not (src / "transformer" / "config.json").exists():
        print(f"writing synthetic {model} to {src} ...", flush=True)
        msc.write(src, model)
    for f in sorted((src / "transformer").glob("*.safetensors")):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    rows = []
    for _ in range(repeat):
        dt_copy, nbytes = copy_limit(src, copy_threads)
        out = workdir / ("converted" if dtype == "bfloat16" else f"converted-{dtype}")
        dt_conv, rss_gb, _ = run_convert(src, out, threads, dtype=dtype)
        row = dict(copy_gbps=nbytes / dt_copy / 1e9, convert_gbps=nbytes / dt_conv / 1e9, ratio=dt_copy / dt_conv,
                   peak_rss_gb=rss_gb, input_gb=nbytes / 1e9, convert_s=dt_conv, copy_s=dt_copy)
        if fsync:
            dt_sync, _, _ = run_convert(src, out, threads, fsync=True, dtype=dtype)
            row.update(fsync_gbps=nbytes / dt_sync / 1e9, fsync_ratio=dt_copy / dt_sync)
        rows.append(row)
    return {"model": model, "dtype": dtype, "runs": rows, "machine": _machine()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/wan-bench"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="converter threads (default: its own)")
    ap.add_argument("--copy-threads", type=int, default=2)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float8_e4m3fn", "int8"),
                    help="the checkpoint's --dtype (the copy limit stays the bf16 cast)")
    args = ap.parse_args(argv)

    result = measure(args.workdir, args.model, args.repeat, args.threads, args.copy_threads, dtype=args.dtype)
    rows = result["runs"]
    best = max(rows, key=lambda r: r["ratio"])
    print(f"\nconvert {args.model} to {args.dtype}: {best['input_gb']:.2f} GB FP32 input (machine: {_machine()})")
    print(f"{'run':>4} {'copy limit GB/s':>16} {'convert GB/s':>13} {'ratio':>6} {'--fsync GB/s':>13} {'ratio':>6} {'peak RSS GB':>12}")
    for i, r in enumerate(rows):
        print(f"{i:>4} {r['copy_gbps']:>16.2f} {r['convert_gbps']:>13.2f} {r['ratio']:>6.2f} {r['fsync_gbps']:>13.2f} "
              f"{r['fsync_ratio']:>6.2f} {r['peak_rss_gb']:>12.2f}")
    print("(convert = the whole wan-convert process incl. startup, writing bf16 zarr3 chunks + crc32c; --fsync also "
          "flushes to disk before the commit; copy limit = numpy mmap read + bf16 cast into memory; GB/s of FP32 input)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


if __name__ == "__main__":
    sys.exit(main())
