"""Write tiny, random-weight, diffusers-format Wan repositories (FP32 safetensors).

Every component is built with diffusers' / transformers' own classes and written with
``save_pretrained``, so the result is exactly what a published repository looks like, only small.
The tokenizer is a Unigram model trained offline with the ``tokenizers`` library on a small built-in
corpus (T5 layout: <pad>=0, </s>=1, <unk>=2, an ``</s>`` post-processor).

    python tools/make_tiny_checkpoint.py OUTDIR [--family wan2.1-t2v ...] [--seed 0]

Families: every one of ``wan_runtime.families`` (VACE ones: ``WanVACETransformer3DModel`` with one more
block than the others and VACE blocks after every second one, e.g. vace_layers (0, 2) of 3 blocks).
The transformer(s) are always saved as at least two shard files with an index.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "runtime") not in sys.path:
    sys.path.insert(0, str(ROOT / "runtime"))
from wan_runtime import families  # noqa: E402  (JAX-free: the one registry of Wan families)

FAMILIES = families.NAMES

# Text encoder width == transformer text_dim.
VOCAB_SIZE = 384

#: model sizes: "tiny" (tests, the bundled demo), "tiny8" and "small" (benchmarks: big enough that compute,
#: not dispatch, dominates; ~50M transformer params). The tiny VAE has base_dim 8, not less: the Wan 2.1
#: decoder's upsampling halves the channels, and at base_dim 3 one channel is left, whose RMS norm keeps
#: only the sign, so decoded frames barely responded to the latents (a 0.01 latent change moved them
#: 1e-5, which made whole-pipeline frame comparisons blind to guidance); at 8 they move ~5e-3.
SIZES = {
    "tiny": dict(heads=2, head_dim=12, layers=2, ffn=32, text_dim=32, t5_layers=2, t5_ff=48, t5_heads=4, t5_kv=8,
                 vae_base=8),
    # tiny with 8 heads: context-parallel tests (Ulysses splits the heads over up to 8 devices)
    "tiny8": dict(heads=8, head_dim=12, layers=2, ffn=32, text_dim=32, t5_layers=2, t5_ff=48, t5_heads=4, t5_kv=8,
                  vae_base=8),
    "small": dict(heads=8, head_dim=64, layers=8, ffn=2048, text_dim=256, t5_layers=4, t5_ff=512, t5_heads=4,
                  t5_kv=64, vae_base=16),
}
_SIZE = dict(SIZES["tiny"])

_CORPUS = """
A cat and a dog baking a cake together in a kitchen. The cat is carefully measuring flour, while the
dog is stirring the batter with a wooden spoon. The kitchen is cozy, with sunlight streaming through
the window. A red fox runs through fresh snow in a quiet forest at dawn. Waves crash on a rocky beach
under a purple sky. A small robot walks along a busy city street at night, neon lights reflecting in
puddles. An astronaut rides a horse on the moon. Slow motion close-up of a hummingbird drinking from a
flower. Aerial view of green mountains, rivers and clouds. Bright tones, overexposed, static, blurred
details, subtitles, style, works, paintings, images, static, overall gray, worst quality, low quality,
JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn faces,
deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three legs,
many people in the background, walking backwards. 0 1 2 3 4 5 6 7 8 9 the of and to in is was for on
with as by at from that this are be it an or which one all you we they he she his her their there
""".split("\n")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(r"\s+", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,-'!?"),
        shrinking_factor=0.75,
    )
    tok.train_from_iterator([line for line in _CORPUS if line.strip()] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    z = _SIZE
    cfg = UMT5Config(
        vocab_size=VOCAB_SIZE, d_model=z["text_dim"], d_kv=z["t5_kv"], d_ff=z["t5_ff"], num_layers=z["t5_layers"],
        num_heads=z["t5_heads"],
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg).eval()


#: VACE control channels: VAE latents of the inactive and reactive video (2 x 16) + the mask packed 8 x 8
VACE_IN_CHANNELS = 96


def build_transformer(in_channels: int, out_channels: int, image_dim: int | None = None, vace: bool = False):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    z = _SIZE
    heads, head_dim = z["heads"], z["head_dim"]
    kw = dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=out_channels, text_dim=z["text_dim"], freq_dim=256,
        ffn_dim=z["ffn"], num_layers=z["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        image_dim=image_dim, added_kv_proj_dim=heads * head_dim if image_dim else None,
        rope_max_seq_len=32,
    )
    if not vace:
        return WanTransformer3DModel(**kw).eval()
    layers = z["layers"] + 1  # a block without a hint between two with one
    return WanVACETransformer3DModel(**dict(kw, num_layers=layers), vace_layers=list(range(0, layers, 2)),
                                     vace_in_channels=VACE_IN_CHANNELS).eval()


def build_vae(wan22: bool):
    from diffusers import AutoencoderKLWan

    if wan22:
        return AutoencoderKLWan(
            base_dim=_SIZE["vae_base"], z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_spatial=16, scale_factor_temporal=4,
        ).eval()
    return AutoencoderKLWan(
        base_dim=_SIZE["vae_base"], z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def build_clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1,
    )).eval()
    return enc, CLIPImageProcessor(crop_size=32, size=32)


def perturb(module, generator) -> None:
    """Give every weight a non-trivial value: some diffusers inits are zeros/ones (norm scales, gammas,
    scale_shift_table, biases), which would make parity tests blind to those parameters."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1 or "scale_shift_table" in name or "gamma" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def converted(workdir: pathlib.Path, size: str = "small", family: str = "wan2.1-t2v") -> pathlib.Path:
    """A random diffusers repo of this size, written once under workdir and converted (bf16): for benchmarks."""
    from wan_convert.convert import convert

    src, ck = workdir / f"src-{size}", workdir / f"ck-{size}"
    if not (src / "model_index.json").exists():
        write(family, src, size=size)
    if not (ck / "manifest.json").exists():
        convert(str(src), ck, force=True)
    return ck


def build_pipeline(family: str, seed: int = 0):
    import torch
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanVACEPipeline

    fam = families.get(family)
    torch.manual_seed(seed)
    i2v = fam.image_mode == "concat"  # (TI2V is not one: it conditions by first-frame latents)
    ti2v = fam.image_mode == "expand"
    two_experts = fam.experts == 2
    in_ch, out_ch = (36, 16) if i2v else ((48, 48) if ti2v else (16, 16))
    kwargs = dict(
        tokenizer=build_tokenizer(),
        text_encoder=build_text_encoder(),
        vae=build_vae(ti2v),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
            flow_shift=5.0 if ti2v else 3.0,
        ),
        transformer=build_transformer(in_ch, out_ch, image_dim=4 if fam.clip else None, vace=fam.vace),
    )
    if two_experts:
        kwargs["transformer_2"] = build_transformer(in_ch, out_ch, vace=fam.vace)
        kwargs["boundary_ratio"] = 0.9 if i2v else 0.875
    if ti2v:
        kwargs["expand_timesteps"] = True
    if fam.clip:
        kwargs["image_encoder"], kwargs["image_processor"] = build_clip()
    cls = WanVACEPipeline if fam.vace else WanImageToVideoPipeline if i2v else WanPipeline
    gen = torch.Generator().manual_seed(seed + 1)
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "image_encoder"):
        if kwargs.get(name) is not None:
            perturb(kwargs[name], gen)
    return cls(**kwargs)


def write(family: str, out: pathlib.Path, seed: int = 0, size: str = "tiny") -> pathlib.Path:
    _SIZE.clear()
    _SIZE.update(SIZES[size])
    try:
        pipe = build_pipeline(family, seed)
    finally:
        _SIZE.clear()
        _SIZE.update(SIZES["tiny"])
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # Re-save the transformers as two shards with an index, as the published repos are.
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        folder = out / name
        for f in folder.glob("diffusion_pytorch_model*.safetensors*"):
            f.unlink()
        total = sum(p.numel() * p.element_size() for p in module.parameters())
        module.save_pretrained(folder, safe_serialization=True, max_shard_size=max(total // 2 + 1, 1))
        if not (folder / "diffusion_pytorch_model.safetensors.index.json").exists():
            raise RuntimeError(f"{folder}: expected a sharded save")
    (out / "wan_jax_tiny.json").write_text(json.dumps({"family": family, "seed": seed, "size": size}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=pathlib.Path, help="folder; one sub-folder per family is written")
    ap.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flat", action="store_true", help="write a single family directly into OUTDIR")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = ap.parse_args(argv)
    families = args.family or list(FAMILIES)
    if args.flat and len(families) != 1:
        ap.error("--flat needs exactly one --family")
    for fam in families:
        path = args.outdir if args.flat else args.outdir / fam
        write(fam, path, args.seed, args.size)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{fam}: {path} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
