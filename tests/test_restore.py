"""The direct chunk reader (checkpoint.restore_component) against the TensorStore path: same bits, same
shardings, on one device and on an 8-device mesh, for matching and non-matching chunk layouts, with chunk
files mapped and read; corrupt, truncated, overlong and missing chunks are errors naming the array;
arrays it does not read itself fall back to TensorStore. Staged restore: a replicated shard crosses the
host link once (1/N per holder, then an on-device all-gather compiled once per shape), with the same bits
as per-device copies, and a leaf's copies start while later leaves are still being read."""
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
    """Same leaves, shapes, dtypes, shardings and bits, on every device (a replicated array's
    ``np.asarray`` reads one device only)."""
    assert a.keys() == b.keys()
    for path in a:
        x, y = a[path], b[path]
        assert x.shape == y.shape and x.dtype == y.dtype and x.sharding == y.sharding, path
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), path
        want = {s.device: np.asarray(s.data) for s in y.addressable_shards}
        for s in x.addressable_shards:
            assert np.array_equal(np.asarray(s.data).view(np.uint8), want[s.device].view(np.uint8)), (path, s.device)


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
    # the tiny weights are small leaves (sharding.SMALL_LAYER_CHUNK): one chunk holds both layers
    chunk = ck / "transformer" / "blocks.ffn.fc_in.weight" / "c" / "0" / "0" / "0"
    good = chunk.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    chunk.write_bytes(bytes(flipped))
    with pytest.raises(C.CheckpointError, match=r"blocks\.ffn\.fc_in\.weight: unreadable or corrupt "
                                                r"\(chunk c/0/0/0: crc32c mismatch\)"):
        _restore(ck, "transformer", _one_device(), True)
    with pytest.raises(C.CheckpointError, match=r"blocks\.ffn\.fc_in\.weight: unreadable or corrupt"):
        _restore(ck, "transformer", _one_device(), False)  # the same file through TensorStore
    for bad in (good[:-1], good[: len(good) // 2], good + b"\0"):
        chunk.write_bytes(bad)
        with pytest.raises(C.CheckpointError, match=rf"chunk c/0/0/0: {len(bad)} bytes, expected {len(good)}"):
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
    monkeypatch.setattr(shd, "SMALL_LAYER_CHUNK", 64 << 10)  # the matrices (128 KiB a layer and up) a layer deep
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
            # measured: 52 chunks mapped on one device, 223 on 8 (35 and 190 when every stacked leaf was a
            # layer deep: a small leaf's one chunk now fills its shard's buffer to the end); the bound is the
            # 2 layers x 8 attention matrices, once per shard
            assert n_mapped >= 16 * len(mesh.devices.flat), n_mapped
    chunk = one / "transformer" / "blocks.attn1.to_q.weight" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    assert (len(data) - 4) % C._PAGE == 0
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match=r"blocks\.attn1\.to_q\.weight: unreadable or corrupt "
                                                r"\(chunk c/1/0/0: crc32c mismatch\)"):
        _restore(one, "transformer", _one_device(), True)


# ---------------------------------------------------------------------------- staged restore (issue #15)
@pytest.fixture(scope="module")
def page_ck(tmp_path_factory):
    """A synthetic transformer (heads 2 x 128, 2 layers, FFN 512; every leaf has a dimension 8 divides),
    converted for one device."""
    import make_synthetic_checkpoint as msc
    from wan_convert.convert import convert

    root = tmp_path_factory.mktemp("staged")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(msc.MODELS, "page-test", dict(num_attention_heads=2, num_layers=2, ffn_dim=512))
        src = msc.write(root / "src", "page-test")
    return convert(str(src), root / "ck", only=["transformer"], hash_source=False).output


@pytest.fixture
def host_bytes(monkeypatch):
    """Bytes of host (numpy) buffers handed to ``jax.device_put``, one entry per buffer and device."""
    import jax

    sent, real = [], jax.device_put

    def spy(x, *args, **kwargs):
        sent.extend(v.nbytes for v in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(v, np.ndarray))
        return real(x, *args, **kwargs)
    monkeypatch.setattr(jax, "device_put", spy)
    return sent


def _stage(m, min_bytes: int | None):
    """Staging on the simulated CPU devices from ``min_bytes`` up; None: never (per-device copies)."""
    m.setattr(C, "STAGE_ON_CPU", True)
    m.setattr(C, "STAGE_MIN_BYTES", 1 << 62 if min_bytes is None else min_bytes)


def _stored_bytes(ck):
    return C.open_checkpoint(ck).manifest["components"]["transformer"]["bytes"]


def _mesh(spec):
    return _one_device() if spec is None else shd.make_mesh(shd.parse_mesh(spec))


def test_stage_spec():
    mesh = dict(data=1, fsdp=4, context=1, tensor=2)
    assert shd.stage_spec(("fsdp", None), (16, 32), mesh) == (("fsdp", "tensor"), None)  # replicated over tensor
    assert shd.stage_spec((None, "tensor"), (3, 16), mesh) == (None, ("tensor", "fsdp"))  # first dim 4 divides
    assert shd.stage_spec((None,), (3,), mesh) is None  # 8 divides no dimension
    assert shd.stage_spec(("fsdp", "tensor"), (4, 4), mesh) is None  # replicated nowhere
    assert shd.stage_spec((), (16, 2), dict(data=8)) == (("data",), None)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "tensorstore"])
@pytest.mark.parametrize("mesh_spec", [None, "data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_staged_equals_unstaged(page_ck, host_bytes, monkeypatch, mesh_spec, direct):
    """Every leaf staged (threshold 0) against per-device copies: same bits on every device, same
    shardings; the host sends the stored bytes once (per-device copies send replicated shards N times)."""
    mesh, got, sent = _mesh(mesh_spec), {}, {}
    for min_bytes in (None, 0):
        with monkeypatch.context() as m:
            _stage(m, min_bytes)
            host_bytes.clear()
            got[min_bytes] = _restore(page_ck, "transformer", mesh, direct)
            sent[min_bytes] = sum(host_bytes)
    _assert_same(got[0], got[None])
    stored = _stored_bytes(page_ck)
    assert sent[0] == stored
    if mesh_spec is not None:  # something is replicated on every 8-device mesh here
        assert sent[None] > stored, sent
        assert sum(not x.sharding.is_fully_replicated for x in got[0].values()) >= (mesh_spec != "data=8") * 10


def test_staged_every_component(converted, host_bytes, monkeypatch):
    """Every component kind (text and image encoders, transformer, VAE: leaves of every rank, some that
    no dimension of 8 divides, which keep per-device copies) on a mesh that splits some leaves and
    replicates others: the same bits as per-device copies, fewer bytes sent."""
    ck, mesh = converted["wan2.1-i2v"], _mesh("fsdp=4,tensor=2")
    for component in C.open_checkpoint(ck).components:
        got, sent = {}, {}
        for min_bytes in (None, 0):
            with monkeypatch.context() as m:
                _stage(m, min_bytes)
                host_bytes.clear()
                got[min_bytes] = _restore(ck, component, mesh, True)
                sent[min_bytes] = sum(host_bytes)
        _assert_same(got[0], got[None])
        assert sent[0] < sent[None], (component, sent)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "tensorstore"])
def test_replicated_leaf_crosses_host_once(page_ck, host_bytes, monkeypatch, direct):
    """Everything replicated over 8 devices (mesh data=8). Staging only the largest leaves: each of them
    costs its bytes once, every other leaf 8 times; staging all: the component's stored bytes in total."""
    mesh, stored = _mesh("data=8"), _stored_bytes(page_ck)
    leaves = fmt.flatten(C.open_checkpoint(page_ck).abstract_tree("transformer"))
    size = {p: np.dtype(fmt.np_dtype(x.dtype)).itemsize * int(np.prod(x.shape)) for p, x in leaves.items()}
    big = max(size.values())
    for min_bytes, want in ((None, 8 * stored), (big, 8 * stored - 7 * sum(n for n in size.values() if n >= big)),
                            (0, stored)):
        with monkeypatch.context() as m:
            _stage(m, min_bytes)
            host_bytes.clear()
            out = _restore(page_ck, "transformer", mesh, direct)
            assert sum(host_bytes) == want, (min_bytes, sum(host_bytes), want)
            assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8 for x in out.values())


def test_gather_compiles_once_per_shape(page_ck, monkeypatch):
    """The all-gather is compiled once per distinct (shape, dtype), not per leaf, and not again on a
    second restore."""
    import jax

    compiles = []

    def listen(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)
    _stage(monkeypatch, 0)
    jax.clear_caches()
    C._gather.cache_clear()
    mesh = _mesh("data=8")
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        out = _restore(page_ck, "transformer", mesh, True)
        first = len(compiles)
        _restore(page_ck, "transformer", mesh, False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    shapes = {(x.shape, x.dtype) for x in out.values()}
    assert first == len(shapes) < len(out), (first, len(shapes), len(out))  # measured: 17 shapes, 42 leaves
    assert len(compiles) == first  # the TensorStore reader's restore reuses them


@pytest.mark.parametrize("overlap", [True, False])
def test_copies_start_while_reads_run(page_ck, monkeypatch, overlap):
    """The direct reader starts a leaf's device copies while another leaf's chunk is still being read: that
    read waits (up to 10 s) for the first ``jax.device_put``. With ``OVERLAP`` off it waits in vain."""
    import threading

    import jax

    put, waited, real_put, real_read = threading.Event(), [], jax.device_put, C._read_task
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: put.set() or real_put(*a, **k))

    def read(p, file, targets):
        if p.path == "scale_shift_table":  # one chunk
            waited.append(put.wait(10 if overlap else 0.5))
        return real_read(p, file, targets)
    monkeypatch.setattr(C, "_read_task", read)
    monkeypatch.setattr(C, "OVERLAP", overlap)
    out = _restore(page_ck, "transformer", _mesh("fsdp=4,tensor=2"), True)
    assert waited == [overlap] and len(out) == 42
