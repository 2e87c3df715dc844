"""Restore speed: wan_runtime's restore of a converted checkpoint against loading the FP32 diffusers source
with no converter at all, and against reading the checkpoint's bytes raw, in the same run.

    python tools/bench_restore.py [--model wan2.1-t2v-1.3b] [--workdir /tmp/wan-bench] [--repeat 3]
    python tools/bench_restore.py --staged [--layers 4]   # staged / overlapped vs the old path, 8 CPU devices
    python tools/bench_restore.py --dtype float8_e4m3fn   # a quantized checkpoint's restore vs the bf16 one

The first three end as the same device arrays (one device); the raw read fills host buffers:

- ours: ``wan_runtime.checkpoint.restore_component`` (the direct chunk reader: on Linux the weight chunks
  are mapped copy-on-write into the shard buffers and checksummed, the rest read with preadv);
- tensorstore: the same call with ``direct=False`` (the general path; what restore was before);
- no converter: the best loader of the diffusers FP32 safetensors we know: read-only mmaps (zero-copy
  views), one preallocated stacked buffer per runtime leaf (``checkpoint.shard_buffer``, as ours:
  page-aligned, so ``jax.device_put`` on CPU aliases it), a thread pool of one task per source tensor
  doing the single copy with the bf16 cast fused in (numpy casting, which releases the GIL). Key renames
  and stacking come from the converter's mapping table, i.e. the rules such a loader has to know anyway;
- raw: every chunk file of the checkpoint read with ``preadv`` into preallocated buffers by the same
  number of threads: no checksum, no device arrays (the floor for any reader that copies).

The page cache is warm for all (each runs once before timing); rounds are interleaved and the median
is reported, since this machine is shared.

``--staged`` instead restores a shorter transformer (``--layers``) on 8 simulated CPU devices, every leaf
replicated (mesh data=8), three ways: the old path (every read, then each shard copied to each device),
overlapped (a leaf's copies start once its chunks are in), and overlapped + staged (a replicated leaf sent
1/8 per device, then all-gathered on the devices). On CPU ``jax.device_put`` aliases host buffers, so this
measures what staging costs (the all-gather's copies), not the host-link time it saves on accelerators.

``--dtype float8_e4m3fn`` (or int8) instead restores the same transformer converted to that dtype (the
blocks' 2-D weights one byte each, plus their float32 scales) and the bf16 conversion, interleaved, with
the runtime's restore (one device): the ratio is what reading half the bytes buys (the issue wants <= 0.6).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]


def no_converter_load(src: pathlib.Path, threads: int) -> dict:
    """The FP32 diffusers transformer at ``src`` -> {leaf path: jax.Array} in the runtime's tree and dtypes."""
    import jax

    from wan_convert.mapping import plan
    from wan_convert.source import Component
    from wan_runtime.checkpoint import shard_buffer
    from wan_runtime.format import component_tree, np_dtype

    comp = Component(src / "transformer")
    try:
        targets = plan("transformer", comp.tensors, component_tree("transformer", comp.config, "bfloat16"))
        outs = {t.path: shard_buffer(t.leaf.shape, np_dtype(t.leaf.dtype)) for t in targets}

        def fill(t, i):
            want = t.leaf.shape[1:] if t.stacked else t.leaf.shape
            np.copyto(outs[t.path][i] if t.stacked else outs[t.path], comp.array(t.sources[i].name).reshape(want),
                      casting="unsafe")

        jobs = [(t, i) for t in targets for i in range(len(t.sources))]
        jobs.sort(key=lambda j: -j[0].sources[j[1]].nbytes)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda j: fill(*j), jobs))
        arrays = {p: jax.device_put(a) for p, a in outs.items()}
        return jax.block_until_ready(arrays)
    finally:
        comp.close()


def raw_read(ck: pathlib.Path, threads: int) -> int:
    """Read every chunk file under the checkpoint's transformer into preallocated buffers; returns bytes."""
    from wan_runtime.checkpoint import shard_buffer

    files = sorted((p for p in (ck / "transformer").rglob("*") if p.is_file() and "c" in p.relative_to(ck).parts[2:3]),
                   key=lambda p: -p.stat().st_size)
    sizes = [f.stat().st_size for f in files]
    bufs = [shard_buffer((n,), np.dtype(np.uint8)) for n in sizes]

    def read(i):
        fd = os.open(files[i], os.O_RDONLY)
        try:
            got = 0
            while got < sizes[i]:
                got += os.preadv(fd, [memoryview(bufs[i])[got:]], got)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(read, range(len(files))))
    return sum(sizes)


def ensure_inputs(workdir: pathlib.Path, model: str, layers: int | None = None,
                  dtype: str = "bfloat16") -> tuple[pathlib.Path, pathlib.Path]:
    """(synthetic FP32 source, its conversion to ``dtype``), written once under workdir (``layers``: that many
    transformer blocks instead of the model's)."""
    import make_synthetic_checkpoint as msc
    from wan_convert.convert import convert

    tag = f"-{layers}l" if layers else ""
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    src, ck = workdir / f"synthetic-{model}{tag}", workdir / f"converted{tag}{suffix}"
    if not (src / "transformer" / "config.json").exists():
        print(f"writing synthetic {model} to {src} ...", flush=True)
        msc.write(src, model, layers)
    if not (ck / "manifest.json").exists():
        convert(str(src), ck, only=["transformer"], force=True, hash_source=False, weights_dtype=dtype)
    return src, ck


def interleaved(runs: dict, repeat: int) -> dict[str, list[float]]:
    """Seconds of each run over ``repeat`` interleaved rounds, after a round that warms the page cache and JAX."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeat + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            del out
            if r:
                times[name].append(dt)
    return times


def measure_staged(workdir: pathlib.Path, model: str, repeat: int, layers: int, devices: int = 8) -> dict:
    """Median seconds of the old, overlapped and overlapped + staged restores on ``devices`` CPU devices."""
    import jax

    from wan_runtime import checkpoint as C
    from wan_runtime import sharding as shd

    cpus = jax.devices("cpu")
    if len(cpus) < devices:
        raise SystemExit(f"--staged needs {devices} CPU devices, JAX has {len(cpus)} (set XLA_FLAGS before JAX starts)")
    _, ck = ensure_inputs(workdir, model, layers)
    ckpt, mesh = C.open_checkpoint(ck), shd.make_mesh(shd.parse_mesh(f"data={devices}"), cpus)
    variants = {"old": dict(OVERLAP=False, STAGE_ON_CPU=False), "overlap": dict(OVERLAP=True, STAGE_ON_CPU=False),
                "overlap+staged": dict(OVERLAP=True, STAGE_ON_CPU=True)}
    saved = {k: getattr(C, k) for k in ("OVERLAP", "STAGE_ON_CPU")}

    def run(settings):
        for k, v in settings.items():
            setattr(C, k, v)
        return jax.block_until_ready(C.restore_component(ckpt, "transformer", mesh))
    try:
        times = interleaved({name: (lambda s=s: run(s)) for name, s in variants.items()}, repeat)
    finally:
        for k, v in saved.items():
            setattr(C, k, v)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(model=model, layers=layers, devices=devices, seconds=med, times=times,
                checkpoint_gb=ckpt.manifest["components"]["transformer"]["bytes"] / 1e9,
                vs_old={k: med[k] / med["old"] for k in med})


def measure(workdir: pathlib.Path, model: str = "wan2.1-t2v-1.3b", repeat: int = 3, threads: int | None = None) -> dict:
    """Median seconds of each loader over ``repeat`` interleaved rounds, and the ratios."""
    import jax

    from wan_runtime import checkpoint as C

    src, ck = ensure_inputs(workdir, model)
    threads = threads or C.default_threads()
    copy_threads = os.cpu_count() or 2
    ckpt = C.open_checkpoint(ck)
    src_bytes = sum(f.stat().st_size for f in (src / "transformer").glob("*.safetensors"))
    ck_bytes = ckpt.manifest["components"]["transformer"]["bytes"]
    runs = {
        "ours": lambda: jax.block_until_ready(C.restore_component(ckpt, "transformer", concurrency=threads)),
        "tensorstore": lambda: jax.block_until_ready(C.restore_component(ckpt, "transformer", direct=False)),
        "no_converter": lambda: no_converter_load(src, copy_threads),
        "raw": lambda: raw_read(ck, threads),
    }
    times = interleaved(runs, repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(model=model, checkpoint_gb=ck_bytes / 1e9, source_gb=src_bytes / 1e9, threads=threads,
                copy_threads=copy_threads, seconds=med, times=times,
                ours_vs_no_converter=med["ours"] / med["no_converter"], ours_vs_raw=med["ours"] / med["raw"],
                ours_vs_tensorstore=med["ours"] / med["tensorstore"])


def measure_dtype(workdir: pathlib.Path, model: str, repeat: int, dtype: str, threads: int | None = None) -> dict:
    """Median seconds of the runtime's restore of the ``dtype`` and the bf16 conversions, interleaved."""
    import jax

    from wan_runtime import checkpoint as C

    threads = threads or C.default_threads()
    cks = {d: C.open_checkpoint(ensure_inputs(workdir, model, dtype=d)[1]) for d in ("bfloat16", dtype)}
    runs = {d: (lambda ck=ck: jax.block_until_ready(C.restore_component(ck, "transformer", concurrency=threads)))
            for d, ck in cks.items()}
    times = interleaved(runs, repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    gb = {d: ck.manifest["components"]["transformer"]["bytes"] / 1e9 for d, ck in cks.items()}
    return dict(model=model, dtype=dtype, threads=threads, seconds=med, times=times, checkpoint_gb=gb,
                time_ratio=med[dtype] / med["bfloat16"], bytes_ratio=gb[dtype] / gb["bfloat16"])


def main_dtype(args) -> int:
    r = measure_dtype(args.workdir, args.model, args.repeat, args.dtype, args.threads)
    print(f"\nrestore {args.model} transformer, {args.dtype} vs bfloat16; median of {args.repeat} interleaved rounds, "
          f"{r['threads']} reader threads")
    print(f"{'dtype':<14} {'GB':>6} {'seconds':>8} {'GB/s':>6} {'vs bf16':>8}")
    for d, secs in r["seconds"].items():
        gb = r["checkpoint_gb"][d]
        print(f"{d:<14} {gb:>6.2f} {secs:>8.3f} {gb / secs:>6.2f} {secs / r['seconds']['bfloat16']:>8.2f}")
    print(f"time ratio {r['time_ratio']:.2f} (bytes ratio {r['bytes_ratio']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/wan-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: the runtime's)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--staged", action="store_true", help="staged / overlapped vs the old path on 8 CPU devices")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks for --staged (8 copies on CPU)")
    ap.add_argument("--dtype", choices=("float8_e4m3fn", "int8"), default=None,
                    help="restore a checkpoint quantized to this dtype against the bf16 one")
    args = ap.parse_args(argv)
    if args.staged:
        return main_staged(args)
    if args.dtype:
        return main_dtype(args)
    r = measure(args.workdir, args.model, args.repeat, args.threads)
    s = r["seconds"]
    print(f"\nrestore {args.model}: checkpoint {r['checkpoint_gb']:.2f} GB bf16, source {r['source_gb']:.2f} GB FP32; "
          f"median of {args.repeat} interleaved rounds, {r['threads']} reader threads")
    print(f"{'loader':<14} {'seconds':>8} {'GB/s of ckpt':>13} {'ours / this':>12}")
    for name in ("ours", "tensorstore", "no_converter", "raw"):
        print(f"{name:<14} {s[name]:>8.3f} {r['checkpoint_gb'] / s[name]:>13.2f} {s['ours'] / s[name]:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


def main_staged(args) -> int:
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    r = measure_staged(args.workdir, args.model, args.repeat, args.layers)
    print(f"\nrestore {args.model} ({args.layers} blocks, {r['checkpoint_gb']:.2f} GB bf16) on {r['devices']} "
          f"simulated CPU devices, every leaf replicated; median of {args.repeat} interleaved rounds")
    print(f"{'path':<15} {'seconds':>8} {'this / old':>11}")
    for name, secs in r["seconds"].items():
        print(f"{name:<15} {secs:>8.3f} {r['vs_old'][name]:>11.2f}")
    print("CPU devices share the host's memory and device_put aliases host buffers there, so staging only adds "
          "the all-gather's copies: these figures say nothing about a GPU's host link (what staging is for).")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
