"""Damaged or foreign checkpoints: a flipped byte, a truncated or missing chunk, a missing array, a
manifest of another format version or family, a partial checkpoint. wan-run, the Python API
(``WanPipeline.from_converted``) and ``wan-convert verify`` name the file or array; nothing is silent."""
import json
import shutil

import numpy as np
import pytest

from tests.reliability.conftest import assert_one_line_error, invoke, run_cli
from wan_runtime import format as fmt
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
