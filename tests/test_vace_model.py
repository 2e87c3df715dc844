"""VACE, the model side: the JAX transformer with VACE blocks vs diffusers' WanVACETransformer3DModel on the
same tiny random weights, its param tree (full-size parameter counts equal diffusers'), conversion of the
tiny VACE repositories, and the family registry's view of them."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from wan_convert.mapping import tree_from_state_dict
from wan_convert.verify import verify
from wan_runtime import families, presets, sharding
from wan_runtime import format as fmt
from wan_runtime.models import transformer as T
from tests.test_transformer import _tiny, rel

ROOT = pathlib.Path(__file__).resolve().parents[1]
VACE_FAMILIES = [f.name for f in families.FAMILIES if f.vace]
forward = jax.jit(T.forward, static_argnames=("cfg", "dtype", "pad_to", "layout"))
# float32 forward vs diffusers, relative L2: the bound of tests/test_transformer.py (measured there 2.8e-7 -
# 4.0e-7; here 4.2e-7 - 4.7e-7 over the cases below)
TOL = 5e-6
#: the published VACE transformers (diffusers' scripts/convert_wan_to_diffusers.py; Wan2.2-VACE-Fun-A14B's
#: two experts have the 14B config) and their latent (F, H, W) at the presets' sizes
COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
              added_kv_proj_dim=None, rope_max_seq_len=1024, vace_in_channels=96)
PUBLISHED = {
    "Wan2.1-VACE-1.3B": (dict(COMMON, num_attention_heads=12, num_layers=30, ffn_dim=8960,
                              vace_layers=list(range(0, 30, 2))), (21, 60, 104)),
    "Wan2.1-VACE-14B": (dict(COMMON, num_attention_heads=40, num_layers=40, ffn_dim=13824,
                             vace_layers=list(range(0, 40, 5))), (21, 90, 160)),
}


@functools.lru_cache(maxsize=None)
def model(weights_dtype="float32"):
    """(diffusers' tiny WanVACETransformer3DModel, runtime params converted from its state dict, config)."""
    torch.manual_seed(5)
    m = _tiny().build_transformer(16, 16, vace=True)
    _tiny().perturb(m, torch.Generator().manual_seed(6))
    cfg = dict(m.config)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    params = jax.tree.map(jnp.asarray, tree_from_state_dict("transformer", sd, cfg, weights_dtype))
    return m, params, T.WanTransformerConfig.from_config(cfg)


def inputs(shape, control_frames, seed=0):
    """latents (B, 16, F, H, W), text (B, 8, 32), control (B, 96, control_frames, H, W)."""
    r = np.random.default_rng(seed)
    B, _, _, H, W = shape
    return (r.standard_normal(shape, dtype=np.float32), r.standard_normal((B, 8, 32), dtype=np.float32),
            r.standard_normal((B, 96, control_frames, H, W), dtype=np.float32))


def oracle(m, x, t, text, control, scale):
    with torch.no_grad():
        return m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                 control_hidden_states=torch.from_numpy(control),
                 control_hidden_states_scale=None if scale is None else torch.tensor(scale, dtype=torch.float32),
                 return_dict=False)[0].numpy()


# (latents (B, C, F, H, W), control frames, per-layer scale, token padding): the control as long as the latents
# or shorter (zero control tokens after it, as diffusers pads), one scale per VACE layer or diffusers' default
# (ones), tokens padded for the attention kernel or not
CASES = {
    "same_length": ((2, 16, 3, 4, 6), 3, [0.7, 1.3], 1),
    "short_control": ((2, 16, 3, 6, 10), 2, [1.5, -0.5], 1),
    "default_scale_padded": ((1, 16, 2, 4, 4), 2, None, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vace_forward_matches_diffusers(case, measured):
    m, params, cfg = model()
    assert cfg.vace_layers == (0, 2) and cfg.num_layers == 3 and cfg.vace_in_channels == 96
    shape, frames, scale, pad_to = CASES[case]
    x, txt, control = inputs(shape, frames)
    t = np.array([999, 250][:shape[0]], np.int64)
    out = forward(params, cfg, x, t, txt, control=control, pad_to=pad_to,
                  control_scale=None if scale is None else np.asarray(scale, np.float32))
    assert out.shape == shape and out.dtype == jnp.float32
    err = rel(out, oracle(m, x, t, txt, control, scale))
    measured(f"component/transformer/vace_{case}/rel_l2", err)
    assert err <= TOL, err


def test_hints_reach_the_output_and_scale_zero_is_the_plain_model(measured):
    """Scale 0 gives the main blocks alone, bit for bit (the hint table adds nothing); scale 1 moves the
    output far beyond the parity bound, so the parity test sees the hints."""
    _, params, cfg = model()
    x, txt, control = inputs((2, 16, 3, 4, 6), 3)
    t = np.array([999, 250], np.int64)
    plain = forward(params, cfg, x, t, txt)
    off = forward(params, cfg, x, t, txt, control=control, control_scale=np.zeros(2, np.float32))
    assert np.array_equal(np.asarray(plain), np.asarray(off))
    moved = rel(forward(params, cfg, x, t, txt, control=control), plain)
    measured("consistency/transformer/vace_hint_effect/rel_l2", moved)
    assert moved > 1000 * TOL, moved


def _stages(params, cfg, x, t, txt, control):
    """The forward's stages as a denoise loop calls them: tokens, temb_proj, rope, context."""
    F, H, W = x.shape[2:]
    rope = T.rope_tables(cfg, (F, H // 2, W // 2))
    _, temb_proj = T.embed_time(params, cfg, jnp.asarray(t))
    return (T.patchify(params, cfg, jnp.asarray(x)), T.vace_patchify(params, cfg, jnp.asarray(control)), temb_proj,
            rope, T.embed_text(params, cfg, jnp.asarray(txt)))


def test_kv_cache_off_and_split_layers_give_the_same_result():
    """vace_hints takes the VACE K/V or (kv cache off) the context they come from; run_blocks over two
    slices of the layers (first_layer) equals one run over all of them."""
    _, params, cfg = model()
    x, txt, control = inputs((2, 16, 3, 4, 6), 3)
    tokens, ctrl, temb_proj, rope, ctx = _stages(params, cfg, x, np.array([999, 250]), txt, control)
    hints = T.vace_hints(params, cfg, tokens, ctrl, temb_proj, rope, T.cross_kv_vace(params, cfg, ctx), jnp.float32)
    assert hints.shape == (2, 2, tokens.shape[1], cfg.dim)
    from_ctx = T.vace_hints(params, cfg, tokens, ctrl, temb_proj, rope, ctx, jnp.float32)
    assert rel(from_ctx, hints) <= 1e-6
    kv, scale = T.cross_kv(params, cfg, ctx), jnp.asarray([0.5, 2.0])
    whole = T.run_blocks(params, tokens, temb_proj, rope, kv, cfg, jnp.float32, hints=hints, hint_scale=scale)
    h = tokens
    for lo, hi in ((0, 1), (1, 3)):  # block 0 (a hint after it) apart, then blocks 1 (none) and 2 (hint 1)
        part = jax.tree.map(lambda a: a[lo:hi], {"blocks": params["blocks"], "kv": kv})
        h = T.run_blocks(part, h, temb_proj, rope, part["kv"], cfg, jnp.float32, hints=hints, hint_scale=scale,
                         first_layer=lo)
    assert rel(h, whole) <= 1e-6
    assert T.hint_slots(cfg, 3).tolist() == [0, -1, 1] and T.hint_slots(cfg, 2, 1).tolist() == [-1, 1]


def test_vace_on_a_mesh_matches_one_device(measured):
    """The VACE chain and the hinted main blocks with the sequence split over devices (context-parallel
    self-attention, tokens padded per shard) and the batch over data."""
    assert len(jax.devices()) == 8, "conftest should provide 8 simulated CPU devices"
    _, params, cfg = model()
    x, txt, control = inputs((2, 16, 3, 4, 6), 2)
    t, scale = np.array([999, 250], np.int64), np.asarray([0.7, 1.3], np.float32)
    one = forward(params, cfg, x, t, txt, control=control, control_scale=scale)
    layout = sharding.Layout(sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=2,context=2")), "auto")
    many = forward(params, cfg, x, t, txt, control=control, control_scale=scale, layout=layout)
    err = rel(many, one)
    measured("consistency/transformer/vace_mesh_vs_one_device/rel_l2", err)
    assert err <= 1e-5, err


def test_bf16_weights_and_quantized_vace_blocks():
    """bf16: VACE blocks keep the fp32 rule of the main ones (modulation, norms). Quantized trees quantize
    the VACE blocks' 2-D weights as the main blocks' (and their proj_out), never vace_proj_in."""
    m, _, _ = model()
    params = model("bfloat16")[1]
    assert params["vace_blocks"]["attn1"]["to_q"]["weight"].dtype == jnp.bfloat16
    assert params["vace_blocks"]["scale_shift_table"].dtype == params["vace_blocks"]["norm2"]["weight"].dtype == \
        jnp.float32
    flat = fmt.flatten(fmt.transformer_tree(dict(m.config), "float8_e4m3fn"))
    quant = {p for p, leaf in flat.items() if leaf.dtype == "float8_e4m3fn"}
    main = {p.removeprefix("blocks.") for p in quant if p.startswith("blocks.")}
    assert {p.removeprefix("vace_blocks.") for p in quant if p.startswith("vace_blocks.")} == main | {"proj_out.weight"}
    assert quant <= {f"{b}.{p}" for b in ("blocks", "vace_blocks") for p in main | {"proj_out.weight"}}
    assert all(f"{p}_scale" in flat for p in quant) and flat["vace_proj_in.weight"].dtype == "bfloat16"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_param_count_and_shapes(name):
    """The runtime's tree of a published VACE transformer has diffusers' parameter count (diffusers' model
    built on the meta device: no memory), and the forward traces at the preset's size (jax.eval_shape)."""
    from diffusers import WanVACETransformer3DModel

    cfg_json, (F, H, W) = PUBLISHED[name]
    tree = fmt.transformer_tree(cfg_json, "bfloat16")
    with torch.device("meta"):
        ref = WanVACETransformer3DModel(**cfg_json)
    assert sum(int(np.prod(leaf.shape)) for leaf in fmt.flatten(tree).values()) == \
        sum(p.numel() for p in ref.parameters())
    cfg, sds = T.WanTransformerConfig.from_config(cfg_json), jax.ShapeDtypeStruct
    abstract = jax.tree.map(lambda leaf: sds(leaf.shape, fmt.np_dtype(leaf.dtype)), tree,
                            is_leaf=lambda a: isinstance(a, fmt.Leaf))
    out = jax.eval_shape(functools.partial(T.forward, cfg=cfg, dtype=jnp.bfloat16), abstract,
                         latents=sds((1, 16, F, H, W), jnp.float32), timestep=sds((1,), jnp.int32),
                         text_emb=sds((1, 512, 4096), jnp.bfloat16), control=sds((1, 96, F, H, W), jnp.bfloat16),
                         control_scale=sds((len(cfg.vace_layers),), jnp.float32))
    assert out.shape == (1, 16, F, H, W) and out.dtype == jnp.float32


@pytest.mark.parametrize("family", VACE_FAMILIES)
def test_tiny_repo_converts_bitwise(family, tiny_repos, tmp_path):
    """Each tiny VACE repository (diffusers' own classes) converts and verifies bit for bit (bf16 and a
    quantized transformer); the stacked VACE leaves are the source's blocks in order."""
    from wan_convert.convert import convert
    from wan_convert.source import Component

    src = tiny_repos[family]
    out = convert(str(src), tmp_path / "bf16").output
    assert fmt.read_manifest(out)["family"] == family
    assert verify(out, str(src)) > 0
    comp = Component(src / "transformer")
    got = fmt.component_tree("transformer", comp.config)
    assert "vace_proj_in" in got and "vace_patch_embedding" in got
    import tensorstore as ts

    def read(path):
        return ts.open(fmt.zarr_spec(out / "transformer", path), open=True).result().read().result()

    for k in range(2):
        want = torch.from_numpy(comp.array(f"vace_blocks.{k}.ffn.net.2.weight").copy()).to(torch.bfloat16)
        assert np.array_equal(read("vace_blocks.ffn.fc_out.weight")[k].view(np.uint16),
                              want.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(read("vace_proj_in.bias").view(np.uint16), torch.from_numpy(
        comp.array("vace_blocks.0.proj_in.bias").copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    quant = convert(str(src), tmp_path / "fp8", weights_dtype="float8_e4m3fn").output
    assert verify(quant, str(src)) > 0


def test_registry_detects_vace_and_picks_presets(tiny_repos):
    """Detection from model_index / transformer config (before the T2V rules, which VACE configs also
    match), the family field the pipeline branches on, and the published presets by head count."""

    for family in VACE_FAMILIES:
        src = tiny_repos[family]
        index, tcfg = (json.loads((src / p).read_text()) for p in ("model_index.json", "transformer/config.json"))
        fam = families.detect(index, tcfg, json.loads((src / "vae" / "config.json").read_text()))
        assert fam.name == family and fam.vace and "WanVACEPipeline" in fam.pipelines
        assert fam.expert_names == (("transformer", "transformer_2") if index["boundary_ratio"] else ("transformer",))
        plain = {k: v for k, v in tcfg.items() if not k.startswith("vace_") and k != "_class_name"}
        assert not families.detect(dict(index, _class_name="WanPipeline"), plain).vace
    assert not any(f.vace for f in families.FAMILIES if "WanVACEPipeline" not in f.pipelines)
    vace21 = next(f for f in families.FAMILIES if f.vace and f.experts == 1)
    for heads, name in ((12, "Wan2.1-VACE-1.3B"), (40, "Wan2.1-VACE-14B")):
        preset = presets.for_checkpoint(vace21.name, PUBLISHED[name][0] | {"num_attention_heads": heads})
        assert families.preset_family(preset["name"]) is vace21
        assert (preset["frames"], preset["steps"], preset["guidance"]) == (81, 50, 5.0)


@pytest.mark.parametrize("bad", [[2, 4], [0, 4, 2], [0, 0], [0, 30], ["0"]])
def test_bad_vace_layers_are_named(bad):
    with pytest.raises(fmt.FormatError, match="vace_layers"):
        T.WanTransformerConfig.from_config(dict(PUBLISHED["Wan2.1-VACE-1.3B"][0], vace_layers=bad))


@pytest.mark.parametrize("family", VACE_FAMILIES)
def test_original_sources(family, tiny_repos, tmp_path):
    """Wan's original names (VACE's before_proj / after_proj): a ComfyUI-style single file with
    --components, and a Wan-AI folder whose config.json names vace_layers / vace_in_dim (every config
    derived): the same arrays as the diffusers repo's conversion."""
    from tests.test_sources import assert_same_checkpoint, write_comfyui, write_wan_folder
    from wan_convert.convert import convert
    from wan_convert.source import SourceOptions

    repo = tiny_repos[family]
    want = convert(str(repo), tmp_path / "want").output
    files = write_comfyui(repo, tmp_path / "comfy", torch.float32, "model.diffusion_model.")
    second = str(files["transformer_2"]) if "transformer_2" in files else None
    opts = SourceOptions(transformer_2=second, vae=str(files["vae"]), text_encoder=str(files["text_encoder"]),
                         components=str(repo))
    assert assert_same_checkpoint(convert(str(files["source"]), tmp_path / "single", sources=opts).output, want) > 0
    folder = write_wan_folder(repo, tmp_path / "wan", torch.float32, "vace")
    for cfg_path in folder.rglob("config.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps(dict(cfg, vace_layers=[0, 2], vace_in_dim=96)))
    ck = convert(str(folder), tmp_path / "folder").output
    assert assert_same_checkpoint(ck, want) > 0
    index = json.loads((ck / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline" and index["boundary_ratio"] == json.loads(
        (repo / "model_index.json").read_text())["boundary_ratio"]
    assert verify(ck, str(folder)) > 0


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes_from_original_shapes(name):
    """A full-size VACE transformer in original names (meta device: no weights) is told from its shapes,
    its vace_layers the published model's."""
    from diffusers import WanVACETransformer3DModel

    from tests.test_sources import invert
    from wan_convert import original
    from wan_runtime import names

    cfg_json = PUBLISHED[name][0]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVACETransformer3DModel(**cfg_json).state_dict().items()}
    wan = {"model.diffusion_model." + invert(names.ORIGINAL_TRANSFORMER, k): v for k, v in shapes.items()}
    found, cfg = original.detect(wan)
    assert found == name and cfg["vace_layers"] == cfg_json["vace_layers"]
    assert T.WanTransformerConfig.from_config(cfg) == T.WanTransformerConfig.from_config(cfg_json)
    assert original.detect(wan, experts=2)[0] == ("Wan2.2-VACE-Fun-A14B" if "14B" in name else None)
