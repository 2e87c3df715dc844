"""Damaged or foreign checkpoints: a flipped byte, a truncated or missing chunk, a missing array, a
manifest of another format version or family, a partial checkpoint; a flipped byte or a truncation in a
chunk file that restore maps into memory (the path real weight matrices take). wan-run, the Python API
(``WanPipeline.from_converted``) and ``wan-convert verify`` name the file or array; nothing is silent."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from tests.reliability.conftest import assert_one_line_error, invoke, run_cli
from wan_runtime import format as fmt
from wan_runtime import sharding
from wan_runtime.checkpoint import CheckpointError, open_checkpoint
from wan_runtime.format import FormatError

ARRAY = ("transformer", "blocks.ffn.fc_in.weight")
RUN = ("--prompt", "a fox", "--height", "16", "--width", "16", "--frames", "1", "--steps", "1")


@pytest.fixture
def ck(converted, tmp_path):
    """A private copy of the converted tiny Wan 2.1 T2V checkpoint (tests damage it)."""
    return shutil.copytree(converted["wan2.1-t2v"], tmp_path / "ck")


def _chunk(ck, component=ARRAY[0], path=ARRAY[1]):
    return sorted(p for p in (ck / component / path / "c").rglob("*") if p.is_file())[0]


def _load(ck):
    from wan_runtime.pipeline import WanPipeline

    return WanPipeline.from_converted(ck, dtype="float32")


def flip_byte(ck):
    p = _chunk(ck)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    p.write_bytes(bytes(raw))


def truncate_chunk(ck):
    p = _chunk(ck)
    p.write_bytes(p.read_bytes()[:-6])


def test_flipped_byte_is_named_by_wan_run_api_and_verify(ck, tmp_path):
    flip_byte(ck)
    r = run_cli("wan-run", "--checkpoint", ck, *RUN, "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.returncode, r.stderr, "/".join(ARRAY), "corrupt")
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(CheckpointError, match="/".join(ARRAY)):
        _load(ck)
    r = invoke("wan-convert", "verify", ck)
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, "/".join(ARRAY), "corrupt")


def test_truncated_chunk(ck):
    truncate_chunk(ck)
    with pytest.raises(CheckpointError, match="/".join(ARRAY)):
        _load(ck)
    r = invoke("wan-convert", "verify", ck)
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, "/".join(ARRAY))


def test_missing_chunk_fails_verify(ck):
    _chunk(ck).unlink()
    r = invoke("wan-convert", "verify", ck)
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, "/".join(ARRAY), "missing")


def test_missing_chunk_fails_restore(ck):
    """The converter writes every chunk (zeros included), so a missing chunk file is damage, not zeros."""
    _chunk(ck).unlink()
    with pytest.raises(CheckpointError, match="/".join(ARRAY)):
        _load(ck)


def test_missing_array(ck):
    shutil.rmtree(ck / ARRAY[0] / ARRAY[1])
    with pytest.raises(CheckpointError, match="/".join(ARRAY)):
        _load(ck)
    r = invoke("wan-convert", "verify", ck)
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, ARRAY[1])


def test_intact_copy_loads_and_verifies(ck):
    """The damage tests above start from a checkpoint that is fine."""
    pipe = _load(ck)
    assert pipe.params["transformer"]["blocks"]["ffn"]["fc_in"]["weight"].shape[0] == 2
    r = invoke("wan-convert", "verify", ck)
    assert r.exit_code == 0 and "every chunk read back" in r.stdout


# ---------------------------------------------------------------- manifests
def _manifest(ck, fn):
    path = ck / fmt.MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


MANIFESTS = {
    "other-format-version": (lambda m: m.update(format_version=2), ["format version 2", "reads version 1",
                                                                   "re-convert"]),
    "unknown-family": (lambda m: m.update(family="wan3.0-t2v"), ["wan3.0-t2v", "not one this runtime knows"]),
    "not-wan-jax": (lambda m: m.update(format="something-else"), ["not a wan-jax-converted manifest"]),
    "no-components": (lambda m: m.update(components={"unet": {}}), ["'components'"]),
    "no-dtype-policy": (lambda m: m.pop("dtype_policy"), ["dtype_policy"]),
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_foreign_manifest(name, ck, tmp_path):
    edit, needles = MANIFESTS[name]
    _manifest(ck, edit)
    r = invoke("wan-run", "--checkpoint", ck, *RUN, "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.exit_code, r.stderr, "manifest.json", *needles)
    with pytest.raises(FormatError) as e:
        open_checkpoint(ck)
    assert all(n in str(e.value) for n in needles)
    r = invoke("wan-convert", "verify", ck)
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, "manifest.json", *needles)


@pytest.mark.parametrize("content,needle", [(None, "not found"), ("{", "not valid JSON"), ("[]", "not a wan-jax")],
                         ids=["missing", "not-json", "not-object"])
def test_unreadable_manifest(content, needle, ck, tmp_path):
    if content is None:
        (ck / fmt.MANIFEST).unlink()
    else:
        (ck / fmt.MANIFEST).write_text(content)
    r = invoke("wan-run", "--checkpoint", ck, *RUN, "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.exit_code, r.stderr, "manifest.json", needle)


def test_partial_checkpoint_fails_before_loading(tiny_repos, tmp_path, monkeypatch):
    """A checkpoint converted with --only transformer cannot generate; wan-run says so before loading."""
    from wan_convert.convert import convert

    part = convert(str(tiny_repos["wan2.1-t2v"]), tmp_path / "part", only=["transformer"]).output
    monkeypatch.setattr("wan_runtime.checkpoint.restore", _no_restore)
    r = invoke("wan-run", "--checkpoint", part, *RUN, "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.exit_code, r.stderr, "--checkpoint", "has no text_encoder", "--only")


def test_checkpoint_without_tokenizer(ck, tmp_path, monkeypatch):
    shutil.rmtree(ck / "tokenizer")
    monkeypatch.setattr("wan_runtime.checkpoint.restore", _no_restore)
    r = invoke("wan-run", "--checkpoint", ck, *RUN, "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.exit_code, r.stderr, "--checkpoint", "tokenizer.json", "missing")


def test_component_config_unreadable(ck, tmp_path):
    (ck / "vae" / "config.json").write_text("{")
    r = invoke("wan-run", "--checkpoint", ck, *RUN, "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.exit_code, r.stderr, "vae/config.json", "unreadable")


def _no_restore(*a, **k):
    raise AssertionError("restore was called: the check must come before loading weights")


def test_converted_arrays_are_complete(ck):
    """Every chunk of every array is a file (zeros included), which is what makes a missing one damage."""
    import tensorstore as ts

    for component in fmt.read_manifest(ck)["components"]:
        cfg = json.loads((ck / component / "config.json").read_text())
        for path, leaf in fmt.flatten(fmt.component_tree(component, cfg)).items():
            arr = ts.open(fmt.zarr_spec(ck / component, path), open=True).result()
            grid = [-(-n // c) for n, c in zip(leaf.shape, arr.chunk_layout.read_chunk.shape)]
            files = [p for p in (ck / component / path / "c").rglob("*") if p.is_file()] if leaf.shape else []
            assert len(files) == int(np.prod(grid)), (component, path)


# ---------------------------------------------------------------- mapped chunks (the path real weights take)
#: a Wan 2.1 T2V repo as tiny as the others except the transformer width: dim 2 x 64 and FFN 64 make every
#: per-layer chunk of a block weight whole 4 KiB pages in bf16 (fc_in: 64 x 128 x 2 B = 16 KiB), so
#: restore maps those chunk files into the stacked buffers instead of reading them (checkpoint._map_chunk)
PAGE_SIZE = dict(heads=2, head_dim=64, layers=2, ffn=64, text_dim=32, t5_layers=2, t5_ff=48, t5_heads=4, t5_kv=8,
                 vae_base=8)
MAPPED = ("transformer", "blocks.ffn.fc_in.weight", "c/1/0/0")  # layer 1: a chunk in the middle of its buffer


@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    """The page-sized repo, converted for one device (every chunk a contiguous run of its shard)."""
    import make_tiny_checkpoint as mtc
    from wan_convert.convert import convert

    root = tmp_path_factory.mktemp("paged")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(mtc.SIZES, "page", PAGE_SIZE)
        src = mtc.write("wan2.1-t2v", root / "src", seed=0, size="page")
        # the block matrices (16 KiB a layer and up) a layer deep, as real weights are; biases and norms
        # (a layer of them under a page) in one chunk across the layers, as real ones are
        m.setattr(sharding, "SMALL_LAYER_CHUNK", 4096)
        return convert(str(src), root / "ck", hash_source=False).output


@pytest.fixture
def map_calls(monkeypatch):
    """{chunk file: what checkpoint._map_chunk did with it}: True (mapped), False (the kernel refused;
    then read), or the text of the error it raised."""
    from wan_runtime import checkpoint as C

    if C._MMAP is None:
        pytest.skip("chunk files are mapped on Linux x86-64 / aarch64 only")
    calls, real = {}, C._map_chunk

    def spy(file, dest):
        key = pathlib.Path(file)
        try:
            calls[key] = real(file, dest)
        except C._ChunkError as e:
            calls[key] = str(e)
            raise
        return calls[key]

    monkeypatch.setattr(C, "_map_chunk", spy)
    return calls


def _load_paged(ck):
    from wan_runtime.pipeline import WanPipeline

    return WanPipeline.from_converted(ck, mesh="data=1", dtype="float32")


def test_paged_weights_are_mapped(paged, tmp_path, map_calls):
    """The premise of the damage tests below: restore maps the block weights' chunks, this one included."""
    from wan_runtime import checkpoint as C

    ck = shutil.copytree(paged, tmp_path / "ck")
    chunk = ck.joinpath(*MAPPED)
    assert (chunk.stat().st_size - 4) % C._PAGE == 0 and chunk.stat().st_size - 4 >= 2 * C._PAGE
    pipe = _load_paged(ck)
    assert pipe.params["transformer"]["blocks"]["ffn"]["fc_in"]["weight"].shape == (2, 64, 128)
    assert map_calls.get(chunk) is True, sorted(map_calls.items())[:4]
    # every per-layer chunk of every bf16 block matrix is mapped (measured: 2 layers x 10 = 20: q, k, v, out of
    # both attentions, fc_in, fc_out); a bias or norm is one chunk for both layers, which fills its buffer
    cfg = json.loads((ck / "transformer" / "config.json").read_text())
    matrices = [p for p, leaf in fmt.flatten(fmt.component_tree("transformer", cfg)).items()
                if p.startswith("blocks.") and leaf.dtype == "bfloat16" and len(leaf.shape) == 3]
    want = {ck / "transformer" / p / "c" / str(i) / "0" / "0" for p in matrices for i in range(2)}
    assert len(want) == 20 and want <= {f for f, ok in map_calls.items() if ok is True}, len(want)


def _flip_middle(path):
    raw = bytearray(path.read_bytes())
    raw[(len(raw) - 4) // 2] ^= 0x10  # a data byte half-way through the chunk (its third of four pages)
    path.write_bytes(bytes(raw))


def _cut_tail(path):
    path.write_bytes(path.read_bytes()[:-6])  # the crc32c and the last data bytes


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_mapped_chunk(damage, paged, tmp_path, map_calls):
    """A flipped byte in the middle of a mapped chunk, or a truncated one, fails restore (Python API and
    wan-run) with one line naming the component, the array and the chunk."""
    from wan_runtime.checkpoint import _PAGE

    ck = shutil.copytree(paged, tmp_path / "ck")
    chunk = ck.joinpath(*MAPPED)
    size = chunk.stat().st_size
    (_flip_middle if damage == "flipped" else _cut_tail)(chunk)
    why = "crc32c mismatch" if damage == "flipped" else f"{size - 6} bytes, expected {size}"
    where = f"{MAPPED[0]}/{MAPPED[1]}: unreadable or corrupt (chunk {MAPPED[2]}: {why})"
    with pytest.raises(CheckpointError) as e:
        _load_paged(ck)
    assert where in str(e.value) and "\n" not in str(e.value), str(e.value)
    # the mapped path saw this chunk: a flipped byte is found by the checksum of the mapped pages (the
    # error is raised after the mapping), a short file before mapping (it would fault past its end)
    assert map_calls.get(chunk) == why, (map_calls.get(chunk), (size - 4) // _PAGE)
    r = run_cli("wan-run", "--checkpoint", ck, *RUN, "--mesh", "data=1", "--output", tmp_path / "x.npy")
    assert_one_line_error("wan-run", r.returncode, r.stderr, where)
    assert not (tmp_path / "x.npy").exists()
