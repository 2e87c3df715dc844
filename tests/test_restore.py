"""The direct chunk reader (checkpoint.restore_component) against the TensorStore path: same bits, same
shardings, on one device and on an 8-device mesh, for matching and non-matching chunk layouts, with chunk
files mapped and read; corrupt, truncated, overlong and missing chunks are errors naming the array;
arrays it does not read itself fall back to TensorStore."""
import json
import shutil

import numpy as np
import pytest

from wan_runtime import checkpoint as C
from wan_runtime import format as fmt
from wan_runtime import sharding as shd


def _restore(ck, component, mesh, direct):
    return fmt.flatten(C.restore_component(C.open_checkpoint(ck), component, mesh, direct=direct))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for path in a:
        x, y = a[path], b[path]
        assert x.shape == y.shape and x.dtype == y.dtype and x.sharding == y.sharding, path
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), path


def _one_device():
    import jax

    return shd.make_mesh(shd.parse_mesh(None), jax.devices()[:1])


def test_direct_equals_tensorstore_one_device(converted):
    ck = converted["wan2.1-i2v"]  # every component kind: text and image encoders, transformer, VAE
    for component in C.open_checkpoint(ck).components:
        direct = _restore(ck, component, _one_device(), True)
        _assert_same(direct, _restore(ck, component, _one_device(), False))


@pytest.mark.parametrize("convert_mesh", [None, "fsdp=4,tensor=2"])
def test_direct_equals_tensorstore_on_8_devices(tiny_repos, converted, tmp_path, convert_mesh):
    """Chunks laid out for the restore mesh (each a contiguous run of one shard) and for one device
    (each chunk scattered into the shards it overlaps)."""
    from wan_convert.convert import convert

    ck = converted["wan2.1-t2v"] if convert_mesh is None else \
        convert(str(tiny_repos["wan2.1-t2v"]), tmp_path / "ck", mesh=convert_mesh).output
    mesh = shd.make_mesh(shd.parse_mesh("fsdp=4,tensor=2"))
    direct = _restore(ck, "transformer", mesh, True)
    _assert_same(direct, _restore(ck, "transformer", mesh, False))
    assert sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in direct.values()) >= 10  # really split (measured: 25 of the 42 leaves, either layout)


def _copy(converted, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(converted["wan2.1-t2v"], ck)
    return ck


def _rewrite(ck, path, chunks, codecs):
    """Re-store one transformer leaf with TensorStore under another chunk grid / codecs."""
    import tensorstore as ts

    folder = ck / "transformer"
    value = ts.open(fmt.zarr_spec(folder, path), open=True).result().read().result()
    shutil.rmtree(folder / path)
    spec = fmt.zarr_spec(folder, path, fmt.Leaf(value.shape, value.dtype.name, (None,) * value.ndim), chunks)
    spec["metadata"]["codecs"] = codecs
    ts.open(spec, create=True).result().write(value).result()
    return value


def test_partial_edge_chunks_and_tensorstore_fallback(converted, tmp_path):
    ck = _copy(converted, tmp_path)
    crc = [dict(c) for c in fmt.ZARR_CODECS]
    edge = _rewrite(ck, "proj_out.weight", (5, 7), crc)  # (64, 24): padded edge chunks, read by the direct reader
    zstd = _rewrite(ck, "condition_embedder.time_proj.weight", (7, 5),
                    [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}])
    assert C._direct_chunks(ck / "transformer", "proj_out.weight", _leaf(ck, "proj_out.weight")) == (5, 7)
    assert C._direct_chunks(ck / "transformer", "condition_embedder.time_proj.weight",
                            _leaf(ck, "condition_embedder.time_proj.weight")) is None
    for mesh in (_one_device(), shd.make_mesh(shd.parse_mesh("fsdp=4,tensor=2"))):
        direct = _restore(ck, "transformer", mesh, True)
        _assert_same(direct, _restore(ck, "transformer", mesh, False))
        assert np.array_equal(np.asarray(direct["proj_out.weight"]).view(np.uint16), edge.view(np.uint16))
        assert np.array_equal(np.asarray(direct["condition_embedder.time_proj.weight"]).view(np.uint16),
                              zstd.view(np.uint16))


def _leaf(ck, path):
    cfg = json.loads((ck / "transformer" / "config.json").read_text())
    return fmt.flatten(fmt.component_tree("transformer", cfg))[path]


def test_corrupt_truncated_and_missing_chunks(converted, tmp_path):
    ck = _copy(converted, tmp_path)
    chunk = ck / "transformer" / "blocks.ffn.fc_in.weight" / "c" / "1" / "0" / "0"
    good = chunk.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    chunk.write_bytes(bytes(flipped))
    with pytest.raises(C.CheckpointError, match=r"blocks\.ffn\.fc_in\.weight: unreadable or corrupt "
                                                r"\(chunk c/1/0/0: crc32c mismatch\)"):
        _restore(ck, "transformer", _one_device(), True)
    with pytest.raises(C.CheckpointError, match=r"blocks\.ffn\.fc_in\.weight: unreadable or corrupt"):
        _restore(ck, "transformer", _one_device(), False)  # the same file through TensorStore
    for bad in (good[:-1], good[: len(good) // 2], good + b"\0"):
        chunk.write_bytes(bad)
        with pytest.raises(C.CheckpointError, match=rf"chunk c/1/0/0: {len(bad)} bytes, expected {len(good)}"):
            _restore(ck, "transformer", shd.make_mesh(shd.parse_mesh("fsdp=8")), True)
    chunk.unlink()
    for direct in (True, False):
        with pytest.raises(C.CheckpointError, match=r"blocks\.ffn\.fc_in\.weight: unreadable or corrupt .*missing"):
            _restore(ck, "transformer", _one_device(), direct)
    # a missing array names it
    shutil.rmtree(ck / "transformer" / "blocks.ffn.fc_in.weight")
    with pytest.raises(C.CheckpointError, match=r"blocks\.ffn\.fc_in\.weight: cannot open"):
        _restore(ck, "transformer", _one_device(), True)


def test_mapped_chunks(tmp_path, monkeypatch):
    """A transformer whose chunks fill whole pages (heads 2 x 128, FFN 512): chunk files are mapped into
    the shard buffers (counted), on one device and on 8; the same bits as TensorStore and as reading them."""
    import make_synthetic_checkpoint as msc
    from wan_convert.convert import convert

    if C._MMAP is None:
        pytest.skip("chunk files are mapped on Linux x86-64 / aarch64 only")
    monkeypatch.setitem(msc.MODELS, "page-test", dict(num_attention_heads=2, num_layers=2, ffn_dim=512))
    src = msc.write(tmp_path / "src", "page-test")
    one = convert(str(src), tmp_path / "one", only=["transformer"], hash_source=False).output
    eight = convert(str(src), tmp_path / "eight", only=["transformer"], mesh="fsdp=4,tensor=2", hash_source=False).output
    mapped = []
    real_map = C._map_chunk
    monkeypatch.setattr(C, "_map_chunk", lambda file, dest: mapped.append(file) or real_map(file, dest))
    mesh8 = shd.make_mesh(shd.parse_mesh("fsdp=4,tensor=2"))
    for ck, mesh in ((one, _one_device()), (eight, mesh8), (eight, _one_device()), (one, mesh8)):
        mapped.clear()
        direct = _restore(ck, "transformer", mesh, True)
        _assert_same(direct, _restore(ck, "transformer", mesh, False))
        n_mapped = len(mapped)
        with monkeypatch.context() as m:
            m.setattr(C, "_MMAP", None)  # every chunk read with preadv
            _assert_same(direct, _restore(ck, "transformer", mesh, True))
        assert len(mapped) == n_mapped  # nothing mapped without mmap
        if (ck == one) == (mesh is not mesh8):  # chunks laid out for this mesh: the weights are mapped
            # measured: 35 chunks mapped on one device, 190 on 8; the bound is the 2 layers x 8 attention
            # matrices, once per shard
            assert n_mapped >= 16 * len(mesh.devices.flat), n_mapped
    chunk = one / "transformer" / "blocks.attn1.to_q.weight" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    assert (len(data) - 4) % C._PAGE == 0
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match=r"blocks\.attn1\.to_q\.weight: unreadable or corrupt "
                                                r"\(chunk c/1/0/0: crc32c mismatch\)"):
        _restore(one, "transformer", _one_device(), True)
