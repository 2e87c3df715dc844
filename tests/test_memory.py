"""Working memory of a real-size denoise step, from XLA's buffer assignment (compile only: every input is a
``jax.ShapeDtypeStruct``, nothing is allocated at its real size)."""
import functools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from wan_runtime import denoise as loop
from wan_runtime import plan as P
from wan_runtime import residency
from wan_runtime.checkpoint import open_checkpoint
from wan_runtime.pipeline import WanPipeline
from wan_runtime.runconfig import RunConfig
from wan_runtime.format import Leaf, component_tree, np_dtype
from wan_runtime.models import transformer as tr
from wan_runtime.runconfig import Dtypes

#: Wan2.1-T2V-1.3B's transformer/config.json (diffusers' WanTransformer3DModel)
WAN21_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                  rope_max_seq_len=1024)
LATENTS_480P_81F = (1, 16, 21, 60, 104)  # 480 x 832 px, 81 frames -> (21, 30, 52) = 32,760 tokens
TEXT_TOKENS = 512
TEMP_LIMIT_GIB = 16
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device for the CLI


def _abstract_params(cfg_dict: dict, weights: str):
    tree = component_tree("transformer", cfg_dict, weights)
    return jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, np_dtype(l.dtype)), tree,
                        is_leaf=lambda l: isinstance(l, Leaf))


def _step(params, kv, x, t, rope, *, st, grid):
    """One denoise step as the loop runs it: cond + uncond in one batch of two on the cached cross-attention
    K/V, then classifier-free guidance (the scheduler update adds a few latent-sized arrays)."""
    v, _ = loop.model_eval(params, st.tcfg, kv, x, t, None, None, rope, grid, st)
    return v[1:] + 5.0 * (v[:1] - v[1:])


def test_1_3b_step_480p_81_frames_fits(measured):
    """A Wan2.1-T2V-1.3B step at 480p x 81 frames, CFG on (batch 2), KV cache of 512 text tokens, in the CPU
    default dtypes (everything float32): XLA's temporaries < 16 GiB. Layers are one ``lax.scan`` and attention
    the blocked fallback, so the compile is one block's (about a second), not thirty."""
    dtypes = Dtypes.default("cpu")
    dtype = jnp.dtype(dtypes.transformer)
    tcfg = tr.WanTransformerConfig.from_config(WAN21_1_3B)
    params = _abstract_params(WAN21_1_3B, dtypes.weights)
    sds = jax.ShapeDtypeStruct
    context = sds((2, TEXT_TOKENS, tcfg.dim), dtype)
    kv = jax.eval_shape(lambda p, c: tr.cross_kv(p, tcfg, c, dtype), params, context)  # (L, 2, 512, H, Dh) each
    grid = tuple(n // p for n, p in zip(LATENTS_480P_81F[2:], tcfg.patch_size))
    tokens = grid[0] * grid[1] * grid[2]
    rope = tuple(sds((tokens, tcfg.head_dim // 2), jnp.float32) for _ in range(2))
    st = loop.LoopSpec(tcfg=tcfg, cfg=True, dtype=dtype, sched_dtype=jnp.dtype(dtypes.scheduler))
    step = jax.jit(functools.partial(_step, st=st, grid=grid))
    t0 = time.perf_counter()
    compiled = step.lower(params, kv, sds(LATENTS_480P_81F, jnp.float32), sds((), jnp.float32), rope).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes / 2**30
    print(f"1.3B step 480p x 81 ({tokens} tokens), float32: temp {temp:.2f} GiB, arguments "
          f"{mem.argument_size_in_bytes / 2**30:.2f} GiB, compile {seconds:.1f} s")
    measured("optimization/step_memory/wan2.1-1.3b_480p_81f_float32/temp_gib", temp, tokens=tokens, batch=2,
             text_tokens=TEXT_TOKENS, argument_gib=mem.argument_size_in_bytes / 2**30, compile_s=seconds)
    assert tokens == 32760 and dtype == jnp.float32
    assert temp < TEMP_LIMIT_GIB, temp  # measured 4.80 GiB (arguments 5.10 GiB), compiled in ~1 s on 2 cores


# ------------------------------------------------------------------------------------------ wan-run --plan
def _metadata_checkpoint(src: pathlib.Path, dst: pathlib.Path, **configs) -> pathlib.Path:
    """A checkpoint folder with no arrays: ``src``'s manifest, tokenizer and scheduler, its component
    configs updated by ``configs`` (a plan reads nothing else)."""
    dst.mkdir()
    for f in ("manifest.json", "model_index.json"):
        shutil.copy(src / f, dst / f)
    for d in ("tokenizer", "scheduler"):
        shutil.copytree(src / d, dst / d)
    for c in json.loads((src / "manifest.json").read_text())["components"]:
        (dst / c).mkdir()
        cfg = json.loads((src / c / "config.json").read_text()) | configs.get(c, {})
        (dst / c / "config.json").write_text(json.dumps(cfg))
    return dst


#: Wan2.2-T2V-A14B at its published widths (each expert as Wan2.1-T2V-14B, UMT5-XXL, the Wan 2.1 VAE), 2 layers
A14B = {"transformer": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=2,
                            text_dim=4096, freq_dim=256),
        "text_encoder": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2, vocab_size=256384),
        "vae": dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2)}
A14B["transformer_2"] = A14B["transformer"]


def test_plan_a14b_720p_81_frames(converted, tmp_path, measured):
    """``wan-run --plan`` for Wan2.2-T2V-A14B (2 layers per expert) at 720p x 81 frames on one device,
    float32 (the CPU default): the denoise stage's working memory is within 15% of a hand-built step of
    the same shapes compiled here (XLA's memory analysis: inputs, K/V, temporaries), the K/V cache is the
    closed-form size, and the total is the weights plus the largest stage."""
    ck_dir = _metadata_checkpoint(converted["wan2.2-t2v-a14b"], tmp_path / "a14b", **A14B)
    run = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(ck_dir), "--plan",
                          "--height", "720", "--width", "1280", "--frames", "81", "--device-memory", "80GiB"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr
    ck = open_checkpoint(ck_dir)
    config = RunConfig.resolve(ck, None, height=720, width=1280, frames=81, steps=2)
    plan = P.plan(ck, config, dtypes=Dtypes.of(None), device_memory_bytes=80 << 30, offload="none")
    assert f"peak {plan.peak.peak / 2**30:.2f} GiB" in run.stdout and "fits" in run.stdout
    tcfg = tr.WanTransformerConfig.from_config(ck.config("transformer"))
    assert plan.kv_cache == tcfg.num_layers * 2 * 2 * 512 * tcfg.dim * 4  # (k, v) x cond/uncond x 512 tokens, f32
    weights = sum(plan.weights.values())
    assert plan.peak.weights == weights  # offload none: everything resident
    den = next(s for s in plan.stages if s.name == "denoise")
    step = _step_memory(ck, tcfg, (1, 16, 21, 90, 160))
    measured("plan/a14b_2layers_720p_81f/denoise_working_gib", den.working / 2**30, step_gib=step / 2**30,
             peak_gib=plan.peak.peak / 2**30, weights_gib=weights / 2**30)
    assert abs(den.working - step) <= 0.15 * step, (den.working, step)


def _step_memory(ck, tcfg, latents) -> int:
    """A step's inputs (latents, K/V, RoPE) + outputs + temporaries, compiled from the model functions."""
    params = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, jnp.float32 if l.dtype != "float32" else
                                                         jnp.float32), ck.abstract_tree("transformer"),
                          is_leaf=lambda l: isinstance(l, Leaf))
    sds = jax.ShapeDtypeStruct
    kv = jax.eval_shape(lambda p, c: tr.cross_kv(p, tcfg, c, jnp.float32), params, sds((2, 512, tcfg.dim), jnp.float32))
    grid = tuple(n // p for n, p in zip(latents[2:], tcfg.patch_size))
    rope = tuple(sds((math.prod(grid), tcfg.head_dim // 2), jnp.float32) for _ in range(2))
    st = loop.LoopSpec(tcfg=tcfg, cfg=True, dtype=jnp.dtype(jnp.float32), sched_dtype=jnp.dtype(jnp.float32))
    m = jax.jit(functools.partial(_step, st=st, grid=grid)).lower(
        params, kv, sds(latents, jnp.float32), sds((), jnp.float32), rope).compile().memory_analysis()
    weights = sum(math.prod(p.shape) * 4 for p in jax.tree.leaves(params))
    return m.argument_size_in_bytes - weights + m.output_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.parametrize("offload", ["none", "experts"])
def test_plan_equals_the_run(converted, offload):
    """The plan's stages are the programs a real generation compiles: per stage, XLA's outputs, aliases
    and temporaries equal those of the pipeline's own executables, the weights equal the restored
    arrays' bytes, and the residency follows the offload mode."""
    path = converted["wan2.2-t2v-a14b"]
    pipe = WanPipeline.from_converted(path, offload=offload)
    kw = dict(height=32, width=48, frames=9, steps=4, guidance=4.0)
    config = pipe.config(**kw)
    pipe.generate("a red fox", config, output_type="uint8")  # as the plan (and wan-run to .mp4)
    plan = P.plan(pipe.ckpt, config, dtypes=pipe.dtypes, offload=offload)
    real = {k[0]: pipe._compiled[k].memory_analysis() for k in pipe.compiled}
    for s in plan.stages:
        m = real[s.name]
        assert (s.outputs, s.aliased, s.temporaries, s.arguments) == (
            m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes, m.argument_size_in_bytes), s.name
    assert plan.weights == {c: residency.device_bytes(t) for c, t in pipe.params.trees().items()}
    den = [s for s in plan.stages if s.name == "denoise"]
    experts = {"none": 2, "experts": 1}[offload]
    assert [sum(c.startswith("transformer") for c in s.resident) for s in den] == [experts] * len(den)
    assert len(den) == 2  # both expert phases ran
