"""wan-convert on every tiny family: bitwise values, trees, chunk layout, atomicity, CLI errors."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FAMILIES
from wan_convert.convert import OutputError, convert
from wan_convert.mapping import plan
from wan_convert.source import Component, SourceError, resolve
from wan_convert.verify import VerifyError, verify
from wan_runtime import format as fmt
from wan_runtime import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read(folder: pathlib.Path, path: str) -> np.ndarray:
    import tensorstore as ts

    return ts.open(fmt.zarr_spec(folder, path), open=True).result().read().result()


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_bitwise_and_tree(family, tiny_repos, converted):
    torch = pytest.importorskip("torch")
    src, out = tiny_repos[family], converted[family]
    manifest = fmt.read_manifest(out)
    assert manifest["family"] == family
    assert verify(out, str(src)) > 0
    for component in manifest["components"]:
        comp = Component(src / component)
        tree = fmt.component_tree(component, comp.config, "bfloat16")
        seen_bf16 = seen_fp32 = 0
        for tgt in plan(component, comp.tensors, tree):
            got = _read(out / component, tgt.path)
            assert got.shape == tgt.leaf.shape and got.dtype == fmt.np_dtype(tgt.leaf.dtype), tgt.path
            for i, info in enumerate(tgt.sources):
                source = comp.array(info.name)
                stored = got[i] if tgt.stacked else got
                if tgt.leaf.dtype == "bfloat16":
                    ref = torch.from_numpy(source.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                    assert np.array_equal(stored.view(np.uint16).reshape(-1), ref.reshape(-1)), (component, tgt.path, i)
                    seen_bf16 += 1
                else:
                    assert tgt.leaf.dtype == "float32"
                    assert np.array_equal(stored.view(np.uint32).reshape(-1), source.view(np.uint32).reshape(-1))
                    seen_fp32 += 1
        assert seen_bf16 > 0
        if component.startswith("transformer") or component == "vae":
            assert seen_fp32 > 0, component  # modulation tables, norms and VAE gammas stay float32


def test_kept_fp32_rule():
    assert fmt.stored_dtype("blocks.scale_shift_table", "bfloat16") == "float32"
    assert fmt.stored_dtype("blocks.norm2.weight", "bfloat16") == "float32"
    assert fmt.stored_dtype("blocks.attn1.norm_q.weight", "bfloat16") == "float32"
    assert fmt.stored_dtype("condition_embedder.time_embedder.linear_1.weight", "bfloat16") == "float32"
    assert fmt.stored_dtype("decoder.up_blocks.0.resnets.0.norm1.gamma", "bfloat16") == "float32"
    assert fmt.stored_dtype("blocks.attn1.to_q.weight", "bfloat16") == "bfloat16"
    assert fmt.stored_dtype("condition_embedder.time_proj.weight", "bfloat16") == "bfloat16"
    assert fmt.stored_dtype("blocks.ffn.wo.weight", "bfloat16") == "bfloat16"
    assert fmt.stored_dtype("blocks.ffn.wo.weight", "float16") == "float32"


def test_tree_matches_runtime_abstract_tree(converted):
    """The on-disk Orbax metadata lists exactly the runtime tree's leaves, with its shapes and dtypes."""
    import orbax.checkpoint as ocp

    for family, out in converted.items():
        for component in fmt.read_manifest(out)["components"]:
            cfg = json.loads((out / component / "config.json").read_text())
            want = {p: (leaf.shape, leaf.dtype) for p, leaf in fmt.flatten(fmt.component_tree(component, cfg)).items()}
            meta = ocp.PyTreeCheckpointer().metadata(out / component)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
            got = {p: (tuple(m.shape), np.dtype(m.dtype).name) for p, m in fmt.flatten(tree).items()}
            assert got == want, (family, component)


def test_sharded_layout_and_plain_orbax_restore(tiny_repos, tmp_path, monkeypatch):
    """Chunks are the shards of the --mesh, one layer deep, or every layer deep for a leaf whose layer is
    under SMALL_LAYER_CHUNK (here 1 KiB, so the tiny model has both kinds, as a real one does); plain
    Orbax restores the checkpoint, numpy and sharded."""
    import jax
    import orbax.checkpoint as ocp

    assert len(jax.devices()) == 8, "conftest should provide 8 simulated CPU devices"
    src = tiny_repos["wan2.1-t2v"]
    monkeypatch.setattr(sharding, "SMALL_LAYER_CHUNK", 1024)  # the tiny matrices (>= 1152 B a layer) stay a layer deep
    out = convert(str(src), tmp_path / "ck8", mesh="fsdp=4,tensor=2").output
    assert fmt.read_manifest(out)["mesh"] == "data=1,fsdp=4,context=1,tensor=2"
    mesh_shape = sharding.parse_mesh("fsdp=4,tensor=2")
    mesh = sharding.make_mesh(mesh_shape)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    tree = fmt.component_tree("transformer", cfg)
    sharded, depth = 0, {1: 0, 2: 0}
    for path, leaf in fmt.flatten(tree).items():
        zarr = json.loads((out / "transformer" / path / "zarr.json").read_text())
        chunk = tuple(zarr["chunk_grid"]["configuration"]["chunk_shape"])
        s = sharding.named_sharding(mesh, leaf.shape, leaf.axes)
        shard = s.shard_shape(leaf.shape)
        small = np.prod(leaf.shape[1:]) * fmt.np_dtype(leaf.dtype).itemsize < 1024
        expect = tuple(1 if a == "layers" and not small else d for a, d in zip(leaf.axes, shard))
        assert chunk == expect, path
        sharded += shard != leaf.shape
        if leaf.axes[:1] == ("layers",):
            depth[chunk[0]] += 1
            files = [f for f in (out / "transformer" / path / "c").rglob("*") if f.is_file()]
            assert len(files) == np.prod([-(-n // c) for n, c in zip(leaf.shape, chunk)]), path
    assert sharded >= 10  # the attention / FFN weights really are split (measured: 25 leaves)
    assert depth == {1: 10, 2: 17}, depth  # 10 matrices a layer deep; biases, norms, scale_shift_table: both layers
    # plain orbax: numpy restore without a target, and a sharded restore with one
    restored = ocp.PyTreeCheckpointer().restore(out / "transformer")
    w = restored["blocks"]["attn1"]["to_q"]["weight"]
    assert w.shape == fmt.flatten(tree)["blocks.attn1.to_q.weight"].shape
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, fmt.np_dtype(leaf.dtype),
                                          sharding=sharding.named_sharding(mesh, leaf.shape, leaf.axes)),
        tree, is_leaf=lambda x: isinstance(x, fmt.Leaf))
    arrays = ocp.StandardCheckpointer().restore(out / "transformer", target)
    q = arrays["blocks"]["attn1"]["to_q"]["weight"]
    assert q.sharding.spec == target["blocks"]["attn1"]["to_q"]["weight"].sharding.spec
    assert np.array_equal(np.asarray(q).view(np.uint16), np.asarray(w).view(np.uint16))


def test_small_stacked_leaves_are_one_chunk_across_layers():
    """``sharding.chunk_shape`` on the 1.3B shapes: a stacked leaf whose layer is under SMALL_LAYER_CHUNK
    (biases, norms, modulation tables, quantized weights' scales) has every layer in each chunk, so one file
    per shard; a weight matrix stays one layer deep, in bf16 and in float8 (2.25 MiB a layer); the other axes
    are chunked as the mesh shards them either way."""
    one, tp = sharding.parse_mesh(None), sharding.parse_mesh("tensor=8")
    w, b = ("layers", "heads", "embed"), ("layers", "heads")
    assert sharding.SMALL_LAYER_CHUNK == 1 << 20
    assert sharding.chunk_shape((30, 1536), b, one, 2) == (30, 1536)  # a bias
    assert sharding.chunk_shape((30, 6, 1536), ("layers", None, "embed"), one, 4) == (30, 6, 1536)
    assert sharding.chunk_shape((30, 8960), ("layers", "mlp"), one, 4) == (30, 8960)  # fc_in.weight_scale
    assert sharding.chunk_shape((30, 1536, 1536), w, one, 2) == (1, 1536, 1536)
    assert sharding.chunk_shape((30, 1536, 1536), w, one, 1) == (1, 1536, 1536)  # float8: 2.25 MiB a layer
    assert sharding.chunk_shape((30, 8960), ("layers", "mlp"), tp, 4) == (30, 1120)  # a shard's part of every layer
    assert sharding.chunk_shape((30, 1536, 1536), w, tp, 1) == (1, 192, 1536)  # the whole layer decides, not a shard
    # just under / at the threshold
    rows = sharding.SMALL_LAYER_CHUNK // (4 * 1024)
    assert sharding.chunk_shape((40, rows - 1, 1024), w, one, 4)[0] == 40
    assert sharding.chunk_shape((40, rows, 1024), w, one, 4)[0] == 1
    # a small leaf of so many layers that one chunk would pass target_bytes: rows of layers, as many in each
    # (11 would do, 20 divides 100: no padded last row); a weight's rows split anywhere (a padded edge chunk)
    assert sharding.chunk_shape((100, 1000), b, one, 1000, target_bytes=10 << 20) == (20, 1000)
    assert sharding.chunk_shape((1, 100, 1 << 20), w, one, 1, target_bytes=10 << 20) == (1, 10, 1 << 20)
    assert sharding.chunk_shape((1, 100, 1 << 20), w, one, 1, target_bytes=12 << 20) == (1, 12, 1 << 20)


def test_old_per_layer_checkpoint_restores(tiny_repos, converted, tmp_path):
    """A checkpoint written before small leaves were chunked across layers (every stacked leaf a layer deep):
    its zarr.json says so, and restore (direct reader and TensorStore) reads it with the same bits."""
    import jax
    import tensorstore as ts

    from wan_runtime import checkpoint as C

    new = converted["wan2.1-t2v"]
    old = pathlib.Path(shutil.copytree(new, tmp_path / "old"))
    folder = old / "transformer"
    cfg = json.loads((folder / "config.json").read_text())
    rewritten = 0
    for path, leaf in fmt.flatten(fmt.component_tree("transformer", cfg)).items():
        meta = json.loads((folder / path / "zarr.json").read_text())
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
        if leaf.axes[:1] == ("layers",) and chunk[0] > 1:
            value = _read(folder, path)
            shutil.rmtree(folder / path)
            ts.open(fmt.zarr_spec(folder, path, leaf, (1, *chunk[1:])), create=True).result().write(value).result()
            assert len(list((folder / path / "c").iterdir())) == leaf.shape[0]
            rewritten += 1
    assert rewritten == 27  # every stacked leaf of the tiny model is small
    assert fmt.read_manifest(old)["format_version"] == fmt.read_manifest(new)["format_version"]
    one = sharding.make_mesh(sharding.parse_mesh(None), jax.devices()[:1])
    want = fmt.flatten(C.restore_component(C.open_checkpoint(new), "transformer", one))
    for mesh in (one, sharding.make_mesh(sharding.parse_mesh("fsdp=4,tensor=2"))):
        for direct in (True, False):
            got = fmt.flatten(C.restore_component(C.open_checkpoint(old), "transformer", mesh, direct=direct))
            for path, x in want.items():
                assert np.array_equal(np.asarray(got[path]).view(np.uint8), np.asarray(x).view(np.uint8)), path
    assert verify(old, str(tiny_repos["wan2.1-t2v"])) > 0


def test_refuses_existing_output_without_force(tiny_repos, tmp_path):
    src = tiny_repos["wan2.1-t2v"]
    out = convert(str(src), tmp_path / "ck").output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="already exists"):
        convert(str(src), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    convert(str(src), out, force=True, weights_dtype="float32")
    assert fmt.read_manifest(out)["dtype_policy"]["weights"] == "float32"
    assert not list(tmp_path.glob(".ck.*")), "temporary siblings must be gone"


def test_cli_errors_are_one_line_exit_2(tiny_repos, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "wan_convert.cli", *args], capture_output=True, text=True, env=env)

    r = run(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(tiny_repos["wan2.1-t2v"], bad)
    (bad / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00")
    r = run(str(bad), str(tmp_path / "out2"))
    assert r.returncode == 2 and "diffusion_pytorch_model.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out2").exists()
    r = run(str(tiny_repos["wan2.1-t2v"]), str(tmp_path / "out3"), "--mesh", "fsdp=x")
    assert r.returncode == 2 and "--mesh" in r.stderr
    ok = run(str(tiny_repos["wan2.1-t2v"]), str(tmp_path / "out4"), "--verify", "-q")
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout
    v = run("verify", str(tmp_path / "out4"), "--source", str(tiny_repos["wan2.1-t2v"]))
    assert v.returncode == 0 and "bit for bit" in v.stdout


def test_verify_detects_a_changed_value(tiny_repos, tmp_path):
    import tensorstore as ts

    src = tiny_repos["wan2.1-t2v"]
    out = convert(str(src), tmp_path / "ck").output
    arr = ts.open(fmt.zarr_spec(out / "transformer", "blocks.ffn.fc_in.weight"), open=True).result()
    x = arr[1].read().result()
    x.view(np.uint16)[0, 0] ^= 1
    arr[1].write(x).result()
    with pytest.raises(VerifyError, match=r"blocks.ffn.fc_in.weight layer 1"):
        verify(out, str(src))


def test_hub_repo_id_from_local_cache(tiny_repos, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache layout with the hub offline."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--Wan-AI--Tiny-Wan-Diffusers" / "snapshots" / commit
    shutil.copytree(tiny_repos["wan2.1-t2v"], snap)
    (cache / "models--Wan-AI--Tiny-Wan-Diffusers" / "refs").mkdir()
    (cache / "models--Wan-AI--Tiny-Wan-Diffusers" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    repo = resolve("Wan-AI/Tiny-Wan-Diffusers")
    assert repo.root == snap and repo.revision == commit
    out = convert("Wan-AI/Tiny-Wan-Diffusers", tmp_path / "ck").output
    m = fmt.read_manifest(out)
    assert m["source"]["id"] == "Wan-AI/Tiny-Wan-Diffusers" and m["source"]["revision"] == commit
    with pytest.raises(SourceError, match="Wan-AI/Missing"):
        resolve("Wan-AI/Missing")


# ---------------------------------------------------------------- corner values of the cast
#: float32 bit patterns written into source tensors; each must convert to the bits torch's
#: ``.to(torch.bfloat16)`` / ``.to(torch.float16)`` gives.
CORNERS = {
    # bfloat16 keeps the top 16 bits: a low half of 0x8000 is an exact tie, rounded to the even neighbour
    0x3F808000: "1 + 2^-8: bf16 tie, even neighbour below (down to 1.0)",
    0x3F818000: "1 + 3 * 2^-8: bf16 tie, even neighbour above (up)",
    0xBF808000: "negative tie, rounds toward zero",
    0xBF818000: "negative tie, rounds away from zero",
    0x3FFF8000: "tie whose rounding carries into the exponent (up to 2.0)",
    0x3F808001: "one bit above a tie (up)",
    0x3F817FFF: "one bit below a tie (down)",
    0x7F7F7FFF: "rounds to the largest finite bf16",
    0x7F7F8000: "tie above the largest finite bf16: overflows to +inf",
    0x7F7FFFFF: "largest finite float32: overflows to +inf",
    0xFF7FFFFF: "most negative finite float32: overflows to -inf",
    0x7F800000: "+inf",
    0xFF800000: "-inf",
    0x00000000: "+0",
    0x80000000: "-0",
    0x00000001: "smallest float32 denormal: to +0",
    0x80000001: "smallest negative float32 denormal: to -0",
    0x00008000: "denormal tie, even neighbour below (to +0)",
    0x00018000: "denormal tie, even neighbour above (to the bf16 denormal 0x0002)",
    0x00010000: "a bf16 denormal, exact",
    0x00123456: "rounds to a bf16 denormal",
    0x807FFFFF: "largest negative float32 denormal: up to the smallest normal bf16",
    # float16 (the --dtype float16 target): 10 mantissa bits, largest finite 65504, denormals below 2^-14
    0x3F801000: "1 + 2^-11: float16 tie, down",
    0x3F803000: "1 + 3 * 2^-11: float16 tie, up",
    0xBF803000: "negative float16 tie, away from zero",
    0x477FEFFF: "just below 65520: to 65504, the largest finite float16",
    0x477FF000: "65520: float16 tie above the largest finite: +inf",
    0xC77FF000: "-65520: -inf in float16",
    0x47800000: "65536: +inf in float16",
    0x33000000: "2^-25: float16 denormal tie, to +0",
    0x33C00000: "3 * 2^-25: float16 denormal tie, up to 2^-23",
    0x33800000: "2^-24: the smallest float16 denormal",
    0x387FF000: "just below 2^-14: up out of the float16 denormals to the smallest normal",
}
NANS = {
    0x7FC00000: "quiet NaN",
    0xFFC00000: "negative quiet NaN",
    0x7FC00001: "quiet NaN, lowest payload bit (below the bf16 and float16 mantissas)",
    0x7FFFFFFF: "quiet NaN, every payload bit",
    0x7F800001: "signalling NaN, lowest payload bit (a rounding bit trick turns it into +inf)",
    0x7FA00000: "signalling NaN, high payload bit",
    0xFF800001: "negative signalling NaN",
}
#: source tensors that get the corner values: a layer of a stacked leaf, a whole unstacked leaf, and a
#: leaf kept in float32 (which must keep every bit, NaN payloads included)
CORNER_TENSORS = ("blocks.1.ffn.net.0.proj.weight", "proj_out.weight",
                  "condition_embedder.time_embedder.linear_1.weight")


def _write_corners(repo: pathlib.Path, dest: pathlib.Path) -> tuple[pathlib.Path, dict, np.ndarray]:
    """A copy of ``repo`` whose CORNER_TENSORS hold every corner and NaN pattern at spread-out positions,
    rewritten with safetensors' own writer (same names, shapes and files: the shard index stays valid)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    src = pathlib.Path(shutil.copytree(repo, dest))
    folder = src / "transformer"
    weight_map = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    bits = np.array([*CORNERS, *NANS], np.uint32)
    positions = {}
    for file in sorted({weight_map[n] for n in CORNER_TENSORS}):
        with safe_open(folder / file, "np") as f:
            metadata = f.metadata()
        tensors = load_file(folder / file)
        for name in (n for n in CORNER_TENSORS if weight_map[n] == file):
            t = np.array(tensors[name], copy=True)
            assert t.dtype == np.float32 and t.size >= 4 * len(bits), (name, t.dtype, t.shape)
            pos = np.linspace(0, t.size - 1, len(bits)).astype(np.int64)
            t.reshape(-1).view(np.uint32)[pos] = bits
            tensors[name], positions[name] = t, pos
        save_file(tensors, folder / file, metadata=metadata)
    return src, positions, bits


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered in cast:RuntimeWarning")  # inf / NaN input
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_corner_values(dtype, tiny_repos, tmp_path):
    """Rounding ties both ways and both signs, overflow to inf, denormals, +-0, +-inf and NaNs written into
    the safetensors of a tiny repo: every non-NaN converts to torch's bits exactly, a NaN stays a NaN
    with its sign (see below for the payload), kept-float32 leaves keep every bit; verify --source passes."""
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from wan_convert.cli import main

    ties = [b for b in CORNERS if b & 0xFFFF == 0x8000]  # the bf16 ties cover both directions and signs
    assert {(b >> 31, (b >> 16) & 1) for b in ties} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    src, positions, bits = _write_corners(tiny_repos["wan2.1-t2v"], tmp_path / "src")
    out = convert(str(src), tmp_path / "ck", weights_dtype=dtype, only=["transformer"], hash_source=False).output
    comp = Component(src / "transformer")
    tree = fmt.component_tree("transformer", comp.config, dtype)
    where = {info.name: (tgt, i) for tgt in plan("transformer", comp.tensors, tree) for i, info in enumerate(tgt.sources)}
    kinds = set()
    for name, pos in positions.items():
        source = comp.array(name).reshape(-1)
        assert np.array_equal(source.view(np.uint32)[pos], bits), name  # the converter reads the corners
        tgt, i = where[name]
        stored = _read(out / "transformer", tgt.path)
        stored = (stored[i] if tgt.stacked else stored).reshape(-1)
        kinds.add(tgt.leaf.dtype)
        if tgt.leaf.dtype == "float32":  # kept float32: the source bits, signalling NaN payloads included
            assert np.array_equal(stored.view(np.uint32), source.view(np.uint32)), name
            continue
        assert tgt.leaf.dtype == dtype, (name, tgt.leaf.dtype)
        got = stored.view(np.uint16)
        ref = torch.from_numpy(source.copy()).to(getattr(torch, dtype)).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(source)
        assert int(nan.sum()) == len(NANS), name
        wrong = np.flatnonzero((got != ref) & ~nan)
        assert wrong.size == 0, [(hex(source.view(np.uint32)[j]), hex(got[j]), hex(ref[j])) for j in wrong[:8]]
        # NaN: torch is not an oracle for the payload. Measured with torch 2.13 (CPU): .to(bfloat16) writes
        # 0xFFFF for every NaN (a negative NaN, the sign lost); .to(float16) (F16C) quiets signalling NaNs.
        # We cast with numpy / ml_dtypes: bfloat16 gets the canonical quiet NaN with the source's sign;
        # float16 keeps the sign and the payload's top 10 bits (a zero one becomes 1), so a quiet NaN gets
        # torch's bits and a signalling NaN stays signalling. Either way a NaN stays a NaN, never an inf.
        s = source.view(np.uint32)[nan]
        sign = ((s >> 31) << 15).astype(np.uint16)
        if dtype == "bfloat16":
            expect = sign | 0x7FC0
        else:
            expect = sign | 0x7C00 | np.maximum((s & 0x7FFFFF) >> 13, 1).astype(np.uint16)
            quiet = (s & 0x400000) != 0
            assert np.array_equal(got[nan][quiet], ref[nan][quiet])
        assert np.array_equal(got[nan], expect), ([hex(x) for x in s], [hex(x) for x in got[nan]])
        assert np.all(np.isnan(ref[nan].view(np.float16 if dtype == "float16" else fmt.np_dtype("bfloat16"))))
    assert kinds == {dtype, "float32"}
    r = CliRunner().invoke(main, ["verify", str(out), "--source", str(src)], prog_name="wan-convert")
    assert r.exit_code == 0 and "bit for bit" in r.output, r.output
