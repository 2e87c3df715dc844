"""LoRAs merged at conversion (``wan-convert --lora`` / ``--lora-2``), float32, tiny repos: frames against
diffusers' ``load_lora_weights`` + ``fuse_lora`` for the three key formats, two experts and two LoRAs
stacked; against the same LoRA applied at load (``WanPipeline.set_loras``); strength 0 bitwise equal to
no LoRA; ``verify`` replaying the merge; bad LoRAs refused before anything is written."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.test_families import _errors, _ours
from tests.test_lora import T2V_CASE, TOL_FRAMES, _alpha_free, _case_run, _fuse, lora_modules, write_lora
from wan_convert.convert import convert
from wan_convert.mapping import plan
from wan_convert.source import Component
from wan_convert.transforms import Cast, LoraMerge, with_loras
from wan_convert.verify import VerifyError, verify
from wan_runtime import format as fmt
from wan_runtime import lora as L
from wan_runtime.pipeline import WanPipeline

T2V = "wan2.1-t2v"
#: merged at conversion vs applied at load (the same float32 sums, rounded in another order), frames max abs
TOL_AT_LOAD = 4e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-wan2.1-t2v"


@pytest.fixture(scope="module")
def t2v(converted_f32):
    return WanPipeline.from_converted(converted_f32(T2V), dtype="float32")


def _lora(repo, tmp_path, fmt_name, seed=0, component="transformer"):
    """A LoRA file in ``fmt_name`` for every block module (the original format also with bias deltas)."""
    modules = lora_modules(repo, component, seed=seed)
    modules = _alpha_free(modules) if fmt_name == "diffusers" else modules
    rng = np.random.default_rng(seed + 5)
    bias = ({m: rng.standard_normal(modules[m][1].shape[0]).astype(np.float32) * 0.05 for m in list(modules)[:3]}
            if fmt_name == "original" else None)
    return write_lora(tmp_path / f"{fmt_name}-{seed}.safetensors", modules, fmt_name, bias)


def _convert(repo, out, loras, **kw):
    kw.setdefault("weights_dtype", "float32")
    return convert(str(repo), out, hash_source=False, loras=loras, **kw).output


def _arrays(ck: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint, by "component/path"."""
    import tensorstore as ts

    out = {}
    for component in fmt.read_manifest(ck)["components"]:
        folder = ck / component
        for z in sorted(folder.glob("*/zarr.json")):
            path = z.parent.name
            out[f"{component}/{path}"] = ts.open(fmt.zarr_spec(folder, path), open=True).result().read().result()
    return out


@pytest.mark.parametrize("fmt_name", ["diffusers", "original", "kohya"])
def test_merged_lora_matches_diffusers(fmt_name, tiny_repos, t2v, tmp_path, measured):
    """Each format at strength 0.8, merged at conversion, against diffusers' own loading and fusing, and
    against the same LoRA applied at load; the LoRA's effect is far above the tolerance (a control run)."""
    f = _lora(tiny_repos[T2V], tmp_path, fmt_name)
    ck = _convert(tiny_repos[T2V], tmp_path / "ck", {"transformer": [f"{f}:0.8"]})
    latents, (ref_lat, ref_frames) = _case_run(tiny_repos, t2v, T2V, prepare=_fuse([f], [0.8]))
    merged = _ours(WanPipeline.from_converted(ck, dtype="float32"), T2V_CASE, latents, None)
    errors = _errors(*merged, ref_lat, ref_frames)
    control = _errors(*_ours(t2v, T2V_CASE, latents, None), ref_lat, ref_frames)
    at_load = t2v.replace()
    try:
        at_load.set_loras([f"{f}:0.8"])
        loaded = _ours(at_load, T2V_CASE, latents, None)
    finally:
        at_load.set_loras()
    vs_load = float(np.abs(merged[1] - loaded[1]).max())
    measured(f"lora/{fmt_name}/merged/frames_max_abs", errors[2], effect=control[2], latents_max_abs=errors[0])
    measured(f"lora/{fmt_name}/merged_vs_at_load/frames_max_abs", vs_load,
             latents_max_abs=float(np.abs(merged[0] - loaded[0]).max()))
    assert errors[2] < TOL_FRAMES, errors
    assert control[2] > 30 * TOL_FRAMES, control
    assert vs_load < TOL_AT_LOAD, vs_load
    (record,) = fmt.read_manifest(ck)["loras"]["transformer"]
    assert record == {"file": f.name, "sha256": L.read(f).sha256, "strength": 0.8}


def test_two_experts_lora_and_lora_2(tiny_repos, converted_f32, tmp_path, measured):
    """Wan 2.2 A14B: --lora into the high-noise expert, --lora-2 into the low-noise one, against diffusers'
    ``load_into_transformer_2=True``; without the --lora-2 part the frames land far off (a control)."""
    family = "wan2.2-t2v-a14b"
    repo = tiny_repos[family]
    a = _lora(repo, tmp_path, "original", seed=3)
    b = _lora(repo, tmp_path, "kohya", seed=4, component="transformer_2")
    ck = _convert(repo, tmp_path / "ck", {"transformer": [f"{a}:0.9"], "transformer_2": [f"{b}:0.6"]})
    pipe = WanPipeline.from_converted(ck, dtype="float32")
    case = (family, 32, 48, False)
    latents, (ref_lat, ref_frames) = _case_run(tiny_repos, pipe, family, prepare=_fuse([a], [0.9, 0.6], [b]))
    errors = _errors(*_ours(pipe, case, latents, None), ref_lat, ref_frames)
    plain = WanPipeline.from_converted(converted_f32(family), dtype="float32")
    plain.set_loras([f"{a}:0.9"])
    control = _errors(*_ours(plain, case, latents, None), ref_lat, ref_frames)
    measured("lora/two_experts/merged/frames_max_abs", errors[2], effect_of_lora_2=control[2],
             latents_max_abs=errors[0])
    assert errors[2] < TOL_FRAMES, errors
    assert control[2] > 30 * TOL_FRAMES, control
    loras = fmt.read_manifest(ck)["loras"]
    assert [r["file"] for r in loras["transformer"]] == [a.name] and loras["transformer_2"][0]["strength"] == 0.6


def test_two_loras_stacked(tiny_repos, t2v, tmp_path, measured):
    """Two LoRAs with their own strengths, merged in order == diffusers' two adapters fused; the second
    one's effect is far above the tolerance (a control with the first one alone)."""
    a = _lora(tiny_repos[T2V], tmp_path, "original", seed=1)
    b = _lora(tiny_repos[T2V], tmp_path, "kohya", seed=2)
    ck = _convert(tiny_repos[T2V], tmp_path / "ck", {"transformer": [f"{a}:0.7", f"{b}:-0.4"]})
    latents, (ref_lat, ref_frames) = _case_run(tiny_repos, t2v, T2V, prepare=_fuse([a, b], [0.7, -0.4]))
    errors = _errors(*_ours(WanPipeline.from_converted(ck, dtype="float32"), T2V_CASE, latents, None),
                     ref_lat, ref_frames)
    one = t2v.replace()
    try:
        one.set_loras([f"{a}:0.7"])
        control = _errors(*_ours(one, T2V_CASE, latents, None), ref_lat, ref_frames)
    finally:
        one.set_loras()
    measured("lora/stacked/merged/frames_max_abs", errors[2], effect_of_second=control[2], latents_max_abs=errors[0])
    assert errors[2] < TOL_FRAMES, errors
    assert control[2] > 30 * TOL_FRAMES, control
    assert [r["strength"] for r in fmt.read_manifest(ck)["loras"]["transformer"]] == [0.7, -0.4]


def test_strength_zero_is_no_lora_bitwise(tiny_repos, converted_f32, tmp_path):
    """Two LoRAs at strength 0: every array equals the plain conversion's, bit for bit (the manifest still
    records them); at 0.8 exactly the leaves the LoRA names differ (so the comparison sees a change)."""
    a = _lora(tiny_repos[T2V], tmp_path, "original", seed=1)
    b = _lora(tiny_repos[T2V], tmp_path, "diffusers", seed=2)
    plain = _arrays(converted_f32(T2V))
    zero = _arrays(_convert(tiny_repos[T2V], tmp_path / "zero", {"transformer": [f"{a}:0", f"{b}:0.0"]}))
    assert plain.keys() == zero.keys()
    same = [k for k in plain if plain[k].dtype == zero[k].dtype and np.array_equal(
        plain[k].view(f"u{plain[k].dtype.itemsize}"), zero[k].view(f"u{zero[k].dtype.itemsize}"))]
    assert same == list(plain)
    assert [r["strength"] for r in fmt.read_manifest(tmp_path / "zero")["loras"]["transformer"]] == [0.0, 0.0]
    some = _arrays(_convert(tiny_repos[T2V], tmp_path / "some", {"transformer": [f"{a}:0.8"]}))
    changed = {k for k in plain if not np.array_equal(plain[k], some[k])}
    assert changed == {f"transformer/{d.path}" for d in L.read(a).deltas}, changed


def test_bf16_merge_is_the_float32_sum_rounded(tmp_path):
    """--dtype bfloat16: a merged weight is W + s * (alpha / r) * up @ down, computed here in float32 from the
    source, then rounded to nearest even; a block the LoRA leaves out keeps the plain cast."""
    import ml_dtypes
    import tensorstore as ts

    modules = {m: v for m, v in lora_modules(TINY).items() if m.startswith("blocks.1.")}
    f = write_lora(tmp_path / "l.safetensors", modules, "original")
    ck = _convert(TINY, tmp_path / "ck", {"transformer": [f"{f}:0.8"]}, weights_dtype="bfloat16", only=["transformer"])
    stored = ts.open(fmt.zarr_spec(ck / "transformer", "blocks.attn1.to_q.weight"), open=True).result().read().result()
    comp = Component(TINY / "transformer")
    try:
        w = [np.array(comp.array(f"blocks.{i}.attn1.to_q.weight")) for i in range(2)]
    finally:
        comp.close()
    down, up, alpha = modules["blocks.1.attn1.to_q"]
    want = w[1] + np.float32(0.8) * (np.float32(alpha / down.shape[0]) * (up @ down))
    assert np.array_equal(stored[1].view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.array_equal(stored[0].view(np.uint16), w[0].astype(ml_dtypes.bfloat16).view(np.uint16))
    assert not np.array_equal(stored[1], w[1].astype(ml_dtypes.bfloat16))


def test_hook_touches_only_the_lora_targets(tmp_path):
    """``with_loras`` puts a LoraMerge before the Cast of exactly the leaves a LoRA of nonzero strength names;
    a layer it does not touch passes through unchanged (the same array)."""
    modules = {m: v for m, v in lora_modules(TINY).items() if m.startswith("blocks.0.attn1.")}
    lo = L.read(write_lora(tmp_path / "l.safetensors", modules, "kohya"), 0.5)
    comp = Component(TINY / "transformer")
    try:
        tree = fmt.component_tree("transformer", comp.config)
        targets = {t.path: t for t in plan("transformer", comp.tensors, tree, with_loras({"transformer": [lo]}))}
        zero = plan("transformer", comp.tensors, tree, with_loras({"transformer": [lo.with_strength(0)]}))
        x = np.array(comp.array("blocks.1.attn1.to_q.weight"))
    finally:
        comp.close()
    merging = {p for p, t in targets.items() if any(isinstance(s, LoraMerge) for s in t.transforms)}
    assert merging == {d.path for d in lo.deltas} and len(merging) == 4
    assert [type(s) for s in targets["blocks.attn1.to_q.weight"].transforms] == [LoraMerge, Cast]
    assert targets["blocks.attn2.to_q.weight"].transforms == [Cast("bfloat16")]
    assert not any(isinstance(s, LoraMerge) for t in zero for s in t.transforms)
    step = targets["blocks.attn1.to_q.weight"].transforms[0]
    assert step.apply(x, {}, 1) is x
    assert not np.array_equal(step.apply(x, {}, 0), x)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wan_convert.cli", *map(str, args)], capture_output=True, text=True)


def _one_line_error(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)


def test_verify_replays_the_merge(tmp_path):
    """verify --source with the same --lora files passes; without them, with one altered (sha256), missing,
    or at another strength, a one-line error naming the file; through the CLI too."""
    a = write_lora(tmp_path / "a.safetensors", lora_modules(TINY, seed=1), "original")
    b = write_lora(tmp_path / "b.safetensors", lora_modules(TINY, seed=2), "kohya")
    ck = _convert(TINY, tmp_path / "ck", {"transformer": [f"{a}:0.8", f"{b}:-0.3"]}, weights_dtype="bfloat16")
    assert verify(ck, str(TINY), loras={"transformer": [str(a), f"{b}:-0.3"]}) > 0
    run = _cli("verify", ck, "--source", TINY, "--lora", f"{a}:0.8", "--lora", b)
    assert run.returncode == 0 and run.stdout.startswith("ok:"), run.stderr
    with pytest.raises(VerifyError, match="0 LoRA file.* given, but 2 were merged .*a.safetensors, b.safetensors"):
        verify(ck, str(TINY))
    with pytest.raises(VerifyError, match="--lora .*b.safetensors: strength 0.3, but it was merged at -0.3"):
        verify(ck, str(TINY), loras={"transformer": [str(a), f"{b}:0.3"]})
    with pytest.raises(VerifyError, match="--lora .*gone.safetensors: no such file"):
        verify(ck, str(TINY), loras={"transformer": [str(a), str(tmp_path / "gone.safetensors")]})
    altered = tmp_path / "altered" / "b.safetensors"
    altered.parent.mkdir()
    shutil.copy(b, altered)
    data = bytearray(altered.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    altered.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="b.safetensors: sha256 .* differs from that of b.safetensors"):
        verify(ck, str(TINY), loras={"transformer": [str(a), str(altered)]})
    run = _cli("verify", ck, "--source", TINY, "--lora", a, "--lora", altered)
    _one_line_error(run, str(altered), "sha256", "differs")


@pytest.mark.parametrize("case", ["unknown", "mis-shaped", "lora-2", "strength", "missing", "only"])
def test_bad_lora_through_the_cli(case, tmp_path):
    """Exit 2, one line naming the key (module, flag or file), nothing written at OUTPUT or beside it."""
    from safetensors.numpy import save_file

    good = write_lora(tmp_path / "good.safetensors", lora_modules(TINY), "original")
    bad = tmp_path / "bad.safetensors"
    args, needles = ["--lora", bad], [str(bad)]
    if case == "unknown":
        save_file({"diffusion_model.blocks.0.self_attn.q.dora_scale": np.ones((1, 8), np.float32)}, str(bad))
        needles.append("key diffusion_model.blocks.0.self_attn.q.dora_scale")
    elif case == "mis-shaped":
        wrong = {m: (np.zeros((4, 7), np.float32), u, al) for m, (d, u, al) in lora_modules(TINY).items()}
        write_lora(bad, wrong, "original")
        needles += ["module blocks.0.", "delta shape"]
    elif case == "lora-2":
        args, needles = ["--lora", good, "--lora-2", good], ["--lora-2", "has one transformer"]
    elif case == "strength":
        args, needles = ["--lora", f"{good}:strong"], ["--lora", "strength 'strong' is not a number"]
    elif case == "missing":
        needles.append("no such LoRA file")
    else:
        args, needles = ["--lora", good, "--only", "vae"], ["--lora", "transformer is not converted"]
    out = tmp_path / "out" / "ck"
    _one_line_error(_cli(TINY, out, *args), *needles)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_ignore_unknown_skips_and_lists(tmp_path):
    """--lora-ignore-unknown: the unknown key is skipped with a warning naming it, the rest is merged (and
    verify replays it); without the flag the same file is refused naming the key."""
    from safetensors.numpy import load_file, save_file

    good = write_lora(tmp_path / "good.safetensors", lora_modules(TINY), "original")
    extra = tmp_path / "extra.safetensors"
    save_file({**load_file(str(good)), "diffusion_model.blocks.0.self_attn.q.dora_scale": np.ones((1, 8), np.float32)},
              str(extra))
    _one_line_error(_cli(TINY, tmp_path / "no", "--lora", extra, "--only", "transformer"), "dora_scale")
    run = _cli(TINY, tmp_path / "ck", "--lora", f"{extra}:0.5", "--lora-ignore-unknown", "--only", "transformer",
               "--dtype", "float32", "--verify")
    assert run.returncode == 0, run.stderr
    assert "warning" in run.stderr and "skipped 1 unknown key(s): diffusion_model.blocks.0.self_attn.q.dora_scale" \
        in run.stderr, run.stderr
    assert "verified" in run.stdout
    manifest = json.loads((tmp_path / "ck" / fmt.MANIFEST).read_text())
    assert manifest["loras"]["transformer"][0]["strength"] == 0.5
