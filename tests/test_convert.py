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


def test_sharded_layout_and_plain_orbax_restore(tiny_repos, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    assert len(jax.devices()) == 8, "conftest should provide 8 simulated CPU devices"
    src = tiny_repos["wan2.1-t2v"]
    out = convert(str(src), tmp_path / "ck8", mesh="fsdp=4,tensor=2").output
    assert fmt.read_manifest(out)["mesh"] == "data=1,fsdp=4,context=1,tensor=2"
    mesh_shape = sharding.parse_mesh("fsdp=4,tensor=2")
    mesh = sharding.make_mesh(mesh_shape)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    tree = fmt.component_tree("transformer", cfg)
    sharded = 0
    for path, leaf in fmt.flatten(tree).items():
        zarr = json.loads((out / "transformer" / path / "zarr.json").read_text())
        chunk = tuple(zarr["chunk_grid"]["configuration"]["chunk_shape"])
        s = sharding.named_sharding(mesh, leaf.shape, leaf.axes)
        shard = s.shard_shape(leaf.shape)
        expect = tuple(1 if a == "layers" else d for a, d in zip(leaf.axes, shard))
        assert chunk == expect, path
        sharded += shard != leaf.shape
    assert sharded >= 10  # the attention / FFN weights really are split
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
