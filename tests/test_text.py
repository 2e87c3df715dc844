"""Text path: tokenizer vs transformers, UMT5 encoder vs transformers, prompt embeddings vs diffusers."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_prompt_clean
from wan_convert.mapping import tree_from_state_dict

from wan_runtime import format as fmt
from wan_runtime import text
from wan_runtime.models import umt5

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 5e-6  # float32 UMT5 vs transformers, relative L2: measured 3.1e-7 (encoder), 3.3e-7 (encode_prompt)

PROMPTS = [
    "A cat and a dog baking a cake together in a kitchen.",
    "  Waves   crash\ton a rocky beach &amp; a purple sky\n",
    "Un café à Paris, 日本の桜, ☃ &lt;snow&gt; — “quotes”",
    "",
    "A red fox runs through fresh snow in a quiet forest at dawn, " * 6,  # > 16 tokens: truncated
]
NEGATIVE = ["blurred details, worst quality", "", "ugly &amp;amp; deformed", "static", "low quality"]


def _tools():
    import make_tiny_checkpoint  # tools/ is on sys.path (conftest.py)

    return make_tiny_checkpoint


from tests.test_transformer import rel as rel_err  # noqa: E402


@pytest.fixture(scope="module")
def tools():
    return _tools()


@pytest.fixture(scope="module")
def tokenizers(tools, tmp_path_factory):
    """(transformers PreTrainedTokenizerFast, our Tokenizer loaded from its saved tokenizer.json)."""
    hf = tools.build_tokenizer()
    folder = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(folder)
    return hf, text.Tokenizer.from_file(folder / "tokenizer.json")


@pytest.fixture(scope="module")
def encoder(tools):
    """(torch UMT5EncoderModel with perturbed 1-D params, runtime params, UMT5Config)."""
    torch.manual_seed(0)
    model = tools.build_text_encoder()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    config = model.config.to_dict()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, tree_from_state_dict("text_encoder", sd, config, "float32"))
    return model, params, umt5.UMT5Config.from_config(config)


def test_prompt_clean_matches_diffusers():
    cases = PROMPTS + NEGATIVE + [
        "&amp;amp;lt;b&amp;gt;", "a\u00a0b\u3000c\u2009d\u200be", "x\x1cy\x1f z", "\n\t  \r", "tab\tand\x85nel",
    ]
    for s in cases:
        assert text.prompt_clean(s) == diffusers_prompt_clean(s), repr(s)


@pytest.mark.parametrize("max_length", [16, 512])
def test_tokenize_matches_transformers(tokenizers, max_length):
    hf, ours = tokenizers
    prompts = PROMPTS + NEGATIVE + ["  extra   spaces  ", "tiny &amp; html"]
    ref = hf(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
             return_attention_mask=True)
    ids, mask, truncated = ours.tokenize(prompts, max_length, return_truncated=True)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(prompts), max_length)
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))
    full = [len(x) for x in hf(prompts, add_special_tokens=True)["input_ids"]]
    np.testing.assert_array_equal(truncated, np.array(full) > max_length)
    assert truncated.any() == (max_length == 16)


def test_relative_position_buckets(encoder):
    model, _, cfg = encoder
    attn = model.encoder.block[0].layer[0].SelfAttention
    S = 600  # covers the 512-token prompts and every log bucket up to max_distance and beyond
    rel = torch.arange(S)[None, :] - torch.arange(S)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(umt5.relative_position_buckets(S, S, cfg.num_buckets, cfg.max_distance), ref)


def test_encoder_matches_transformers(encoder, tmp_path, measured):
    model, params, cfg = encoder
    rng = np.random.default_rng(0)
    B, S = 3, 16
    ids = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
    mask = (np.arange(S)[None] < np.array([S, 9, 1])[:, None]).astype(np.int32)
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).last_hidden_state.numpy()
    enc = jax.jit(umt5.encode, static_argnames=("cfg", "dtype"))
    out = enc(params, cfg, ids, mask, dtype=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (B, S, cfg.d_model)
    err = rel_err(out, ref)
    measured("component/umt5/rel_l2", err)
    assert err <= RTOL, err
    # The default bf16 path (bf16 weights, bf16 compute) is no further from the float32 oracle than transformers'
    # own bf16 model (from_pretrained(torch_dtype=bfloat16)): measured 6.7e-3 vs 8.0e-3 (ratio 0.83). bf16
    # rounding (2^-8 = 3.9e-3 per op) dominates both, so the bound is a ratio to the reference's error in this run.
    params16 = jax.tree.map(jnp.asarray, tree_from_state_dict(
        "text_encoder", {k: v.detach().numpy() for k, v in model.state_dict().items()}, model.config.to_dict(),
        "bfloat16"))
    out16 = enc(params16, cfg, ids, mask, dtype=jnp.bfloat16)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ref16 = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)(
            torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).last_hidden_state.float().numpy()
    ours, theirs = rel_err(out16, ref), rel_err(ref16, ref)
    measured("bf16/component/umt5/rel_l2", ours)
    measured("bf16/component/umt5/transformers_rel_l2", theirs)
    assert out16.dtype == jnp.float32 and ours <= 1.5 * theirs, (ours, theirs)


def test_encode_prompts_matches_diffusers(tools, tokenizers, encoder, measured):
    hf, ours = tokenizers
    model, params, cfg = encoder
    pipe = WanPipeline(tokenizer=hf, text_encoder=model, vae=tools.build_vae(False), transformer=None,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0))
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(PROMPTS, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=16,
                                      device="cpu")
    emb, counts, truncated = text.encode_prompts(params, cfg, ours, PROMPTS + NEGATIVE, max_length=16)
    n = len(PROMPTS)
    assert emb.shape == (2 * n, 16, cfg.d_model) and emb.dtype == jnp.float32
    for which, got, ref in (("positive", emb[:n], pos.numpy()), ("negative", emb[n:], neg.numpy())):
        err = rel_err(got, ref)
        measured(f"component/umt5/encode_prompt_{which}/rel_l2", err)
        assert err <= RTOL, (which, err)
        np.testing.assert_array_equal(np.asarray(got) == 0, ref == 0)  # same zeroed tail
    cleaned = [text.prompt_clean(p) for p in PROMPTS + NEGATIVE]
    full = np.array([len(x) for x in hf(cleaned, add_special_tokens=True)["input_ids"]])
    np.testing.assert_array_equal(counts, np.minimum(full, 16))
    np.testing.assert_array_equal(truncated, full > 16)
    assert truncated.any() and not truncated.all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the pipeline's default text-encoder dtype
def test_batched_equals_separate(tokenizers, encoder, dtype):
    _, ours = tokenizers
    _, params, cfg = encoder
    enc = functools.partial(text.encode_prompts, params, cfg, ours, max_length=16, dtype=jnp.dtype(dtype))
    both, pos, neg = (np.asarray(enc(p)[0]) for p in (PROMPTS + NEGATIVE, PROMPTS, NEGATIVE))
    assert np.array_equal(both, np.concatenate([pos, neg]))


def test_eval_shape_umt5_xxl():
    config = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
    cfg = umt5.UMT5Config.from_config(config)
    params = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, fmt.np_dtype(l.dtype)),
                          fmt.text_encoder_tree(config, "bfloat16"), is_leaf=lambda x: isinstance(x, fmt.Leaf))
    ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    out = jax.eval_shape(functools.partial(umt5.encode, cfg=cfg, dtype=jnp.bfloat16), params, input_ids=ids,
                         attention_mask=ids)
    assert out.shape == (2, 512, 4096) and out.dtype == jnp.float32
