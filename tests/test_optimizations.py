"""Each inference optimization leaves the output unchanged (bitwise where the arithmetic is identical)."""
import jax
import numpy as np
import pytest

from wan_runtime.pipeline import Dtypes, WanPipeline

KW = dict(height=32, width=48, num_frames=9, guidance_scale=4.0, seed=3)


def _run(pipe, steps=3, **kw):
    return pipe("a red fox runs through fresh snow", "blurry", num_inference_steps=steps, **{**KW, **kw})


@pytest.fixture(scope="module")
def t2v(converted):
    return WanPipeline.from_converted(converted["wan2.1-t2v"], dtype="float32")


@pytest.fixture(scope="module")
def a14b(converted):
    return WanPipeline.from_converted(converted["wan2.2-t2v-a14b"], dtype="float32")


def _denoise_executables(pipe):
    return [k for k in pipe._compiled if k[0] == "denoise"]


@pytest.mark.parametrize("which", ["t2v", "a14b"])
def test_one_loop_equals_per_step_calls_bitwise(which, request):
    """The whole loop in one call == the same loop body called once per step from Python (and, for
    Wan 2.2, across the expert boundary)."""
    pipe = request.getfixturevalue(which)
    pipe.steps_per_call = None
    whole = _run(pipe, steps=4)
    pipe.steps_per_call = 1
    stepped = _run(pipe, steps=4)
    pipe.steps_per_call = 3  # uneven chunks: 3 + 1
    chunked = _run(pipe, steps=4)
    pipe.steps_per_call = None
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


def test_kv_cache_on_off(t2v):
    t2v.kv_cache = True
    on = _run(t2v)
    t2v.kv_cache = False
    try:
        off = _run(t2v)
    finally:
        t2v.kv_cache = True
    # Same projections; XLA may fuse the in-loop einsum differently, so allow float32 rounding only.
    assert np.abs(on - off).max() <= 1e-6


def test_uint8_on_device_equals_rounded_float_frames(t2v):
    f = _run(t2v)
    u = _run(t2v, output_type="uint8")
    assert u.dtype == np.uint8 and u.shape == f.shape
    assert np.array_equal(u, np.round(f * 255.0).astype(np.uint8))


def test_dtype_settings(converted):
    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"],
                                      dtype=Dtypes(transformer="bfloat16", text_encoder="float32", vae="bfloat16",
                                                   weights="float32", vae_weights="bfloat16"))
    w = pipe.params["transformer"]["blocks"]["attn1"]["to_q"]["weight"]
    assert w.dtype == jax.numpy.float32  # bf16 checkpoint recast
    assert pipe.params["vae"]["decoder"]["conv_in"]["weight"].dtype == jax.numpy.bfloat16
    assert pipe.params["vae"]["decoder"]["norm_out"]["gamma"].dtype == jax.numpy.float32  # norms stay float32
    frames = _run(pipe, steps=2)
    assert np.isfinite(frames).all() and frames.shape == (9, 32, 48, 3)


def test_warmup_compiles_everything(converted, tmp_path):
    pipe = WanPipeline.from_converted(converted["wan2.2-t2v-a14b"], compilation_cache=str(tmp_path / "cache"))
    pipe.warmup(32, 48, 9, output_type="np")
    assert pipe.timings.compile > 0
    _run(pipe, steps=5, guidance_scale=6.0, guidance_scale_2=2.5)  # crosses the expert boundary
    assert pipe.timings.compile == 0.0
