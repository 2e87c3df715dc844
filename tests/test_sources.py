"""Sources other than diffusers repositories (wan_convert.original): a ComfyUI-style single file and an
original Wan-AI folder, written here from a tiny diffusers repository with its names converted back (the
inversion checked against diffusers' own conversion), convert to checkpoints bit-for-bit equal to
converting the repository; the published sizes are told from full-size shapes (meta tensors, no
weights); bad inputs are one-line errors, exit 2, nothing written."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FAMILIES
from wan_convert import original
from wan_convert.convert import convert
from wan_convert.source import SourceError, SourceOptions, resolve
from wan_convert.verify import verify
from wan_runtime import configs as cfgs
from wan_runtime import format as fmt
from wan_runtime import names

torch = pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]
T2V, I2V, T2V_A14B, I2V_A14B, TI2V = (next(f for f in FAMILIES if f.startswith(p)) for p in
                                      ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v", "wan2.2-i2v", "wan2.2-ti2v"))


# ---------------------------------------------------------------- names, back to the original ones
def invert(table, name: str) -> str | None:
    """The original name of diffusers' ``name`` under a ``(original, diffusers)`` prefix table."""
    for src, dst in table:
        m = re.match(re.escape(dst).replace(re.escape("{L}"), r"(?P<L>\d+)"), name)
        if m:
            head = src.replace("{L}", m.group("L")) if "{L}" in dst else src
            return head + name[m.end():]
    return None


def to_original(sd: dict, table) -> dict:
    out = {}
    for k, v in sd.items():
        new = invert(table, k)
        assert new is not None, k
        out[new] = v
    return out


def vae_table(cfg: dict):
    return names.original_vae(len(cfg["dim_mult"]), cfg["num_res_blocks"], bool(cfg.get("is_residual")))


def clip_to_original(sd: dict) -> dict:
    """transformers' CLIPVisionModelWithProjection -> Wan's XLMRobertaCLIP (vision tower: q, k, v fused into
    to_qkv; a text-tower tensor and the temperature that conversion drops)."""
    out, (fused, targets) = {}, names.ORIGINAL_CLIP_FUSED[0]
    for k, v in sd.items():
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(\w+)", k)
        if m:
            parts = [sd[t.replace("{L}", m.group(1)) + m.group(2)] for t in targets]
            out[fused.replace("{L}", m.group(1)) + m.group(2)] = torch.cat(parts)
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        elif k == "visual_projection.weight":
            out["visual.head"] = v.T.contiguous()
        elif k == "vision_model.post_layernorm.weight" or k == "vision_model.post_layernorm.bias":
            out["visual.post_norm." + k.rsplit(".", 1)[1]] = v
        else:
            new = invert(names.ORIGINAL_CLIP, k)
            assert new is not None, k
            shape = {"visual.cls_embedding": (1, 1, -1), "visual.pos_embedding": (1, *v.shape)}.get(new)
            out[new] = v.reshape(shape) if shape else v
    return {**out, "textual.token_embedding.weight": torch.ones(3, 2), "log_scale": torch.tensor(4.6)}


#: the Wan source's own names (wan/modules/t5.py, clip.py, vae2_2.py) for a few tensors: facts the
#: tables must reproduce, independent of the tables
ORIGINAL_FACTS = {
    "text_encoder": {"encoder.block.1.layer.1.DenseReluDense.wi_0.weight": "blocks.1.ffn.gate.0.weight",
                     "encoder.block.1.layer.1.DenseReluDense.wi_1.weight": "blocks.1.ffn.fc1.weight",
                     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                         "blocks.0.pos_embedding.embedding.weight",
                     "encoder.final_layer_norm.weight": "norm.weight", "shared.weight": "token_embedding.weight"},
    "image_encoder": {"vision_model.encoder.layers.1.mlp.fc2.bias": "visual.transformer.1.mlp.2.bias",
                      "vision_model.pre_layrnorm.weight": "visual.pre_norm.weight"},
    "vae22": {"encoder.down_blocks.0.resnets.1.norm2.gamma": "encoder.downsamples.0.downsamples.1.residual.3.gamma",
              "encoder.down_blocks.1.downsampler.time_conv.weight": "encoder.downsamples.1.downsamples.2.time_conv.weight",
              "decoder.up_blocks.0.upsampler.resample.1.bias": "decoder.upsamples.0.upsamples.3.resample.1.bias",
              "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": "decoder.upsamples.1.upsamples.0.shortcut.weight",
              "quant_conv.weight": "conv1.weight", "decoder.norm_out.gamma": "decoder.head.0.gamma"},
}


def test_tables_reproduce_the_wan_sources_names():
    for diffusers_name, wan_name in ORIGINAL_FACTS["text_encoder"].items():
        assert invert(names.ORIGINAL_UMT5, diffusers_name) == wan_name
    for diffusers_name, wan_name in ORIGINAL_FACTS["image_encoder"].items():
        assert invert(names.ORIGINAL_CLIP, diffusers_name) == wan_name
    table = names.original_vae(4, 2, True)
    for diffusers_name, wan_name in ORIGINAL_FACTS["vae22"].items():
        assert invert(table, diffusers_name) == wan_name
        assert names.rename(wan_name, names.compile_rules(table))[0] == diffusers_name


def test_inversion_matches_diffusers_conversion(tiny_repos):
    """What the tests write as original names, diffusers' single-file converters turn back into the
    diffusers state dicts exactly (transformers of every family; a Wan 2.1 VAE of the published layout)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers

    for family in FAMILIES:
        for name in ("transformer", "transformer_2"):
            if (tiny_repos[family] / name).is_dir():
                sd = _load(tiny_repos[family] / name)
                back = convert_wan_transformer_to_diffusers(dict(to_original(sd, names.ORIGINAL_TRANSFORMER)))
                _same(back, sd)
                prefixed = {f"model.diffusion_model.{k}": v for k, v in to_original(sd, names.ORIGINAL_TRANSFORMER).items()}
                _same(convert_wan_transformer_to_diffusers(prefixed), sd)
    cfg = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    sd = AutoencoderKLWan(**cfg).state_dict()
    _same(convert_wan_vae_to_diffusers(to_original(sd, vae_table(cfg))), sd)


def _same(got: dict, want: dict):
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _load(folder: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


# ---------------------------------------------------------------- writing the sources
def _cast(sd: dict, dtype) -> dict:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _save(sd: dict, path: pathlib.Path) -> pathlib.Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def bf16_repo(src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A copy of a tiny repo whose weights are rounded to bf16 (what a bf16 source holds)."""
    from safetensors.torch import load_file, save_file

    if not dest.exists():
        shutil.copytree(src, dest)
        for f in dest.rglob("*.safetensors"):
            save_file(_cast(load_file(f), torch.bfloat16), f)
    return dest


def _original_config(cfg: dict, model_type: str) -> dict:
    """Wan-AI's config.json of a transformer (the original format)."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": model_type,
            "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"], "eps": cfg["eps"],
            "ffn_dim": cfg["ffn_dim"], "freq_dim": cfg["freq_dim"], "in_dim": cfg["in_channels"],
            "num_heads": cfg["num_attention_heads"], "num_layers": cfg["num_layers"],
            "out_dim": cfg["out_channels"], "text_len": 512}


def write_comfyui(repo: pathlib.Path, dest: pathlib.Path, dtype, prefix: str) -> dict[str, pathlib.Path]:
    """ComfyUI-style files: one file per transformer (original names, ``prefix``), the VAE in original
    names, the text encoder in transformers' names (ComfyUI's own text-encoder files)."""
    out = {}
    for name, flag in (("transformer", "source"), ("transformer_2", "transformer_2")):
        if (repo / name).is_dir():
            sd = to_original(_load(repo / name), names.ORIGINAL_TRANSFORMER)
            out[flag] = _save(_cast({prefix + k: v for k, v in sd.items()}, dtype), dest / f"{name}.safetensors")
    vae_cfg = json.loads((repo / "vae" / "config.json").read_text())
    out["vae"] = _save(_cast(to_original(_load(repo / "vae"), vae_table(vae_cfg)), dtype), dest / "vae.safetensors")
    out["text_encoder"] = _save(_cast(_load(repo / "text_encoder"), dtype), dest / "umt5.safetensors")
    return out


def write_wan_folder(repo: pathlib.Path, dest: pathlib.Path, dtype, model_type: str) -> pathlib.Path:
    """An original Wan-AI folder: config.json + sharded diffusion_pytorch_model with an index (in
    high_noise_model/ and low_noise_model/ for two experts), Wan2.x_VAE.pth, the UMT5 and CLIP .pth files,
    google/umt5-xxl/ (the tokenizer)."""
    two = (repo / "transformer_2").is_dir()
    for name, folder in (("transformer", "high_noise_model" if two else ""), ("transformer_2", "low_noise_model")):
        if (repo / name).is_dir():
            _write_sharded(repo / name, dest / folder, dtype, model_type)
    vae_cfg = json.loads((repo / "vae" / "config.json").read_text())
    vae_file = "Wan2.2_VAE.pth" if vae_cfg.get("is_residual") else "Wan2.1_VAE.pth"
    _save(_cast(to_original(_load(repo / "vae"), vae_table(vae_cfg)), dtype), dest / vae_file)
    _save(_cast(to_original(_load(repo / "text_encoder"), names.ORIGINAL_UMT5), dtype),
          dest / "models_t5_umt5-xxl-enc-bf16.pth")
    if (repo / "image_encoder").is_dir():
        _save(_cast(clip_to_original(_load(repo / "image_encoder")), dtype),
              dest / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    shutil.copytree(repo / "tokenizer", dest / "google" / "umt5-xxl")
    return dest


def _write_sharded(folder: pathlib.Path, dest: pathlib.Path, dtype, model_type: str) -> None:
    sd = _cast(to_original(_load(folder), names.ORIGINAL_TRANSFORMER), dtype)
    keys = sorted(sd)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for fname, ks in shards.items():
        _save({k: sd[k] for k in ks}, dest / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (dest / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(_original_config(cfg, model_type)))


# ---------------------------------------------------------------- bit-for-bit conversions
def _arrays(ck: pathlib.Path) -> dict[str, np.ndarray]:
    import tensorstore as ts

    out = {}
    for component in fmt.read_manifest(ck)["components"]:
        cfg = json.loads((ck / component / "config.json").read_text())
        for path in fmt.flatten(fmt.component_tree(component, cfg)):
            out[f"{component}/{path}"] = ts.open(fmt.zarr_spec(ck / component, path), open=True).result().read().result()
    return out


def assert_same_checkpoint(got: pathlib.Path, want: pathlib.Path) -> int:
    a, b = _arrays(got), _arrays(want)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        bits = f"u{b[k].dtype.itemsize}"
        assert np.array_equal(a[k].view(bits), b[k].view(bits)), k
    assert fmt.read_manifest(got)["family"] == fmt.read_manifest(want)["family"]
    return len(b)


@pytest.fixture(scope="module")
def reference(tiny_repos, converted, tmp_path_factory):
    """``reference(family, bf16)``: the tiny repo (its weights rounded to bf16 if asked) and its conversion."""
    root, cache = tmp_path_factory.mktemp("bf16-reference"), {}

    def get(family: str, bf16: bool) -> tuple[pathlib.Path, pathlib.Path]:
        if not bf16:
            return tiny_repos[family], converted[family]
        if family not in cache:
            repo = bf16_repo(tiny_repos[family], root / f"{family}-src")
            cache[family] = repo, convert(str(repo), root / f"{family}-ck", hash_source=False).output
        return cache[family]
    return get


@pytest.mark.parametrize("family,bf16,prefix", [(T2V, False, "model.diffusion_model."), (I2V_A14B, True, "")])
def test_comfyui_single_file(family, bf16, prefix, reference, tmp_path):
    """A single-file transformer (prefixed or bare original names) + --vae / --text-encoder files (+
    --transformer-2), --components lending the configs and tokenizer: the same checkpoint as the repo's."""
    repo, want = reference(family, bf16)
    files = write_comfyui(repo, tmp_path / "comfy", torch.bfloat16 if bf16 else torch.float32, prefix)
    opts = SourceOptions(transformer_2=str(files["transformer_2"]) if "transformer_2" in files else None, vae=str(files["vae"]),
                         text_encoder=str(files["text_encoder"]), components=str(repo))
    ck = convert(str(files["source"]), tmp_path / "ck", sources=opts).output
    assert assert_same_checkpoint(ck, want) > 0
    for c in fmt.read_manifest(want)["components"]:
        assert json.loads((ck / c / "config.json").read_text()) == json.loads((want / c / "config.json").read_text())
    assert (ck / "tokenizer" / "tokenizer.json").read_bytes() == (repo / "tokenizer" / "tokenizer.json").read_bytes()
    assert verify(ck, str(files["source"]), sources=opts) > 0


@pytest.mark.parametrize("family,bf16,lend", [(I2V, False, True), (TI2V, True, False), (T2V_A14B, False, False)])
def test_wan_ai_folder(family, bf16, lend, reference, tmp_path):
    """An original Wan-AI folder (.pth VAE / UMT5 / CLIP, sharded transformer, google/umt5-xxl): the same
    arrays as the repo's conversion. Without --components every config is derived from the shapes and the
    original config.json (same param trees; the family, pipeline and sampler of the repo)."""
    repo, want = reference(family, bf16)
    model_type = {I2V: "i2v", TI2V: "ti2v"}.get(family, "t2v")
    src = write_wan_folder(repo, tmp_path / "wan", torch.bfloat16 if bf16 else torch.float32, model_type)
    opts = SourceOptions(components=str(repo)) if lend else None
    ck = convert(str(src), tmp_path / "ck", sources=opts).output
    assert assert_same_checkpoint(ck, want) > 0
    got_index, want_index = (json.loads((p / "model_index.json").read_text()) for p in (ck, want))
    for key in ("_class_name", "boundary_ratio", "expand_timesteps"):
        assert got_index.get(key) == want_index.get(key), key
    for c in fmt.read_manifest(want)["components"]:
        got_cfg, want_cfg = (json.loads((p / c / "config.json").read_text()) for p in (ck, want))
        assert fmt.component_tree(c, got_cfg) == fmt.component_tree(c, want_cfg), c
    scheduler = json.loads((ck / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_flow_sigmas"] and scheduler["prediction_type"] == "flow_prediction"
    manifest = fmt.read_manifest(ck)
    assert {p.split("/")[0] for p in manifest["source"]["files"]} >= set(manifest["components"])
    assert verify(ck, str(src), sources=opts) > 0


# ---------------------------------------------------------------- the published sizes, from shapes
#: the published transformers' diffusers configs (diffusers' scripts/convert_wan_to_diffusers.py)
COMMON = dict(attention_head_dim=128, cross_attn_norm=True, eps=1e-06, freq_dim=256, patch_size=[1, 2, 2],
              qk_norm="rms_norm_across_heads", text_dim=4096)
PUBLISHED = {
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
    "Wan2.1-T2V-14B": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
    "Wan2.1-I2V-14B": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                           image_dim=1280, added_kv_proj_dim=5120),
    "Wan2.1-FLF2V-14B": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                             image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=257 * 2),
    "Wan2.2-TI2V-5B": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
}


def _meta_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(PUBLISHED))
@pytest.mark.parametrize("spelling", ["diffusers", "original", "comfyui"])
def test_detects_published_sizes(kind, spelling):
    """Full-size shapes (a meta-device model: no weights) tell each published model and give its config."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        shapes = _meta_shapes(WanTransformer3DModel(**PUBLISHED[kind]))
    if spelling != "diffusers":
        prefix = "model.diffusion_model." if spelling == "comfyui" else ""
        shapes = {prefix + invert(names.ORIGINAL_TRANSFORMER, k): v for k, v in shapes.items()}
    found, cfg = original.detect(shapes)
    assert found == kind
    want = dict(COMMON, **PUBLISHED[kind])
    assert {k: cfg[k] for k in want} == want
    assert cfgs.parse("transformer", cfg) == cfgs.parse("transformer", want)
    # a 14B T2V transformer given with a second expert is Wan2.2-T2V-A14B; no other size has two experts
    assert original.detect(shapes, experts=2)[0] == {"Wan2.1-T2V-14B": "Wan2.2-T2V-A14B"}.get(kind)


def test_detects_wan22_i2v_expert():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        shapes = _meta_shapes(WanTransformer3DModel(**dict(PUBLISHED["Wan2.1-T2V-14B"], in_channels=36)))
    assert original.detect(shapes, experts=2)[0] == "Wan2.2-I2V-A14B"
    assert original.detect(shapes)[0] is None  # one expert alone: not a published model


#: the published VAEs (Wan-AI/Wan2.1-*-Diffusers, Wan2.2-TI2V-5B-Diffusers vae/config.json sizes)
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], in_channels=12, out_channels=12, is_residual=True,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
#: google/umt5-xxl and CLIP ViT-H/14 (the sizes of the published text and image encoders)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu")
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
             image_size=224, hidden_act="gelu", projection_dim=1024)


def test_derives_published_component_configs():
    """UMT5-XXL, CLIP ViT-H/14 and both published VAEs (the VAEs in Wan's original names, as Wan-AI
    publishes them): the config derived from full-size shapes describes the published model."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        t5 = _meta_shapes(UMT5EncoderModel(UMT5Config(**UMT5_XXL)))
        clip = _meta_shapes(CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)))
        vaes = [(cfg, _meta_shapes(AutoencoderKLWan(**cfg))) for cfg in (WAN21_VAE, WAN22_VAE)]
    assert cfgs.parse("text_encoder", original.derive_config("text_encoder", t5, "t5")) == \
        cfgs.parse("text_encoder", UMT5_XXL)
    assert cfgs.parse("image_encoder", original.derive_config("image_encoder", clip, "clip")) == \
        cfgs.parse("image_encoder", VIT_H)
    for cfg, shapes in vaes:
        wan = {invert(vae_table(cfg), k): v for k, v in shapes.items()}
        rename = original.naming("vae", set(wan))
        assert {rename.rename(k, 0)[0][0]: v for k, v in wan.items()} == shapes
        derived = original.derive_config("vae", shapes, "vae")
        assert len(derived["latents_mean"]) == len(derived["latents_std"]) == cfg["z_dim"]
        assert cfgs.parse("vae", derived) == cfgs.parse("vae", dict(cfg, latents_mean=derived["latents_mean"],
                                                                    latents_std=derived["latents_std"]))


# ---------------------------------------------------------------- bad inputs
def _cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}
    if env_extra:
        env["PYTHONPATH"] = f"{env_extra}:{env['PYTHONPATH']}"
    return subprocess.run([sys.executable, "-m", "wan_convert.cli", *args], capture_output=True, text=True, env=env)


def _bad_sources(tiny_repos, tmp: pathlib.Path) -> dict[str, tuple[list[str], str, str | None]]:
    """name -> (CLI arguments, text the one-line error must hold, PYTHONPATH entry to put first)."""
    repo = tiny_repos[T2V]
    files = write_comfyui(repo, tmp / "comfy", torch.float32, "model.diffusion_model.")
    sd = _load_file(files["source"])
    unknown = _save({**sd, "model.diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 24)},
                    tmp / "unknown.safetensors")
    stray = _save({**sd, "model.diffusion_model.extra_head.weight": torch.zeros(2)}, tmp / "stray.safetensors")
    missing = _save({k: v for k, v in sd.items() if k != "model.diffusion_model.blocks.1.ffn.2.bias"},
                    tmp / "missing.safetensors")
    fp8 = _save({**{k: v for k, v in sd.items() if "blocks.0.ffn.0.weight" not in k},
                 "model.diffusion_model.blocks.0.ffn.0.weight": sd["model.diffusion_model.blocks.0.ffn.0.weight"].to(torch.float8_e4m3fn),
                 "model.diffusion_model.blocks.0.ffn.0.scale_weight": torch.ones(1)}, tmp / "fp8_scaled.safetensors")
    pth = _save(_load_file(files["vae"]), tmp / "Wan2.1_VAE.pth")
    no_torch = tmp / "no-torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
    rest = ["--vae", str(files["vae"]), "--text-encoder", str(files["text_encoder"]), "--components", str(repo)]
    return {
        "unknown key": ([str(unknown), *rest], "unknown.safetensors: tensor model.diffusion_model.blocks.0.self_attn.q."
                                               "lora_down.weight", None),
        "stray key": ([str(stray), *rest], "stray.safetensors: tensor model.diffusion_model.extra_head.weight", None),
        "missing tensor": ([str(missing), *rest], "missing.safetensors: no source tensor for block 1", None),
        "fp8": ([str(fp8), *rest], "fp8_scaled.safetensors: fp8 checkpoints are not supported yet", None),
        "pth without torch": ([str(files["source"]), "--vae", str(pth), *rest[2:]],
                              "Wan2.1_VAE.pth: reading a .pth file needs torch (pip install torch)", str(no_torch.parent)),
        "vae missing": ([str(files["source"]), "--components", str(_without_vae(repo, tmp / "no-vae"))],
                        "no vae: pass --vae FILE", None),
        "bad --components": ([str(files["source"]), "--components", str(tmp / "nowhere")], "--components", None),
    }


def _without_vae(repo: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns("vae"))
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps(dict(index, vae=[None, None])))
    return dest


def _load_file(path: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_bad_sources_one_line_exit_2(tiny_repos, tmp_path):
    cases = _bad_sources(tiny_repos, tmp_path)
    for i, (what, (args, expect, path)) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        r = _cli(*args[:1], str(out), *args[1:], env_extra=path)
        assert r.returncode == 2, (what, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (what, r.stderr)
        assert expect in r.stderr, (what, r.stderr)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*")), what


def test_pth_without_torch_in_process(tiny_repos, tmp_path, monkeypatch):
    path = _save({"conv1.weight": torch.zeros(1)}, tmp_path / "Wan2.1_VAE.pth")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SourceError, match=r"Wan2.1_VAE.pth: reading a \.pth file needs torch \(pip install torch\)"):
        original.open_weights(path)


def test_options_refused_for_a_diffusers_repo(tiny_repos):
    with pytest.raises(SourceError, match="--vae: applies to a single-file transformer"):
        resolve(str(tiny_repos[T2V]), options=SourceOptions(vae="x.pth"))
