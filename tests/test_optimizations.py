"""Each inference optimization leaves the output unchanged (bitwise where the arithmetic is identical)."""
import gc

import jax
import numpy as np
import pytest

from wan_runtime.pipeline import Dtypes, InputError, WanPipeline

KW = dict(height=32, width=48, num_frames=9, guidance_scale=4.0, seed=3)


def _generate(pipe, steps=3, **kw):
    return pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=steps, **{**KW, **kw})


def _run(pipe, steps=3, **kw):
    return _generate(pipe, steps, **kw).frames


@pytest.fixture(scope="module")
def t2v(converted):
    return WanPipeline.from_converted(converted["wan2.1-t2v"], dtype="float32")


@pytest.fixture(scope="module")
def a14b(converted):
    return WanPipeline.from_converted(converted["wan2.2-t2v-a14b"], dtype="float32")


def max_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def psnr(a, b):
    """dB, frames in [0, 1] (peak 1)."""
    return float(10 * np.log10(1 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def _denoise_executables(pipe):
    return [k for k in pipe._compiled if k[0] == "denoise"]


@pytest.mark.parametrize("which", ["t2v", "a14b"])
def test_one_loop_equals_per_step_calls_bitwise(which, t2v, a14b, measured):
    """The whole loop in one call == the same loop body called once per step from Python (and, for
    Wan 2.2, across the expert boundary)."""
    pipe = {"t2v": t2v, "a14b": a14b}[which]
    whole = _run(pipe.replace(steps_per_call=None), steps=4)
    stepped = _run(pipe.replace(steps_per_call=1), steps=4)
    chunked = _run(pipe.replace(steps_per_call=3), steps=4)  # uneven chunks: 3 + 1
    measured(f"optimization/one_loop_vs_per_step/{which}/max_abs", max_abs(whole, stepped))
    measured(f"optimization/one_loop_vs_3_plus_1/{which}/max_abs", max_abs(whole, chunked))
    assert np.array_equal(whole, stepped) and np.array_equal(whole, chunked)


def test_progress_reports_every_step(t2v):
    seen = []
    _run(t2v, steps=3, progress=seen.append)
    assert seen == [0, 1, 2]


def test_one_executable_for_every_guidance_and_step_count(t2v):
    a = _run(t2v, steps=2, guidance_scale=3.0)
    _run(t2v, steps=5, guidance_scale=7.5)
    b = _run(t2v, steps=2, guidance_scale=3.0)
    assert len(_denoise_executables(t2v)) == 1
    assert np.array_equal(a, b)


def test_text_length_is_part_of_the_loop_key(t2v):
    """Another max_sequence_length on the same pipeline compiles another loop (it was reused, and failed
    with a shape mismatch), and the first length still gives its own result."""
    a = _run(t2v, steps=2, max_sequence_length=512)
    short = _run(t2v, steps=2, max_sequence_length=64)
    assert short.shape == a.shape and not np.array_equal(short, a)
    assert np.array_equal(_run(t2v, steps=2, max_sequence_length=512), a)


def test_kv_cache_on_off(t2v, measured):
    on = _run(t2v.replace(kv_cache=True))
    n = len(_denoise_executables(t2v))
    off = _run(t2v.replace(kv_cache=False))  # the same weights and compiled stages
    assert len(_denoise_executables(t2v)) == n + 1  # off is another loop (projections inside), not ignored
    err = max_abs(on, off)
    measured("optimization/kv_cache_on_vs_off/max_abs", err)
    # measured 0 (bitwise). Same projections, but XLA may fuse the in-loop einsum differently from the hoisted
    # one, so float32 rounding is allowed: 1e-6 is ~16 float32 ulps at 1.0 (frames are in [0, 1]).
    assert err <= 1e-6, err


def test_uint8_on_device_equals_rounded_float_frames(t2v):
    f = _run(t2v)
    u = _run(t2v, output_type="uint8")
    assert u.dtype == np.uint8 and u.shape == f.shape
    assert np.array_equal(u, np.round(f * 255.0).astype(np.uint8))


# bf16 output vs the float32 pipeline (t2v: the same bf16 checkpoint recast to float32, float32 compute), same
# seed, 2 steps. bf16 changes the output by design, so these are closeness bounds, not "unchanged": each
# allows 10x the measured mean squared error (PSNR 10 dB below the measured), and a difference of exactly 0
# would mean the setting was ignored.
MIXED_PSNR_DB = 38.0    # measured 48.7 dB (max abs 3.1e-2): bf16 transformer and VAE compute, bf16 VAE weights
DEFAULT_PSNR_DB = 45.0  # measured 55.9 dB (max abs 1.9e-2): Dtypes() (bf16 transformer / text encoder, float32 VAE)


def test_dtype_settings(converted, t2v, measured):
    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"],
                                      dtype=Dtypes(transformer="bfloat16", text_encoder="float32", vae="bfloat16",
                                                   weights="float32", vae_weights="bfloat16"))
    w = pipe.params["transformer"]["blocks"]["attn1"]["to_q"]["weight"]
    assert w.dtype == jax.numpy.float32  # bf16 checkpoint recast
    assert pipe.params["vae"]["decoder"]["conv_in"]["weight"].dtype == jax.numpy.bfloat16
    assert pipe.params["vae"]["decoder"]["norm_out"]["gamma"].dtype == jax.numpy.float32  # norms stay float32
    frames = _run(pipe, steps=2)
    assert np.isfinite(frames).all() and frames.shape == (9, 32, 48, 3)
    ref = _run(t2v, steps=2)
    db, err = psnr(frames, ref), max_abs(frames, ref)
    measured("optimization/dtypes/mixed_bf16_vs_float32/psnr_db", db, max_abs=err)
    assert err > 0 and db >= MIXED_PSNR_DB, (db, err)


def test_default_dtypes_close_to_float32(converted, t2v, measured):
    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"], dtype="bfloat16")  # the accelerators' default
    assert pipe.dtypes == Dtypes() == Dtypes.default("gpu")
    frames, ref = _run(pipe, steps=2), _run(t2v, steps=2)
    db, err = psnr(frames, ref), max_abs(frames, ref)
    measured("optimization/dtypes/default_bf16_vs_float32/psnr_db", db, max_abs=err)
    assert err > 0 and db >= DEFAULT_PSNR_DB, (db, err)


def test_dtypes_of_platform():
    """dtype=None: on CPU everything float32 with the weights upcast (XLA:CPU's bf16 dots are ~3.5x slower
    than float32); on GPU / TPU the bf16 defaults. "bfloat16" gives the bf16 defaults on every platform."""
    f32 = Dtypes("float32", "float32", "float32", "float32", "float32", "float32")
    bf16 = Dtypes("bfloat16", "bfloat16", "float32", "float32", None, None)
    assert Dtypes.default("cpu") == Dtypes.of(None, backend="cpu") == Dtypes.all("float32") == f32
    for backend in ("gpu", "tpu"):
        assert Dtypes.default(backend) == Dtypes.of(None, backend=backend) == Dtypes() == bf16
    assert Dtypes.of("bfloat16") == Dtypes.of("bfloat16", backend="cpu") == bf16
    assert Dtypes.of(None) == Dtypes.default() == (f32 if jax.default_backend() == "cpu" else bf16)
    assert Dtypes.of(None, backend="cpu", transformer="bfloat16") == Dtypes(
        "bfloat16", "float32", "float32", "float32", "float32", "float32")
    assert Dtypes.of(bf16, backend="cpu") == bf16  # a Dtypes is taken as is

def test_platform_default_dtypes(converted):
    """No dtype: the platform's (Dtypes.default). On CPU everything float32, the bf16 checkpoint's weights
    upcast once at load (norms were float32 already)."""
    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"])
    assert pipe.dtypes == Dtypes.default()
    if jax.default_backend() == "cpu":
        assert pipe.dtypes == Dtypes.all("float32")
        leaves = [a for c in ("transformer", "text_encoder", "vae") for a in jax.tree.leaves(pipe.params[c])]
        assert {str(a.dtype) for a in leaves} == {"float32"}


def test_weights_recast_equals_cast_at_use(converted, t2v, measured):
    """float32 compute on the bf16 checkpoint: weights recast once after restore (t2v, dtype="float32") give the
    same frames as bf16 weights cast where they are used (weights=None) -- bitwise, measured max abs 0."""
    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"], dtype=Dtypes("float32", "float32", "float32"))
    assert pipe.params["transformer"]["blocks"]["attn1"]["to_q"]["weight"].dtype == jax.numpy.bfloat16
    assert t2v.params["transformer"]["blocks"]["attn1"]["to_q"]["weight"].dtype == jax.numpy.float32
    frames, ref = _run(pipe, steps=2), _run(t2v, steps=2)
    measured("optimization/weights_recast_vs_cast_at_use/max_abs", max_abs(frames, ref))
    assert np.array_equal(frames, ref)


def test_warmup_compiles_everything(converted, tmp_path):
    pipe = WanPipeline.from_converted(converted["wan2.2-t2v-a14b"], compilation_cache=str(tmp_path / "cache"))
    pipe.warmup(32, 48, 9, output_type="np")
    assert pipe.compiled
    gen = _generate(pipe, steps=5, guidance_scale=6.0, guidance_scale_2=2.5)  # crosses the expert boundary
    assert gen.timings.compile == 0.0


def test_vae_precision_setting(t2v, measured):
    """--vae-precision: "default" lets float32 convs use the backend's default precision (TF32 on GPUs: the
    GPU default); on CPU that is full float32 too, so the frames are the same, from another executable."""
    from wan_runtime.pipeline import InputError

    assert t2v.vae_precision == ("default" if jax.default_backend() == "gpu" else "highest")
    highest = _run(t2v.replace(vae_precision="highest"), steps=2)
    default = _run(t2v.replace(vae_precision="default"), steps=2)
    decodes = [k for k in t2v._compiled if k[0] == "decode" and k[-1] in ("highest", "default")]
    assert {k[-1] for k in decodes} == {"highest", "default"}
    err = max_abs(default, highest)
    measured("optimization/vae_precision/default_vs_highest_cpu/max_abs", err)
    if jax.default_backend() == "cpu":
        assert err <= 1e-6, err  # measured 0 (XLA:CPU computes float32 convs in full float32 either way)
    with pytest.raises(InputError, match="--vae-precision"):
        t2v.replace(vae_precision="fast")


def test_cast_weights_in_slices(converted):
    """Recasting in slices gives the bits of one program; with ``consume`` the old leaves are freed slice by
    slice, so live device bytes stay within the larger of the old and new trees plus one slice's new
    leaves (without it they reach old + new)."""
    from wan_runtime import pipeline as P
    from wan_runtime.checkpoint import open_checkpoint, restore
    from wan_runtime.format import flatten

    ck = open_checkpoint(converted["wan2.1-t2v"])
    whole = flatten(P.cast_weights(restore(ck, ["transformer"])[0]["transformer"], "float32"))
    new_total = sum(a.nbytes for a in whole.values())
    real = P._cast_leaves

    def run(consume):
        tree = restore(ck, ["transformer"])[0]["transformer"]
        old = flatten(tree)
        old_total = sum(a.nbytes for a in old.values())
        base, over = sum(a.nbytes for a in jax.live_arrays()) - old_total, []

        def spy(leaves, todo):
            out = real(leaves, todo)
            jax.block_until_ready(out)
            live = sum(a.nbytes for a in jax.live_arrays()) - base
            over.append(live - (max(old_total, new_total) + sum(a.nbytes for a in out.values())))
            return out

        P._cast_leaves = spy
        try:
            # slice_bytes=1: one leaf a slice
            return old, flatten(P.cast_weights(tree, "float32", consume=consume, slice_bytes=1)), over
        finally:
            P._cast_leaves = real

    old, sliced, over = run(consume=True)
    assert len(over) > 3 and max(over) <= 0, over  # several slices, each within the bound
    assert all(np.array_equal(np.asarray(sliced[k]), np.asarray(whole[k])) for k in whole)
    assert all(a.is_deleted() for k, a in old.items() if a.dtype != sliced[k].dtype)
    _, _, kept = run(consume=False)  # the control: keeping the old leaves exceeds the bound
    assert max(kept) > 0, kept


def _device_bytes() -> int:
    """Bytes of every live buffer in device memory, over ``jax.live_arrays()`` (host-memory copies of
    offloaded weights excluded; a buffer counted once: an array assembled from per-device arrays, as
    restore makes them, is listed along with its parts)."""
    gc.collect()
    kind, buffers = jax.devices()[0].default_memory().kind, {}
    for a in jax.live_arrays():
        if a.sharding.memory_kind in (kind, None):
            for s in a.addressable_shards:
                buffers[(s.device.id, s.data.unsafe_buffer_pointer())] = s.data.nbytes
    return sum(buffers.values())


def _probe(pipe, steps=4):
    """Run a generation; per step (inside the denoise stage), the bytes on the device."""
    seen = {}
    gen = _generate(pipe, steps, progress=lambda i: seen.setdefault(i, _device_bytes()))
    return gen, seen


@pytest.mark.parametrize("mode,away", [("encoders", ("text_encoder",)), ("experts", ("other expert",)),
                                       ("all", ("text_encoder", "other expert"))])
def test_offload_frees_device_memory_and_keeps_output_bitwise(mode, away, a14b, measured):
    """During each denoise step, the device holds exactly the offloaded weights' bytes less than with
    --offload none (counted over ``jax.live_arrays()``: the encoders after the conditioning, the inactive
    Wan 2.2 expert in each phase), and the output is bitwise the same."""
    base = a14b.replace(offload="none")
    _probe(base)  # compiles; the baseline below runs with every component back on the device
    ref, ref_bytes = _probe(base)
    ref = np.array(ref.frames), np.array(ref.latents)  # copies: on CPU the frames alias a device buffer
    pipe = a14b.replace(offload=mode)
    old_text = jax.tree.leaves(pipe.params["text_encoder"])  # held here: freed only if really deleted
    gen, got = _probe(pipe)
    sizes = {c: sum(a.nbytes for a in jax.tree.leaves(t)) for c, t in a14b.params.trees().items()}
    expected = sum(sizes["transformer"] if c == "other expert" else sizes[c] for c in away)  # experts: same size
    freed = {i: ref_bytes[i] - got[i] for i in ref_bytes}
    measured(f"optimization/offload_{mode}/freed_bytes_per_step", float(min(freed.values())), expected=expected)
    assert all(f == expected for f in freed.values()), (freed, expected)
    assert ("text_encoder" in away) == all(a.is_deleted() for a in old_text)
    assert np.array_equal(gen.frames, ref[0]) and np.array_equal(gen.latents, ref[1])
    assert set(pipe.params.resident) == set(a14b.params) - {c for c in ("text_encoder", "transformer")
                                                              if c in pipe.moved}


def test_offload_modes_resolve(a14b, t2v):
    assert a14b.replace(offload="auto").offload == "none"  # CPU: host and device memory are one
    assert t2v.replace(offload="experts").moved == frozenset()  # one transformer: nothing to swap
    assert a14b.replace(offload="all").moved == {"text_encoder", "transformer", "transformer_2"}
    with pytest.raises(InputError, match="--offload"):
        a14b.replace(offload="some")
