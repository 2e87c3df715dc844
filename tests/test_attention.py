"""Attention kernels, key-padding masks, and token padding of the transformer (results must not change)."""
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from wan_runtime.models import attention as A
from wan_runtime.models import transformer as T

from tests import test_transformer as _tt

ROOT = pathlib.Path(__file__).resolve().parents[1]
forward = jax.jit(T.forward, static_argnames=("cfg", "dtype", "pad_to"))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def padded_qkv(lengths, sq, sk, heads, dh, seed=0):
    """q (B, sq, H, Dh), k/v (B, sk, H, Dh) with huge garbage past each row's real length, key_mask (B, sk)."""
    r = np.random.default_rng(seed)
    q, k, v = (r.standard_normal((len(lengths), s, heads, dh), dtype=np.float32) for s in (sq, sk, sk))
    key_mask = np.arange(sk)[None] < np.array(lengths)[:, None]
    k[~key_mask] *= 1e3
    v[~key_mask] *= 1e3
    return q, k, v, key_mask


def per_row_reference(q, k, v, lengths):
    """Attention of each batch row on its unpadded keys only."""
    return np.concatenate([A.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]) for b, n in enumerate(lengths)])


def test_key_mask_equals_unpadded(measured):
    lengths = [13, 6]
    q, k, v, km = padded_qkv(lengths, 9, 16, 3, 8)
    out = jax.jit(A.attention)(q, k, v, key_mask=km)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    err = rel(out, per_row_reference(q, k, v, lengths))
    measured("component/attention/key_mask_vs_unpadded/rel_l2", err)
    assert err <= 1e-6, err  # measured 8.2e-8
    # self-attention with padded queries: the real rows are unchanged, padded rows finite
    x, _, _, km = padded_qkv([11], 16, 16, 2, 8, seed=1)
    out = np.asarray(A.attention(x, x, x, key_mask=km))
    err = rel(out[:, :11], A.attention(x[:, :11], x[:, :11], x[:, :11]))
    measured("component/attention/padded_queries_vs_unpadded/rel_l2", err)
    assert np.isfinite(out).all() and err <= 1e-6, err  # measured 6.4e-8


def test_splash_kernel_interpret_mode(measured):
    """The TPU splash path, run by the Pallas interpreter on CPU (kernel logic only, not hardware)."""
    pytest.importorskip(A._SPLASH)
    lengths = [200, 131]
    q, k, v, km = padded_qkv(lengths, 256, 256, 2, 128, seed=2)
    out = A.splash_attention(q, k, v, km, interpret=True)
    errs = {"splash_key_mask": rel(out, per_row_reference(q, k, v, lengths))}
    assert out.shape == q.shape
    q, k, v, _ = padded_qkv([256, 256], 256, 256, 2, 128, seed=3)  # no key_mask (and no garbage keys)
    errs["splash_no_mask"] = rel(A.splash_attention(q, k, v, interpret=True), A.attention(q, k, v))
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out = A.splash_attention(qb, kb, vb, interpret=True)
    for case, err in errs.items():
        measured(f"component/attention/{case}/rel_l2", err)
    errs["splash_bf16"] = rel(out.astype(jnp.float32), A.attention(q, k, v))
    errs["xla_bf16"] = rel(A.attention(qb, kb, vb).astype(jnp.float32), A.attention(q, k, v))
    measured("bf16/component/attention/splash_rel_l2", errs["splash_bf16"])
    measured("bf16/component/attention/xla_rel_l2", errs["xla_bf16"])
    # measured 5.1e-7 / 6.8e-7: splash's blockwise (online) softmax and XLA's one-pass softmax are each ~4.8e-7
    # from a float64 reference at 256 keys x head dim 128, and their errors add; 1e-5 is 15x that
    assert errs["splash_key_mask"] <= 1e-5 and errs["splash_no_mask"] <= 1e-5, errs
    # bf16 inputs: measured 3.66e-3 for splash and 3.67e-3 for XLA's attention on the same bf16 inputs (bf16
    # rounding, 2^-8 = 3.9e-3, dominates both), so the bound is a ratio to XLA's error in this run
    assert out.dtype == jnp.bfloat16 and errs["splash_bf16"] <= 1.5 * errs["xla_bf16"], errs


def test_backend_selection_cpu():
    if jax.default_backend() == "cpu":
        assert A.preferred_multiple() == 1
    assert A.preferred_multiple("cpu") == 1 and A.preferred_multiple("tpu") == 128 and A.preferred_multiple("gpu") == 128
    q = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
    assert A.select_implementation(q, q, backend="cpu") == "blocked"
    assert A.select_implementation(q.astype(jnp.float32), q, backend="cpu") == "blocked"
    assert A.select_implementation(q.astype(jnp.float32), q, backend="gpu") == "blocked"
    assert A.select_implementation(q, q, backend="gpu", cudnn=True) == "cudnn"
    assert A.select_implementation(q, q, backend="gpu", cudnn=False) == "blocked"  # ROCm, or before Ampere
    assert A.select_implementation(q, q, jnp.ones((1, 1, 128, 128), bool), backend="gpu", cudnn=True) == "xla"
    if jax.default_backend() == "cpu":
        assert not A.cudnn_usable() and A.select_implementation(q, q, backend="gpu") == "blocked"
    assert A.select_implementation(q[:, :100], q, backend="tpu") == "blocked"  # not a multiple of 128
    if jax.default_backend() == "cpu":
        assert A.select_implementation(q, q) == "blocked"


@pytest.mark.parametrize("seq_len, tpu", [
    (32760, 512),   # 480p x 81 frames: +8 tokens
    (75600, 512),   # 720p x 81 frames: +176 (0.2%); 128 would give 75,648 = 2^7 x 591, 128-tiles only
    (27280, 512),   # TI2V 5B 704 x 1280 x 121 frames: +368 (1.3%)
    (512, 512), (1024, 512),
    (640, 128),     # 512 would add 384 (60%)
    (4400, 128),    # 512 would add 208 (4.7%, over 1/32); 128 adds 80
    (100, 128), (0, 128), (None, 128),
])
def test_preferred_multiple_per_sequence(seq_len, tpu):
    """TPU: splash's 512-tiles when padding to 512 adds <= 1/32 of the tokens, else 128; GPU 128; CPU 1."""
    assert A.preferred_multiple("tpu", seq_len) == tpu
    assert A.preferred_multiple("gpu", seq_len) == 128 and A.preferred_multiple("cpu", seq_len) == 1
    if tpu == 512 and seq_len:
        assert (-seq_len % 512) * A.PAD_FRACTION <= seq_len
    elif seq_len:
        assert (-seq_len % 512) * A.PAD_FRACTION > seq_len


def test_tpu_selection_falls_back_without_splash(monkeypatch):
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    if A._splash_module() is not None:
        assert A.select_implementation(q, q, backend="tpu") == "splash"
    monkeypatch.setitem(sys.modules, A._SPLASH, None)  # makes the import raise ImportError
    assert A._splash_module() is None
    assert A.select_implementation(q, q, backend="tpu") == "blocked"  # the memory-bounded fallback


# ------------------------------------------------------------------------------------------
# transformer token padding
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def model(cin, cout):
    """The perturbed tiny diffusers transformer and its runtime params (shared with test_transformer)."""
    return _tt.model(cin, cout)


oracle = _tt.oracle


def test_padding_does_not_change_forward(measured):
    m, params, cfg = model(16, 16)
    r = np.random.default_rng(4)
    x = r.standard_normal((2, 16, 3, 6, 10), dtype=np.float32)  # S = 3 * 3 * 5 = 45 tokens
    txt = r.standard_normal((2, 8, 32), dtype=np.float32)
    t = np.array([999, 250], np.int64)
    ref = forward(params, cfg, x, t, txt, pad_to=1)
    err = rel(ref, oracle(m, x, t, txt))
    measured("component/transformer/pad_to1_t2v/rel_l2", err)
    assert err <= _tt.TOL, err  # measured 3.4e-7
    for pad_to in (7, 64):
        out = forward(params, cfg, x, t, txt, pad_to=pad_to)
        err = rel(out, ref)
        measured(f"optimization/attention_padding/pad_to{pad_to}_vs_unpadded/rel_l2", err)
        # measured 0 (bitwise) for both; padded keys get exactly zero weight, but XLA may reduce the longer
        # sequence axis in another order (the per-token case below measures 1.1e-7), so float32 rounding is allowed
        assert np.isfinite(np.asarray(out)).all() and err <= 1e-6, (pad_to, err)
    # pad_to=1 adds no ops; 64 pads
    args = (params, T.rope_tables(cfg, (3, 3, 5)), jnp.zeros((2, 45, cfg.dim)), jnp.zeros((2, 6, cfg.dim)))
    kv = T.cross_kv(params, cfg, jnp.zeros((2, 8, cfg.dim)))
    jaxpr = {p: str(jax.make_jaxpr(lambda pr, rope, h, tp: T.run_blocks(pr, h, tp, rope, kv, cfg, jnp.float32,
                                                                        pad_to=p))(*args)) for p in (1, 64)}
    assert " pad[" not in jaxpr[1] and " pad[" in jaxpr[64]


def test_padding_per_token_timesteps(measured):
    m, params, cfg = model(48, 48)
    r = np.random.default_rng(5)
    x = r.standard_normal((1, 48, 3, 4, 6), dtype=np.float32)  # S = 3 * 2 * 3 = 18 tokens
    txt = r.standard_normal((1, 8, 32), dtype=np.float32)
    t = r.integers(0, 1000, (1, 18)).astype(np.int64)
    t[:, :6] = 0  # clean first latent frame (TI2V)
    ref = forward(params, cfg, x, t, txt, pad_to=1)
    err = rel(ref, oracle(m, x, t, txt))
    measured("component/transformer/pad_to1_per_token_timesteps/rel_l2", err)
    assert err <= _tt.TOL, err  # measured 3.2e-7
    err = rel(forward(params, cfg, x, t, txt, pad_to=64), ref)
    measured("optimization/attention_padding/pad_to64_vs_unpadded_per_token_timesteps/rel_l2", err)
    assert err <= 1e-6, err  # measured 1.1e-7


# ------------------------------------------------------------------ the memory-bounded fallback
@pytest.mark.parametrize("b,sq,sk,block", [(2, 37, 53, 8), (1, 100, 100, 512), (2, 64, 70, 16), (1, 9, 300, 64)])
def test_blocked_equals_plain_attention(b, sq, sk, block, measured):
    """Online softmax over key blocks, queries in blocks (odd lengths: padded blocks; a key mask; a single
    block) == the plain formula, float32."""
    rng = np.random.default_rng(sq + sk)
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, 3, 16)), jnp.float32) for s in (sq, sk, sk))
    km = jnp.asarray(np.arange(sk)[None, :] < np.array([[sk - 5], [sk - 11]])[:b])
    for mask in (None, km):
        ref = A.attention(q, k, v, key_mask=mask, implementation="xla")
        got = A.blocked_attention(q, k, v, mask, block_q=block, block_k=block)
        err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
        measured(f"component/attention/blocked_vs_plain/b{b}q{sq}k{sk}blk{block}{'_mask' if mask is not None else ''}"
                 "/rel_max", err)
        assert err <= 1e-6, err  # measured 1.5e-7 to 4.1e-7 (the bound: 1e-6 relative)
    out, lse = A.blocked_attention(q, k, v, km, block_q=block, block_k=block, return_lse=True)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / 4.0
    want = jax.nn.logsumexp(jnp.where(km[:, None, None, :], logits, -jnp.inf), axis=-1)
    assert float(jnp.abs(lse - want).max()) <= 1e-5  # measured ~1e-6 (log-sum-exp of logits ~ 10)


def test_blocked_attention_memory_is_bounded(measured):
    """XLA's memory analysis of float32 attention at B=1, H=12, S=32,768, Dh=128: the plain formula needs
    96 GiB of temporaries (the S x S scores); the fallback needs < 4 GiB (measured 0.60 GiB)."""
    x = jax.ShapeDtypeStruct((1, 32768, 12, 128), jnp.float32)
    temp = jax.jit(lambda q, k, v: A.attention(q, k, v)).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    assert A.select_implementation(x, x, backend="cpu") == "blocked"
    measured("optimization/attention_memory/float32_b1_h12_s32768_temp_gib", temp / 2**30)
    assert temp < 4 * 2**30, temp / 2**30


def test_merge_partial_results():
    """Attention over two halves of the keys, merged by their log-sum-exp == attention over all keys; a
    half whose keys are all masked adds nothing."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, s, 2, 8)), jnp.float32) for s in (10, 30, 30))
    full = A.blocked_attention(q, k, v)
    a = A.blocked_attention(q, k[:, :12], v[:, :12], return_lse=True, out_dtype=jnp.float32)
    b = A.blocked_attention(q, k[:, 12:], v[:, 12:], return_lse=True, out_dtype=jnp.float32)
    assert float(jnp.abs(A.merge_partial(*a, *b)[0] - full).max()) <= 1e-6  # measured ~1e-7
    none = A.blocked_attention(q, k[:, 12:], v[:, 12:], jnp.zeros((1, 18), bool), return_lse=True)
    merged, _ = A.merge_partial(*a, *none)
    assert float(jnp.abs(merged - a[0]).max()) == 0.0
