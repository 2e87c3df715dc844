"""LoRAs in the three key formats against diffusers' ``load_lora_weights`` + ``fuse_lora`` (float32, tiny
repos): applied at load (``WanPipeline.set_loras``); the files are written here with random low-rank
pairs, alphas and bias deltas, in each format's own spelling, and diffusers parses them with its own
converters."""
import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_families import FRAMES, _diffusers_run, _errors, _latents, _ours
from wan_runtime import lora as L
from wan_runtime.pipeline import WanPipeline

TOL_FRAMES = 1e-3  # the bound on frames (max abs); measured figures are recorded
#: diffusers module -> its original Wan spelling (the modules these LoRAs touch in every block)
ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
            "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
            "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
            "ffn.net.2": "ffn.2"}


def lora_modules(repo, component="transformer", rank=4, seed=0, std=0.15):
    """{diffusers module name: (down (r, in), up (out, r), alpha)} for every block module of ORIGINAL."""
    cfg = json.loads((repo / component / "config.json").read_text())
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    shapes = {m: (dim, dim) for m in ORIGINAL} | {"ffn.net.0.proj": (cfg["ffn_dim"], dim),
                                                  "ffn.net.2": (dim, cfg["ffn_dim"])}
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(cfg["num_layers"]):
        for m, (o, n) in shapes.items():
            down = rng.standard_normal((rank, n), dtype=np.float32) * std
            up = rng.standard_normal((o, rank), dtype=np.float32) * std
            out[f"blocks.{i}.{m}"] = (down, up, float(rng.choice([rank, 2 * rank, rank / 2])))
    return out


def write_lora(path, modules, fmt: str, bias_deltas=None):
    """A LoRA file in ``fmt`` ("diffusers": no alpha, so alpha is taken as the rank; "diffusers-meta": PEFT's
    lora_alpha and r in diffusers' ``lora_adapter_metadata``, one alpha for every module; "original";
    "kohya"). ``bias_deltas`` ({diffusers module: (out,)}): original format only (``.diff_b``)."""
    from safetensors.numpy import save_file

    tensors, metadata = {}, None
    for m, (down, up, alpha) in modules.items():
        i, rest = m.split(".", 2)[1], m.split(".", 2)[2]
        orig = f"blocks.{i}.{ORIGINAL[rest]}"
        if fmt.startswith("diffusers"):
            tensors |= {f"transformer.{m}.lora_A.weight": down, f"transformer.{m}.lora_B.weight": up}
            meta = {"r": down.shape[0], "lora_alpha": alpha, "target_modules": sorted(ORIGINAL), "lora_dropout": 0.0}
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in
                                                                             meta.items()})} if fmt != "diffusers" else None
        elif fmt == "original":
            tensors |= {f"diffusion_model.{orig}.lora_down.weight": down, f"diffusion_model.{orig}.lora_up.weight": up,
                        f"diffusion_model.{orig}.alpha": np.array(alpha, np.float32)}
        else:
            k = "lora_unet_" + orig.replace(".", "_")
            tensors |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up,
                        f"{k}.alpha": np.array(alpha, np.float32)}
    for m, b in (bias_deltas or {}).items():
        i, rest = m.split(".", 2)[1], m.split(".", 2)[2]
        tensors[f"diffusion_model.blocks.{i}.{ORIGINAL[rest]}.diff_b"] = b
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _alpha_free(modules):
    return {m: (d, u, float(d.shape[0])) for m, (d, u, _) in modules.items()}


@pytest.fixture(scope="module")
def t2v(converted_f32):
    return WanPipeline.from_converted(converted_f32("wan2.1-t2v"), dtype="float32")


def _case_run(tiny_repos, pipe, family, height=32, width=48, prepare=None):
    latents = _latents(pipe, height, width)
    return latents, _diffusers_run(tiny_repos[family], family, latents, height, width, None, prepare)


def _fuse(files, strengths, transformer_2=()):
    def prepare(dpipe):
        names = []
        for n, f in enumerate(files):
            dpipe.load_lora_weights(str(f), adapter_name=f"l{n}")
            names.append(f"l{n}")
        for n, f in enumerate(transformer_2):
            dpipe.load_lora_weights(str(f), adapter_name=f"m{n}", load_into_transformer_2=True)
            names.append(f"m{n}")
        dpipe.set_adapters(names, adapter_weights=list(strengths))
        dpipe.fuse_lora(components=["transformer", "transformer_2"] if transformer_2 else ["transformer"])
    return prepare


T2V_CASE = ("wan2.1-t2v", 32, 48, False)


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers-meta", "original", "kohya"])
def test_lora_at_load_matches_diffusers(fmt, tiny_repos, t2v, tmp_path, measured):
    """Each format, strength 0.8, applied at load, against diffusers' own loading and fusing; the LoRA's
    effect is far above the tolerance (a control run without it)."""
    modules = lora_modules(tiny_repos["wan2.1-t2v"])
    modules = _alpha_free(modules) if fmt == "diffusers" else modules
    if fmt == "diffusers-meta":  # PEFT's one lora_alpha for all modules (here 2 x rank: a scale of 2)
        modules = {m: (d, u, 2.0 * d.shape[0]) for m, (d, u, _) in modules.items()}
    bias = ({m: np.random.default_rng(5).standard_normal(modules[m][1].shape[0]).astype(np.float32) * 0.05
             for m in list(modules)[:3]} if fmt == "original" else None)
    f = write_lora(tmp_path / f"{fmt}.safetensors", modules, fmt, bias)
    latents, (ref_lat, ref_frames) = _case_run(tiny_repos, t2v, "wan2.1-t2v", prepare=_fuse([f], [0.8]))
    pipe = t2v.replace()
    pipe.set_loras([f"{f}:0.8"])
    try:
        errors = _errors(*_ours(pipe, T2V_CASE, latents, None), ref_lat, ref_frames)
        pipe.set_loras()
        control = _errors(*_ours(pipe, T2V_CASE, latents, None), ref_lat, ref_frames)
    finally:
        pipe.set_loras()
    measured(f"lora/{fmt}/at_load/frames_max_abs", errors[2], effect=control[2], latents_max_abs=errors[0])
    assert errors[2] < TOL_FRAMES, errors
    assert control[2] > 30 * TOL_FRAMES, control


def test_two_loras_stacked_and_strength_zero(tiny_repos, t2v, tmp_path, measured):
    """Two LoRAs with their own strengths == diffusers' two adapters fused; strength 0 == no LoRA, bitwise."""
    a = write_lora(tmp_path / "a.safetensors", lora_modules(tiny_repos["wan2.1-t2v"], seed=1), "original")
    b = write_lora(tmp_path / "b.safetensors", lora_modules(tiny_repos["wan2.1-t2v"], seed=2), "kohya")
    latents, (ref_lat, ref_frames) = _case_run(tiny_repos, t2v, "wan2.1-t2v", prepare=_fuse([a, b], [0.7, -0.4]))
    pipe = t2v.replace()
    try:
        pipe.set_loras([f"{a}:0.7", f"{b}:-0.4"])
        errors = _errors(*_ours(pipe, T2V_CASE, latents, None), ref_lat, ref_frames)
        pipe.set_loras([f"{a}:0", f"{b}:0"])
        zero = _ours(pipe, T2V_CASE, latents, None)
        pipe.set_loras()
        none = _ours(pipe, T2V_CASE, latents, None)
    finally:
        pipe.set_loras()
    measured("lora/stacked/at_load/frames_max_abs", errors[2], latents_max_abs=errors[0])
    assert errors[2] < TOL_FRAMES, errors
    assert np.array_equal(zero[0], none[0]) and np.array_equal(zero[1], none[1])


def test_lora_2_into_the_low_noise_expert(tiny_repos, converted_f32, tmp_path, measured):
    """Wan 2.2 A14B: --lora into the high-noise expert and --lora-2 into the low-noise one, against
    diffusers' ``load_into_transformer_2=True``."""
    family = "wan2.2-t2v-a14b"
    pipe = WanPipeline.from_converted(converted_f32(family), dtype="float32")
    a = write_lora(tmp_path / "hi.safetensors", lora_modules(tiny_repos[family], seed=3), "original")
    b = write_lora(tmp_path / "lo.safetensors", lora_modules(tiny_repos[family], "transformer_2", seed=4), "kohya")
    latents, (ref_lat, ref_frames) = _case_run(tiny_repos, pipe, family, prepare=_fuse([a], [0.9, 0.6], [b]))
    pipe.set_loras([f"{a}:0.9"], [f"{b}:0.6"])
    errors = _errors(*_ours(pipe, (family, 32, 48, False), latents, None), ref_lat, ref_frames)
    measured("lora/two_experts/at_load/frames_max_abs", errors[2], latents_max_abs=errors[0])
    assert errors[2] < TOL_FRAMES, errors


def test_strength_change_compiles_nothing(tiny_repos, t2v, tmp_path):
    """Another strength (or another LoRA of the same shapes) between two generations: no XLA compile."""
    f = write_lora(tmp_path / "s.safetensors", lora_modules(tiny_repos["wan2.1-t2v"]), "original")
    g = write_lora(tmp_path / "t.safetensors", lora_modules(tiny_repos["wan2.1-t2v"], seed=9), "original")
    pipe = t2v.replace()
    kw = dict(height=32, width=48, num_frames=FRAMES, num_inference_steps=2, guidance_scale=3.0)
    compiles = []
    listener = lambda event, *a, **k: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    try:
        pipe.set_loras([f"{f}:0.5"])
        pipe("a fox", **kw)
        jax.monitoring.register_event_duration_secs_listener(listener)
        pipe.set_loras([f"{f}:1.25"])
        first = pipe("a fox", **kw).frames
        pipe.set_loras([f"{g}:0.3"])
        pipe("a fox", **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        pipe.set_loras()
    assert compiles == [], compiles
    assert np.isfinite(first).all()


def test_lora_deltas_by_hand(tmp_path):
    """alpha / rank scaling, a full ``.diff`` and a ``.diff_b``, and a non-block module (``head.head``),
    against W + s * (alpha / r) * up @ down computed here."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((3, 8), dtype=np.float32), rng.standard_normal((8, 3), dtype=np.float32)
    diff, diff_b = rng.standard_normal((8, 8), dtype=np.float32), rng.standard_normal(8, dtype=np.float32)
    head_d, head_u = rng.standard_normal((2, 8), dtype=np.float32), rng.standard_normal((4, 2), dtype=np.float32)
    f = tmp_path / "x.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.1.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.1.self_attn.q.alpha": np.array(6, np.float32),
               "diffusion_model.blocks.0.cross_attn.o.diff": diff, "diffusion_model.blocks.0.cross_attn.o.diff_b": diff_b,
               "diffusion_model.head.head.lora_down.weight": head_d, "diffusion_model.head.head.lora_up.weight": head_u}, str(f))
    lo = L.read(f, 0.5)
    w = rng.standard_normal((2, 8, 8), dtype=np.float32)
    got = L.merge("blocks.attn1.to_q.weight", 1, w[1], [lo])
    np.testing.assert_allclose(got, w[1] + 0.5 * 2.0 * (up @ down), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L.merge("blocks.attn2.to_out.weight", 0, w[0], [lo]), w[0] + 0.5 * diff, rtol=1e-6)
    np.testing.assert_allclose(L.merge("blocks.attn2.to_out.bias", 0, w[0, 0], [lo]), w[0, 0] + 0.5 * diff_b,
                               rtol=1e-6)
    np.testing.assert_allclose(L.merge("proj_out.weight", None, np.zeros((4, 8), np.float32), [lo]),
                               0.5 * head_u @ head_d, rtol=1e-6)
    # on the device, through the stacked leaves: the same numbers
    tree = {"blocks": {"attn1": {"to_q": {"weight": jax.numpy.asarray(w)}}}}
    lo_q = dataclasses.replace(lo, deltas=tuple(d for d in lo.deltas if d.path == "blocks.attn1.to_q.weight"))
    out = np.asarray(L.apply(tree, [lo_q])["blocks"]["attn1"]["to_q"]["weight"])
    np.testing.assert_allclose(out[1], w[1] + 0.5 * 2.0 * (up @ down), rtol=1e-5, atol=1e-5)
    assert np.array_equal(out[0], w[0])


@pytest.mark.parametrize("bad,needle", [
    ({"diffusion_model.blocks.0.self_attn.q.dora_scale": np.ones((1, 8), np.float32)}, "dora_scale"),
    ({"diffusion_model.blocks.0.self_attn.zz.lora_down.weight": np.ones((2, 8), np.float32),
      "diffusion_model.blocks.0.self_attn.zz.lora_up.weight": np.ones((8, 2), np.float32)}, "self_attn.zz"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": np.ones((2, 8), np.float32),
      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": np.ones((8, 3), np.float32)}, "self_attn.q"),
])
def test_bad_lora_is_one_line_naming_the_key(bad, needle, tmp_path):
    """Refused when read, or when checked against the model (as wan-run does before loading weights)."""
    from safetensors.numpy import save_file

    from wan_runtime.format import component_tree, flatten

    f = tmp_path / "bad.safetensors"
    save_file(bad, str(f))
    cfg = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4,
               text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
               eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=32)
    with pytest.raises(L.LoraError, match=needle.replace(".", r"\.")) as e:
        L.check([L.read(f)], flatten(component_tree("transformer", cfg)))
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_mis_shaped_lora_through_wan_run(tiny_repos, converted_f32, tmp_path):
    """A LoRA for another model size: wan-run exits 2 with one line naming the module, writes nothing."""
    modules = lora_modules(tiny_repos["wan2.1-t2v"])
    wrong = {m: (np.zeros((4, 7), np.float32), u, a) for m, (d, u, a) in modules.items()}
    f = write_lora(tmp_path / "wrong.safetensors", wrong, "original")
    out = tmp_path / "o.mp4"
    run = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted_f32("wan2.1-t2v")),
                          "--prompt", "a fox", "--lora", f"{f}:0.5", "--output", str(out), "--steps", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "module blocks." in run.stderr, run.stderr
    assert "delta shape" in run.stderr and str(f) in run.stderr
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_euler_linear_is_the_distilled_sampler():
    """"euler-linear": the 4 steps the distilled LoRAs were trained for, timesteps 1000, 750, 500, 250
    shifted by 5 (LightX2V's denoising_step_list; Wan2.2-Lightning's Euler on linspace(1, 0, N + 1))."""
    from wan_runtime import schedulers

    sched = schedulers.make_schedule("euler-linear", 4, 5.0)
    t = np.array([1000, 750, 500, 250]) / 1000
    want = 5 * t / (1 + 4 * t)
    np.testing.assert_allclose(sched.sigmas, np.append(want, 0), rtol=1e-6)
    np.testing.assert_allclose(sched.timesteps, want * 1000, rtol=1e-6)


def test_distill_preset_with_loras_just_works(tiny_repos, converted_f32, tmp_path):
    """``wan-run --lora hi --lora-2 lo --preset wan2.2-t2v-a14b-4step``: 4 steps, no guidance, the distilled
    sampler, the Lightning boundary; the sidecar names each LoRA by sha256 and strength."""
    family = "wan2.2-t2v-a14b"
    hi = write_lora(tmp_path / "hi.safetensors", lora_modules(tiny_repos[family], seed=3), "original")
    lo = write_lora(tmp_path / "lo.safetensors", lora_modules(tiny_repos[family], "transformer_2", seed=4), "kohya")
    out = tmp_path / "v.npy"
    run = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted_f32(family)),
                          "--prompt", "a fox", "--lora", str(hi), "--lora-2", f"{lo}:0.5", "--preset",
                          "wan2.2-t2v-a14b-4step", "--height", "32", "--width", "48", "--frames", "9", "-q",
                          "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    side = json.loads(out.with_suffix(".json").read_text())
    s = side["settings"]
    assert (s["steps"], s["guidance"], s["scheduler"], s["boundary"]) == (4, 1.0, "euler-linear", 0.875), s
    assert [(x["file"], x["strength"]) for x in s["loras"]["transformer_2"]] == [("lo.safetensors", 0.5)]
    assert s["loras"]["transformer"][0]["sha256"] == L.read(hi).sha256
    assert np.isfinite(np.load(out)).all()
