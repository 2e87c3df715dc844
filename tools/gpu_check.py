"""Measure, on a machine with an accelerator, what the project claims about real hardware (issue #15).

    python tools/gpu_check.py [--smoke] [--quick] [--out out/gpu_check.json] [--only env,attention,...]

Each phase runs in its own process (``--phase NAME``, with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95), so an
OOM or a crash loses that phase only: it is recorded with the last lines of its error (and the cases it
had finished) and the next one runs; a phase past ``--phase-timeout`` (300 s) is killed and recorded the
same way. Within a phase, a case that raises (an unsupported shape, a 720p OOM) is that case's one-line
error. All results go to one JSON file (rewritten atomically after every phase) and a short table; the
exit status is 1 if any phase failed. Peak memory is the process's peak so far (``memory_stats``).

  env        Python, jax and jaxlib versions, backend, device kind and count, compute capability, the CUDA
             plugin's CUDA / cuDNN versions (best effort, else null).
  attention  bf16, batch 2: self-attention with H 12 and 40, Dh 128, 4000 tokens padded to
             ``attention.preferred_multiple()`` with a key mask; cross-attention on 512 and 257 keys;
             CLIP-like H 16, Dh 80, S 257. The selected kernel and the blocked fallback against a float32
             reference, error = max |out - ref| / max |ref| (bound 1e-2); whether the compiled HLO holds
             the cuDNN fused-attention call; TFLOP/s of the selected kernel (4 B H S^2 Dh FLOPs a call) at
             the 480p and 720p token counts (32760 and 75600, padded to 32768 and 75648).
  step13b    a Wan2.1-T2V-1.3B-shaped transformer, random weights made on the device (a jax.random pool
             laid over the leaves, in the runtime's stored dtypes: bf16, float32 norms and modulation; no
             host copy), a 2-step Euler loop (text embedding and cross-attention K/V once, then
             ``run_blocks`` per step, as the runtime's denoise does) at 480p x 81 frames, latents
             (1, 16, 21, 60, 104), one sample (CFG would double the batch), 512 text tokens: compile s,
             step s, MFU against 989 TFLOP/s bf16 dense, peak device memory, finite output. FLOPs are an
             ANALYTIC count (matmuls and attention on the padded tokens): XLA's cost analysis does not see
             inside the cuDNN call and counts a loop body once. XLA's count of one lowered block is
             recorded beside it as a cross-check.
  step14b    the same for the 14B shape (dim 5120, 40 heads, 40 layers) at 480p, and at 720p (latents
             (1, 16, 21, 90, 160)) unless --quick; one timed call after compiling.
  fp8        the step14b step at 480p with bf16 block weights, e4m3 weights + per-channel scales, and e4m3
             with --fp8-matmul (compute capability >= 8.9; else recorded as skipped): s/step, ratio to
             bf16, relative error of the final latents against the bf16 run (issue #17).
  vae        ``vae.decode`` at 480p x 81 frames with random weights in the real Wan 2.1 VAE config (base 96,
             dim_mult 1 2 4 4, 2 res blocks, z 16): bf16 weights (wan-convert's default), float32 compute
             at ``vae.default_precision()`` (the runtime's defaults: TF32 convs on GPU): compile s, decode s,
             peak memory.
  restore    a 1.3B-shaped synthetic checkpoint (make_synthetic_checkpoint, then wan-convert's ``convert``)
             restored by the runtime's direct reader and by the TensorStore path: GB/s, bitwise equality.

--smoke runs every phase at tiny shapes on CPU (the same code; the attention kernel is then "blocked")
so the script cannot rot (tests/test_gpu_check.py): about 40-60 s here. On one H200 the whole run is
ESTIMATED (from FLOP counts, not measured: no accelerator has been available yet) at 6-7 minutes, the
14B phase the largest (~3 min); --quick drops 720p (~1 min less).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "convert"), str(ROOT / "tools")]

PHASES = ("env", "attention", "step13b", "step14b", "fp8", "vae", "restore")
ATTN_BOUND = 1e-2          # max |out - ref| / max |ref| of a bf16 kernel against the float32 reference
PEAK_BF16_TFLOPS = 989.0   # H100 / H200 SXM dense bf16 (spec sheet): the MFU denominator
P480, P720 = (1, 16, 21, 60, 104), (1, 16, 21, 90, 160)   # latents of 480p (832 x 480) and 720p, 81 frames
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=16)

FULL = {
    "attention": dict(batch=2, heads=(12, 40), head_dim=128, seq=4000, multiple=None, cross_keys=(512, 257),
                      clip=(16, 80, 257), perf=((32760, 12), (32760, 40), (75600, 40)), repeats=3),
    "step13b": dict(model="wan2.1-t2v-1.3b", overrides={}, latents={"480p": P480}, text_len=512, steps=2,
                    repeats=2),
    "step14b": dict(model="wan2.1-t2v-14b", overrides={}, latents={"480p": P480, "720p": P720}, text_len=512,
                    steps=2, repeats=1),
    "fp8": dict(model="wan2.1-t2v-14b", overrides={}, latents={"480p": P480}, text_len=512, steps=2, repeats=1),
    "vae": dict(config=WAN21_VAE, latents=P480),
    "restore": dict(layers=None, rounds=2),
}
SMOKE = {
    "attention": dict(batch=2, heads=(2,), head_dim=16, seq=40, multiple=16, cross_keys=(12, 7),
                      clip=(2, 8, 9), perf=((40, 2), (100, 3)), repeats=2),
    "step13b": dict(model="wan2.1-t2v-1.3b", overrides=TINY_DIT, latents={"480p": (1, 16, 3, 8, 8)},
                    text_len=8, steps=2, repeats=2),
    "step14b": dict(model="wan2.1-t2v-14b", overrides=dict(TINY_DIT, num_attention_heads=3, num_layers=3),
                    latents={"480p": (1, 16, 3, 8, 8), "720p": (1, 16, 3, 8, 12)}, text_len=8, steps=2, repeats=1),
    "fp8": dict(model="wan2.1-t2v-14b", overrides=dict(TINY_DIT, num_attention_heads=3, num_layers=3),
                latents={"480p": (1, 16, 3, 8, 8)}, text_len=8, steps=2, repeats=1),
    "vae": dict(config=dict(WAN21_VAE, base_dim=8), latents=(1, 16, 2, 4, 4)),
    "restore": dict(layers=1, rounds=1),
}


def sizes(phase: str, smoke: bool, quick: bool) -> dict:
    s = dict((SMOKE if smoke else FULL).get(phase, {}))
    if quick and "latents" in s and isinstance(s["latents"], dict):
        s["latents"] = {k: v for k, v in s["latents"].items() if k != "720p"}
    return s


# ------------------------------------------------------------------------------------------
# helpers shared by the phases (each runs in a process of its own)
# ------------------------------------------------------------------------------------------
def write_json(path: pathlib.Path, data: dict) -> None:
    """Atomically: a temporary file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def peak_bytes():
    """The device's peak bytes in use so far in this process, or None where the backend does not say."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def best_time(fn, repeats: int):
    """(best seconds over ``repeats`` calls of fn, waited for, the last result)."""
    import jax

    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


def compiled(fn, *args, **kwargs):
    """(executable, seconds to lower and compile it) for these arguments."""
    t0 = time.perf_counter()
    exe = fn.lower(*args, **kwargs).compile()
    return exe, time.perf_counter() - t0


def _leaf_from_pool(pool, offset: int, path: str, leaf):
    """Weights ~ N(0, 1 / fan_in) (torch layout: fan_in = all but the out axis, stacked layers aside), norm
    scales 1, biases and other 1-d leaves N(0, 0.02^2), in the leaf's stored dtype; the normal values are
    the pool from ``offset`` on, wrapped around as often as the leaf needs."""
    import jax.numpy as jnp

    dt, name = jnp.dtype(leaf.dtype), path.rsplit(".", 1)[-1]
    shape = leaf.shape[1:] if leaf.axes and leaf.axes[0] == "layers" else leaf.shape
    if name == "gamma" or (name == "weight" and "norm" in path):
        return jnp.ones(leaf.shape, dt)
    std = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
    size = math.prod(leaf.shape)
    flat = pool[offset:offset + size] if offset + size <= pool.size else jnp.resize(jnp.roll(pool, -offset), size)
    return (flat.reshape(leaf.shape) * std).astype(dt)


def random_params(tree: dict, seed: int = 0, pool: int = 1 << 26) -> dict:
    """A concrete param tree for an abstract one (``format.component_tree``), made on the default device by
    one jitted call: no host copy of the weights. One ``jax.random.normal`` pool of up to ``pool`` values
    (all of them at smoke sizes) is laid over the leaves one after the other and wrapped around where the
    model is larger (as tools/make_synthetic_checkpoint.py tiles a random block): one RNG op to compile
    instead of one per leaf (tens of seconds on CPU), no float32 copy of a leaf."""
    import jax
    import jax.numpy as jnp

    from wan_runtime import format as fmt

    flat = fmt.flatten(tree)
    n = min(pool, sum(math.prod(leaf.shape) for leaf in flat.values()))

    def make(key):
        values, out, offset = jax.random.normal(key, (n,), jnp.float32), {}, 0
        for path, leaf in flat.items():
            out[path] = _leaf_from_pool(values, offset % n, path, leaf)
            offset += math.prod(leaf.shape)
        return out

    return fmt.unflatten(jax.block_until_ready(jax.jit(make)(jax.random.key(seed))))


#: a phase process saves every finished case here as it goes (``--result`` + ".partial"): a phase killed by
#: its timeout, or one whose process dies, still reports what it had measured
PARTIAL: dict = {"path": None, "cases": {}}


def guarded(label: str, fn, *args) -> dict:
    """fn(*args), or {"error": its one-line message} if it raised (one case fails, the phase goes on);
    saved under ``label`` in the partial results."""
    try:
        res = fn(*args)
    except Exception as e:  # recorded in the report: an unsupported shape, an out-of-memory
        lines = str(e).strip().splitlines()
        res = {"error": f"{type(e).__name__}: {lines[0][:400] if lines else ''}".rstrip(": ")}
    if PARTIAL["path"] is not None:
        PARTIAL["cases"][label] = res
        write_json(PARTIAL["path"], PARTIAL["cases"])
    return res


def tree_bytes(tree) -> int:
    import jax

    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def all_finite(x) -> bool:
    import jax.numpy as jnp

    return bool(jnp.isfinite(x).all())


# ------------------------------------------------------------------------------------------
# phase: env
# ------------------------------------------------------------------------------------------
def _cuda_versions() -> dict:
    """CUDA runtime / driver / cuDNN versions from jax's CUDA plugin, each None where not visible."""
    try:
        from jax._src.lib import cuda_versions as cv
    except ImportError:
        cv = None
    out = {}
    for key, fn in (("cudnn_version", "cudnn_get_version"), ("cuda_runtime_version", "cuda_runtime_get_version"),
                    ("cuda_driver_version", "cuda_driver_get_version")):
        try:
            out[key] = getattr(cv, fn)() if cv is not None else None
        except Exception:  # best effort: a plugin without this query, or no GPU behind it
            out[key] = None
    return out


def _plugins() -> dict:
    from importlib import metadata

    found = {}
    for dist in ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt", "jax-cuda12-pjrt", "libtpu"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def phase_env(_sizes: dict) -> dict:
    import jax
    import jaxlib

    from wan_runtime.models import attention as A

    devs = jax.devices()
    d = devs[0]
    cc = getattr(d, "compute_capability", None)
    res = dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
               backend=jax.default_backend(), platform=d.platform, device_kind=d.device_kind, device_count=len(devs),
               compute_capability=None if cc is None else str(cc), **_cuda_versions(), plugins=_plugins(),
               memory_limit_bytes=(d.memory_stats() or {}).get("bytes_limit"),
               preferred_multiple=A.preferred_multiple(),
               mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    res["ok"] = len(devs) > 0
    res["summary"] = (f"{res['backend']} {res['device_kind']} x{len(devs)}, jax {res['jax']}"
                      + (f", cc {res['compute_capability']}" if cc is not None else "")
                      + (f", cuDNN {res['cudnn_version']}" if res["cudnn_version"] else ""))
    return res


# ------------------------------------------------------------------------------------------
# phase: attention
# ------------------------------------------------------------------------------------------
def _reference(q, k, v, key_mask):
    """Dense float32 attention at full precision (a check may hold S x S scores; the runtime may not)."""
    import jax
    import jax.numpy as jnp

    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v, precision=hi)


def _rel_err(out, ref):
    """max |out - ref| / max |ref|, on the device."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda o, r: jnp.max(jnp.abs(o.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))(out, ref)


def _qkv(key, b, h, dh, sq, sk, real):
    """Random bf16 q (B, sq, H, Dh), k, v (B, sk, H, Dh) on the device, and a key mask (real keys first)
    when ``real`` is not None."""
    import jax
    import jax.numpy as jnp

    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, sq, h, dh), jnp.bfloat16)
    k, v = (jax.random.normal(x, (b, sk, h, dh), jnp.bfloat16) for x in (kk, kv))
    mask = None if real is None else jnp.broadcast_to(jnp.arange(sk) < real, (b, sk))
    return q, k, v, mask


def _attn_fn(impl):
    import jax

    from wan_runtime.models import attention as A

    return jax.jit(lambda q, k, v, m: A.attention(q, k, v, key_mask=m, implementation=impl))


def _attention_cases(sz: dict, multiple: int):
    """(name, heads, head_dim, query length, key length, real keys or None) of every accuracy case."""
    s = sz["seq"]
    sp = s + (-s % multiple)
    for h in sz["heads"]:
        yield f"self H{h} S{s}->{sp}", h, sz["head_dim"], sp, sp, (s if sp != s else None)
        for sk in sz["cross_keys"]:
            yield f"cross H{h} S{sp} Sk{sk}", h, sz["head_dim"], sp, sk, None
    h, dh, s = sz["clip"]
    yield f"clip H{h} Dh{dh} S{s}", h, dh, s, s, None


def _accuracy_case(key, b, h, dh, sq, sk, real) -> dict:
    """Selected kernel and blocked fallback (the same call where it is the selected one) against the float32
    reference over every query row (padded rows attend to the real keys too: attention's contract), the
    selected kernel's error over the real rows only (what the model keeps), and whether the selected
    kernel's compiled HLO holds the cuDNN call."""
    import jax

    from wan_runtime.models import attention as A

    q, k, v, m = _qkv(key, b, h, dh, sq, sk, real)
    impl = A.select_implementation(q, k)
    exe, _ = compiled(_attn_fn(impl), q, k, v, m)
    hlo = exe.as_text() or ""
    ref = jax.jit(_reference)(q, k, v, m)
    out = exe(q, k, v, m)
    outs = {"selected": out, "blocked": out if impl == "blocked" else _attn_fn("blocked")(q, k, v, m)}
    err = {name: float(_rel_err(o, ref)) for name, o in outs.items()}
    rows = real if real is not None and sq == sk else sq
    return dict(impl=impl, shape_q=[b, sq, h, dh], keys=sk, real_keys=real, err_selected=err["selected"],
                err_selected_real_rows=float(_rel_err(out[:, :rows], ref[:, :rows])),
                err_blocked=err["blocked"], cudnn_in_hlo="__cudnn$fmha" in hlo or "cudnn" in hlo.lower())


def _throughput_case(key, b, h, dh, real, multiple, repeats) -> dict:
    """TFLOP/s of the selected kernel on ``real`` tokens padded to the multiple (key mask), 4 B H S^2 Dh."""
    from wan_runtime.models import attention as A

    sp = real + (-real % multiple)
    q, k, v, m = _qkv(key, b, h, dh, sp, sp, real if sp != real else None)
    impl = A.select_implementation(q, k)
    exe, compile_s = compiled(_attn_fn(impl), q, k, v, m)
    exe(q, k, v, m).block_until_ready()
    secs, out = best_time(lambda: exe(q, k, v, m), repeats)
    flops = 4 * b * h * sp * sp * dh
    return dict(impl=impl, heads=h, head_dim=dh, tokens=real, padded=sp, compile_s=compile_s, seconds=secs,
                tflops=flops / secs / 1e12, finite=all_finite(out))


def phase_attention(sz: dict) -> dict:
    """Every case on its own (an unsupported shape or an OOM is that case's one-line error); ok when every
    case ran, every error is within the bound and the cuDNN call is in the HLO exactly where selected."""
    import jax

    from wan_runtime.models import attention as A

    multiple = sz["multiple"] or A.preferred_multiple()
    keys = iter(jax.random.split(jax.random.key(0), 64))
    cases = {name: guarded(name, _accuracy_case, next(keys), sz["batch"], h, dh, sq, sk, real)
             for name, h, dh, sq, sk, real in _attention_cases(sz, multiple)}
    perf = {f"S{real} H{h}": guarded(f"S{real} H{h}", _throughput_case, next(keys), sz["batch"], h, sz["head_dim"],
                                     real, multiple, sz["repeats"]) for real, h in sz["perf"]}
    ran = [c for c in cases.values() if "error" not in c]
    timed = [p for p in perf.values() if "error" not in p]
    errs = [c[e] for c in ran for e in ("err_selected", "err_blocked")]
    ok = (len(ran) == len(cases) and len(timed) == len(perf)
          and all(math.isfinite(e) and e <= ATTN_BOUND for e in errs)
          and all(c["cudnn_in_hlo"] == (c["impl"] == "cudnn") for c in ran)
          and all(p["finite"] and p["tflops"] > 0 for p in timed))
    tf = [p["tflops"] for p in timed] or [math.nan]
    summary = (f"{'/'.join(sorted({c['impl'] for c in ran}))}: max err {max(errs, default=math.nan):.1e} (bound "
               f"{ATTN_BOUND:g}), cuDNN in HLO {sum(c['cudnn_in_hlo'] for c in ran)}/{len(cases)}, "
               f"{min(tf):.3g}-{max(tf):.3g} TFLOP/s"
               + (f", {len(cases) + len(perf) - len(ran) - len(timed)} case(s) failed" if not ok else ""))
    return dict(ok=ok, bound=ATTN_BOUND, multiple=multiple, batch=sz["batch"], cases=cases, throughput=perf,
                max_err=max(errs, default=None), summary=summary)


# ------------------------------------------------------------------------------------------
# phases: step13b, step14b
# ------------------------------------------------------------------------------------------
def denoise_loop(params, latents, text, rope, *, cfg, steps: int, dtype):
    """``steps`` Euler steps of a flow model from sigma 1 to 0: the text embedding and every block's
    cross-attention K/V once, then per step patchify, time embedding, ``run_blocks`` and the head."""
    import jax
    import jax.numpy as jnp

    from wan_runtime.models import transformer as T

    kv = T.cross_kv(params, cfg, T.embed_text(params, cfg, text, dtype), dtype)
    pt, ph, pw = cfg.patch_size
    grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
    sigmas = jnp.linspace(1.0, 0.0, steps + 1)

    def step(i, x):
        t = jnp.full((x.shape[0],), sigmas[i] * 1000.0)
        h = T.patchify(params, cfg, x, dtype)
        temb, tp = T.embed_time(params, cfg, t, dtype)
        h = T.run_blocks(params, h, tp, rope, kv, cfg, dtype)
        return x + (sigmas[i + 1] - sigmas[i]) * T.unpatchify_head(params, cfg, h, temb, grid)

    return jax.lax.fori_loop(0, steps, step, latents.astype(jnp.float32))


def dit_flops(cfg, batch: int, tokens: int, padded: int, text_len: int) -> dict:
    """Analytic FLOPs (2 per multiply-add) of one step (the blocks on the padded tokens: 6 D x D projections,
    the FFN, self-attention 4 B H S^2 Dh, cross-attention 4 B H S Sc Dh; patchify and head on the real
    tokens) and of the once-per-generation text embedding and cross-attention K/V."""
    D, F, H, Dh, L = cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.head_dim, cfg.num_layers
    patch = math.prod(cfg.patch_size)
    b, s = batch, padded
    block = 2 * b * s * D * D * 6 + 4 * b * s * D * F + 4 * b * H * s * s * Dh + 4 * b * H * s * text_len * Dh
    io = 2 * b * tokens * D * patch * (cfg.in_channels + cfg.out_channels)
    once = 2 * b * text_len * (cfg.text_dim * D + D * D) + L * 2 * (2 * b * text_len * D * D)
    return dict(block=block, step=L * block + io, once=once)


def _xla_block_flops(params, cfg, batch: int, padded: int, text_len: int, dtype):
    """XLA's cost analysis of one lowered block (abstract inputs; no compile): the cross-check of
    :func:`dit_flops`. It cannot see inside a cuDNN call and counts a loop body once (the blocked kernel
    above 512 tokens), so on an accelerator it is expected below the analytic count."""
    import jax
    import jax.numpy as jnp

    from wan_runtime.models import transformer as T

    sds = jax.ShapeDtypeStruct
    layer = jax.tree.map(lambda a: sds(a.shape[1:], a.dtype), params["blocks"])
    D, H, Dh = cfg.dim, cfg.num_heads, cfg.head_dim
    kv = {"k": sds((batch, text_len, H, Dh), dtype), "v": sds((batch, text_len, H, Dh), dtype)}
    args = (layer, sds((batch, padded, D), dtype), sds((batch, 6, D), dtype),
            (sds((padded, Dh // 2), jnp.float32),) * 2, kv, sds((batch, padded), jnp.bool_))
    fn = jax.jit(lambda p, x, tp, rope, kv, m: T.block(p, x, tp, rope, kv, cfg, dtype, key_mask=m))
    try:
        cost = fn.lower(*args).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # best effort: a backend without a cost model
        return None


def _step_inputs(cfg, shape, sz: dict, seed: int):
    """Random latents of ``shape``, a random text embedding, the token grid and its RoPE tables."""
    import jax
    import jax.numpy as jnp

    from wan_runtime.models import transformer as T

    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape, jnp.float32)
    text = jax.random.normal(k2, (shape[0], sz["text_len"], cfg.text_dim), jnp.float32) * 0.1
    grid = (shape[2] // cfg.patch_size[0], shape[3] // cfg.patch_size[1], shape[4] // cfg.patch_size[2])
    return x, text, grid, tuple(jnp.asarray(r) for r in T.rope_tables(cfg, grid))


def _step_resolution(params, cfg, shape, sz: dict, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    from wan_runtime.models import attention as A

    dtype = jnp.bfloat16
    x, text, grid, rope = _step_inputs(cfg, shape, sz, seed)
    loop = jax.jit(denoise_loop, static_argnames=("cfg", "steps", "dtype"))
    exe, compile_s = compiled(loop, params, x, text, rope, cfg=cfg, steps=sz["steps"], dtype=dtype)
    loop_s, out = best_time(lambda: exe(params, x, text, rope), sz["repeats"])
    tokens = math.prod(grid)
    padded = tokens + (-tokens % A.preferred_multiple(seq_len=tokens))
    fl = dit_flops(cfg, shape[0], tokens, padded, sz["text_len"])
    total = sz["steps"] * fl["step"] + fl["once"]
    xla_block = _xla_block_flops(params, cfg, shape[0], padded, sz["text_len"], dtype)
    return dict(latents=list(shape), tokens=tokens, padded_tokens=padded, steps=sz["steps"], compile_s=compile_s,
                loop_s=loop_s, step_s=loop_s / sz["steps"], flops_per_step=fl["step"], flops_once=fl["once"],
                flops_source="analytic", tflops=total / loop_s / 1e12,
                mfu=total / loop_s / 1e12 / PEAK_BF16_TFLOPS, xla_block_flops=xla_block,
                xla_vs_analytic_block=None if xla_block is None else xla_block / fl["block"],
                peak_bytes=peak_bytes(), finite=all_finite(out))


def phase_step(sz: dict) -> dict:
    import make_synthetic_checkpoint as msc

    from wan_runtime import format as fmt
    from wan_runtime.models import transformer as T

    cfg_dict = dict(msc.transformer_config(sz["model"]), **sz["overrides"])
    cfg = T.WanTransformerConfig.from_config(cfg_dict)
    t0 = time.perf_counter()
    params = random_params(fmt.component_tree("transformer", cfg_dict, "bfloat16"))
    init_s = time.perf_counter() - t0
    runs = {name: guarded(name, _step_resolution, params, cfg, tuple(shape), sz, i) for i, (name, shape) in
            enumerate(sz["latents"].items())}  # a 720p OOM keeps the 480p figures
    summary = ", ".join(f"{n}: " + (f"FAILED {r['error']}" if "error" in r else
                                    f"{r['step_s']:.3g} s/step MFU {r['mfu']:.2g}"
                                    + (f" peak {r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] else ""))
                        for n, r in runs.items())
    return dict(ok=all(r.get("finite") for r in runs.values()), config=cfg_dict, param_bytes=tree_bytes(params),
                init_s=init_s, peak_tflops=PEAK_BF16_TFLOPS, runs=runs, summary=summary)


def _fp8_variant(params, cfg, x, text, rope, sz: dict, fp8_mm: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from wan_runtime.models.layers import fp8_matmul

    loop = jax.jit(denoise_loop, static_argnames=("cfg", "steps", "dtype"))
    with fp8_matmul(fp8_mm):
        exe, compile_s = compiled(loop, params, x, text, rope, cfg=cfg, steps=sz["steps"], dtype=jnp.bfloat16)
    loop_s, out = best_time(lambda: exe(params, x, text, rope), sz["repeats"])
    return dict(compile_s=compile_s, step_s=loop_s / sz["steps"], peak_bytes=peak_bytes(), param_bytes=tree_bytes(params),
                finite=all_finite(out)), out


def phase_fp8(sz: dict) -> dict:
    """The 14B-shaped step (as step14b, 480p) with bf16 block weights, with e4m3 weights and per-channel
    scales (weight-only: ``dense`` scales the matmul's output), and e4m3 with ``--fp8-matmul`` (fp8 x fp8
    with per-token activation scales; where ``fp8_matmul_support()`` allows, else recorded as skipped):
    step time and the final latents' relative error against the bf16 run."""
    import jax.numpy as jnp
    import make_synthetic_checkpoint as msc

    from wan_runtime import format as fmt
    from wan_runtime import quant
    from wan_runtime.models import transformer as T
    from wan_runtime.models.layers import fp8_matmul_support

    cfg_dict = dict(msc.transformer_config(sz["model"]), **sz["overrides"])
    cfg = T.WanTransformerConfig.from_config(cfg_dict)
    params = random_params(fmt.component_tree("transformer", cfg_dict, "bfloat16"))
    x, text, _, rope = _step_inputs(cfg, tuple(sz["latents"]["480p"]), sz, 0)
    runs, outs = {}, {}
    runs["bf16"], outs["bf16"] = _fp8_variant(params, cfg, x, text, rope, sz, False)
    params = quant.quantize_tree(params, fmt.component_tree("transformer", cfg_dict, "float8_e4m3fn"), "float8_e4m3fn")
    runs["e4m3"], outs["e4m3"] = _fp8_variant(params, cfg, x, text, rope, sz, False)
    why = fp8_matmul_support()
    if why:
        runs["e4m3+fp8_matmul"] = dict(skipped=why)
    else:
        runs["e4m3+fp8_matmul"], outs["e4m3+fp8_matmul"] = _fp8_variant(params, cfg, x, text, rope, sz, True)
    ref = outs["bf16"].astype(jnp.float32)
    for name, out in outs.items():
        runs[name]["rel_err_vs_bf16"] = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        runs[name]["step_vs_bf16"] = runs[name]["step_s"] / runs["bf16"]["step_s"]
    summary = ", ".join(f"{n}: skipped ({r['skipped']})" if "skipped" in r else
                        f"{n}: {r['step_s']:.3g} s/step ({r['step_vs_bf16']:.2f}x) rel err {r['rel_err_vs_bf16']:.2g}"
                        for n, r in runs.items())
    return dict(ok=all(r.get("finite", True) for r in runs.values()), config=cfg_dict, runs=runs, summary=summary)


# ------------------------------------------------------------------------------------------
# phase: vae
# ------------------------------------------------------------------------------------------
def phase_vae(sz: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from wan_runtime import configs
    from wan_runtime import format as fmt
    from wan_runtime.models import vae as V
    from wan_runtime.runconfig import Dtypes

    vcfg = configs.parse("vae", sz["config"])
    weights = "bfloat16"  # what wan-convert writes by default (norm scales stay float32)
    tree = fmt.component_tree("vae", sz["config"], weights)
    t0 = time.perf_counter()
    params = random_params({k: v for k, v in tree.items() if k in ("post_quant_conv", "decoder")})  # what decode uses
    init_s = time.perf_counter() - t0
    dtype = jnp.dtype(Dtypes().vae)
    z = jax.random.normal(jax.random.key(1), sz["latents"], jnp.float32)
    precision = V.default_precision()  # what WanPipeline uses unless --vae-precision says otherwise
    exe, compile_s = compiled(V.decode, params, vcfg, z, dtype=dtype, precision=precision)
    secs, video = best_time(lambda: exe(params, z), 1)
    res = dict(config=sz["config"], latents=list(sz["latents"]), video=list(video.shape), weights_dtype=weights,
               compute_dtype=str(dtype), precision=precision, param_bytes=tree_bytes(params), init_s=init_s,
               compile_s=compile_s, decode_s=secs, peak_bytes=peak_bytes(), finite=all_finite(video))
    res["ok"] = res["finite"]
    res["summary"] = (f"{'x'.join(map(str, video.shape[2:]))} video ({precision}): {secs:.3g} s"
                      + (f", peak {res['peak_bytes'] / 2**30:.1f} GiB" if res["peak_bytes"] else ""))
    return res


# ------------------------------------------------------------------------------------------
# phase: restore
# ------------------------------------------------------------------------------------------
def bitwise_equal(a: dict, b: dict) -> bool:
    """Same paths, shapes, dtypes and bits (compared on the device)."""
    import jax
    import jax.numpy as jnp

    from wan_runtime import format as fmt

    fa, fb = fmt.flatten(a), fmt.flatten(b)
    if fa.keys() != fb.keys():
        return False
    for p in fa:
        x, y = fa[p], fb[p]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        bits = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
        if not bool(jnp.array_equal(jax.lax.bitcast_convert_type(x, bits), jax.lax.bitcast_convert_type(y, bits))):
            return False
    return True


def phase_restore(sz: dict) -> dict:
    import jax

    import make_synthetic_checkpoint as msc
    from wan_convert.convert import convert
    from wan_runtime import checkpoint as C

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        src, ck = pathlib.Path(tmp) / "source", pathlib.Path(tmp) / "converted"
        t0 = time.perf_counter()
        msc.write(src, "wan2.1-t2v-1.3b", sz["layers"])
        t1 = time.perf_counter()
        convert(str(src), ck, only=["transformer"], force=True, hash_source=False)
        t2 = time.perf_counter()
        ckpt = C.open_checkpoint(ck)
        nbytes = ckpt.manifest["components"]["transformer"]["bytes"]
        times = {"direct": [], "tensorstore": []}
        for _ in range(sz["rounds"]):
            got = {}
            for name, direct in (("direct", True), ("tensorstore", False)):
                secs, got[name] = best_time(lambda: C.restore_component(ckpt, "transformer", direct=direct), 1)
                times[name].append(secs)
        same = bitwise_equal(got["direct"], got["tensorstore"])
        layers = ckpt.config("transformer")["num_layers"]
    best = {k: min(v) for k, v in times.items()}
    res = dict(layers=layers, checkpoint_bytes=nbytes, write_s=t1 - t0, convert_s=t2 - t1, seconds=best,
               times=times, gb_per_s={k: nbytes / v / 1e9 for k, v in best.items()}, bitwise_equal=same,
               direct_reader_available=C._crc32c is not None, device=str(jax.devices()[0]), ok=same)
    res["summary"] = (f"{nbytes / 1e9:.2f} GB: direct {res['gb_per_s']['direct']:.2f} GB/s, tensorstore "
                      f"{res['gb_per_s']['tensorstore']:.2f} GB/s, bitwise equal {same}")
    return res


PHASE_FUNCS = {"env": phase_env, "attention": phase_attention, "step13b": phase_step, "step14b": phase_step,
               "fp8": phase_fp8, "vae": phase_vae, "restore": phase_restore}


# ------------------------------------------------------------------------------------------
# driver: one process per phase
# ------------------------------------------------------------------------------------------
def _tail(text: str, n: int = 8) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-n:]


def run_phase_process(name: str, args, tmp: pathlib.Path) -> dict:
    """Run one phase in a child process; its result, or {ok: False, error, error_tail} if it failed."""
    result = tmp / f"{name}.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--phase", name, "--result", str(result)]
    cmd += ["--smoke"] * args.smoke + ["--quick"] * args.quick
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.phase_timeout)
        rc, log = p.returncode, p.stderr + p.stdout
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        rc, log = None, f"{err}\ntimed out after {args.phase_timeout:g} s"
    seconds = time.perf_counter() - t0
    if rc == 0 and result.is_file():
        return dict(json.loads(result.read_text()), seconds=seconds)
    tail = _tail(log)
    partial = result.with_name(result.name + ".partial")
    return dict(ok=False, seconds=seconds, rc=rc, error=tail[-1] if tail else f"exit status {rc}, no output",
                error_tail=tail, summary=f"FAILED: {tail[-1] if tail else rc}",
                partial=json.loads(partial.read_text()) if partial.is_file() else None)


def print_table(report: dict) -> None:
    print(f"\n{'phase':<10} {'ok':<4} {'seconds':>8}  summary")
    for name, r in report["phases"].items():
        print(f"{name:<10} {'ok' if r.get('ok') else 'FAIL':<4} {r.get('seconds', 0):>8.1f}  {r.get('summary', '')}")
    print(f"total {report['total_s']:.1f} s -> {report['out']}")


def drive(args) -> int:
    names = PHASES if not args.only else tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        print(f"gpu_check: error: unknown phase {', '.join(unknown)} (phases: {', '.join(PHASES)})", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    report = dict(tool="tools/gpu_check.py", smoke=args.smoke, quick=args.quick, out=str(out),
                  started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  host=platform.node(), phases={}, total_s=0.0, ok=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-results-") as tmp:
        for name in names:
            print(f"gpu_check: {name} ...", flush=True)
            report["phases"][name] = r = run_phase_process(name, args, pathlib.Path(tmp))
            print(f"gpu_check: {name} {'ok' if r.get('ok') else 'FAILED'} ({r['seconds']:.1f} s)"
                  + ("" if r.get("ok") else f": {r.get('error', r.get('summary', ''))}"), flush=True)
            report.update(total_s=time.perf_counter() - t0, ok=all(p.get("ok") for p in report["phases"].values()))
            write_json(out, report)
    print_table(report)
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every phase at tiny shapes on CPU (a few seconds each)")
    ap.add_argument("--quick", action="store_true", help="skip the 14B 720p step")
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu_check.json"), help="the JSON report")
    ap.add_argument("--only", default=None, help=f"comma-separated phases (default all: {','.join(PHASES)})")
    ap.add_argument("--phase-timeout", type=float, default=None,
                    help="seconds before a phase is killed and recorded as failed (default 300, smoke 180)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        if args.result is None:
            ap.error("--phase needs --result")
        PARTIAL["path"] = args.result.with_name(args.result.name + ".partial")
        write_json(args.result, PHASE_FUNCS[args.phase](sizes(args.phase, args.smoke, args.quick)))
        return 0
    args.phase_timeout = args.phase_timeout or (180.0 if args.smoke else 300.0)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
