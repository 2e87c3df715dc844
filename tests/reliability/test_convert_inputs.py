"""wan-convert on bad sources and outputs: every case is one line naming the file / tensor / flag, exit
code 2, no traceback, and nothing at OUTPUT (no hidden temporary sibling left either).

Each case damages a private copy of the tiny Wan 2.1 T2V repository, then runs the CLI in-process
(click's CliRunner) and the Python API (``convert()`` raises a SourceError / OutputError with the same
message); a few run as real processes too, with and without ``--debug``."""
import json
import shutil

import pytest

from tests.reliability.conftest import (assert_one_line_error, edit_json, first_tensor, invoke, leftovers,
                                        read_st, run_cli, write_st)
from wan_convert.convert import OutputError, convert
from wan_convert.source import SourceError

SHARD = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
SHARD2 = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
VAE = "vae/diffusion_pytorch_model.safetensors"


def _header_edit(rel, fn):
    """A case that edits one header entry of a safetensors file; needles: the file and the tensor."""
    def case(src):
        path = src / rel
        header, data = read_st(path)
        name = first_tensor(header)
        data = fn(header[name], data) or data
        write_st(path, header, data)
        return [path.name, name]
    return case


def truncated(src):
    p = src / SHARD
    p.write_bytes(p.read_bytes()[:-100])
    return [p.name, "truncated"]


def empty_file(src):
    (src / SHARD).write_bytes(b"")
    return [SHARD.split("/")[1], "truncated"]


def header_garbage(src):
    p = src / SHARD
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    p.write_bytes(raw[:8] + b"\x00\xff" * (n // 2) + raw[8 + 2 * (n // 2):])
    return [p.name, "corrupt safetensors header"]


def header_length_past_end(src):
    p = src / SHARD
    p.write_bytes((1 << 40).to_bytes(8, "little") + p.read_bytes()[8:])
    return [p.name, "corrupt safetensors header"]


def offsets_past_end(src):
    def fn(entry, data):
        b, e = entry["data_offsets"]
        entry["data_offsets"] = [len(data) + 8, len(data) + 8 + (e - b)]
    return _header_edit(SHARD, fn)(src) + ["past the end of the file"]


def offsets_disagree_with_shape(src):
    def fn(entry, data):
        entry["data_offsets"][1] -= 4
    return _header_edit(SHARD, fn)(src) + ["do not fit shape"]


def unknown_dtype(src):
    return _header_edit(SHARD, lambda entry, data: entry.update(dtype="C64"))(src) + ["unsupported dtype C64"]


def fp8_dtype(src):  # an fp8 file: refused until quantized checkpoints are read as sources
    return _header_edit(SHARD, lambda entry, data: entry.update(dtype="F8_E5M2"))(src) + ["F8_E5M2", "not supported"]


def integer_dtype(src):
    return _header_edit(SHARD, lambda entry, data: entry.update(dtype="I32"))(src) + ["floating point"]


def negative_dimension(src):
    def fn(entry, data):
        entry["shape"] = [-2, -entry["shape"][0] // 2] if entry["shape"][0] % 2 == 0 else [-1, -entry["shape"][0]]
    return _header_edit(SHARD, fn)(src) + ["negative dimension"]


def malformed_entry(src):
    return _header_edit(SHARD, lambda entry, data: entry.update(data_offsets="x"))(src) + ["malformed header entry"]


def shard_missing(src):
    (src / SHARD).unlink()
    return [SHARD.split("/")[1], "missing"]


def shard_missing_from_index(src):
    """The index does not list the tensors of one shard file (which is present): those weights are missing."""
    edit_json(src / INDEX, lambda j: j.update(weight_map={k: v for k, v in j["weight_map"].items()
                                                           if v != SHARD.split("/")[1]}))
    return ["transformer", "no source tensor for"]


def index_names_absent_tensor(src):
    edit_json(src / INDEX, lambda j: j["weight_map"].update({"blocks.0.attn1.extra.weight": SHARD.split("/")[1]}))
    return [SHARD.split("/")[1], "blocks.0.attn1.extra.weight", "lacks"]


def index_not_json(src):
    (src / INDEX).write_text("{")
    return [INDEX.split("/")[1], "not valid JSON"]


def index_without_weight_map(src):
    (src / INDEX).write_text('{"weight_map": [1, 2]}')
    return [INDEX.split("/")[1], "not a safetensors index"]


def config_more_layers(src):
    edit_json(src / "transformer/config.json", lambda c: c.update(num_layers=c["num_layers"] + 1))
    return ["transformer", "block 2 (of 3 in config.json)"]


def config_fewer_layers(src):
    edit_json(src / "transformer/config.json", lambda c: c.update(num_layers=c["num_layers"] - 1))
    return ["transformer", "block 1 but config.json says 1 layers"]


def config_other_width(src):
    edit_json(src / "transformer/config.json", lambda c: c.update(ffn_dim=c["ffn_dim"] + 2))
    return ["ffn.net.0.proj", "expected", "from config.json"]


def config_missing_key(src):
    edit_json(src / "text_encoder/config.json", lambda c: c.pop("d_model"))
    return ["text_encoder/config.json", "d_model"]


def config_not_json(src):
    (src / "transformer/config.json").write_text("{")
    return ["transformer/config.json", "not valid JSON"]


def config_not_object(src):
    (src / "transformer/config.json").write_text("[]")
    return ["transformer/config.json", "not a JSON object"]


def config_wrong_type(src):
    edit_json(src / "vae/config.json", lambda c: c.update(base_dim="abc"))
    return ["vae/config.json", "abc"]


def extra_tensor(src):
    header, data = read_st(src / VAE)
    header["decoder.extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    write_st(src / VAE, header, data + b"\0" * 4)
    return ["diffusion_pytorch_model.safetensors", "decoder.extra.weight", "no place"]


def not_wan(src):
    edit_json(src / "model_index.json", lambda m: m.update(_class_name="StableDiffusionPipeline"))
    return ["model_index.json", "StableDiffusionPipeline", "not a Wan pipeline"]


def no_model_index(src):
    (src / "model_index.json").unlink()
    return ["model_index.json", "missing"]


def model_index_not_object(src):
    (src / "model_index.json").write_text("[]")
    return ["model_index.json", "not a JSON object"]


def unsupported_pipeline(src):
    edit_json(src / "model_index.json", lambda m: m.update(_class_name="WanAnimatePipeline"))
    return ["model_index.json", "WanAnimatePipeline", "does not support"]


def pipeline_disagrees_with_transformer(src):
    edit_json(src / "model_index.json", lambda m: m.update(_class_name="WanVACEPipeline"))  # no VACE blocks
    return ["model_index.json", "WanVACEPipeline", "wan2.1-t2v transformer"]


def unsupported_variant(src):
    edit_json(src / "transformer/config.json", lambda c: c.update(in_channels=20))
    return ["transformer/config.json", "unsupported Wan variant", "in_channels=20"]


def component_folder_missing(src):
    shutil.rmtree(src / "vae")
    return ["model_index.json lists vae but the folder is missing"]


def pickled_weights_only(src):
    (src / VAE).rename(src / "vae/diffusion_pytorch_model.bin")
    return ["vae", "no safetensors weights", "safe_serialization"]


def tokenizer_missing(src):
    shutil.rmtree(src / "tokenizer")
    return ["tokenizer/tokenizer.json", "missing"]


SOURCE_CASES = [truncated, empty_file, header_garbage, header_length_past_end, offsets_past_end,
                offsets_disagree_with_shape, unknown_dtype, fp8_dtype, integer_dtype, negative_dimension, malformed_entry,
                shard_missing, shard_missing_from_index, index_names_absent_tensor, index_not_json,
                index_without_weight_map, config_more_layers, config_fewer_layers, config_other_width,
                config_missing_key, config_not_json, config_not_object, config_wrong_type, extra_tensor, not_wan,
                no_model_index, model_index_not_object, unsupported_pipeline, pipeline_disagrees_with_transformer,
                unsupported_variant,
                component_folder_missing, pickled_weights_only, tokenizer_missing]


@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda f: f.__name__)
def test_bad_source(case, t2v_src, tmp_path):
    needles = case(t2v_src)
    out = tmp_path / "out"
    r = invoke("wan-convert", t2v_src, out, "-q")
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, *needles)
    assert not out.exists() and leftovers(tmp_path, "out") == []
    with pytest.raises(SourceError) as e:  # the Python API: the same message, a typed error
        convert(str(t2v_src), out)
    assert all(str(n) in str(e.value) for n in needles), str(e.value)
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_source_errors_in_a_real_process(t2v_src, tmp_path):
    """The console tool itself: one line and exit 2; --debug shows the traceback instead."""
    needles = truncated(t2v_src)
    r = run_cli("wan-convert", t2v_src, tmp_path / "out", "-q")
    assert_one_line_error("wan-convert", r.returncode, r.stderr, *needles)
    r = run_cli("wan-convert", t2v_src, tmp_path / "out", "-q", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "SourceError" in r.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- OUTPUT and flags
def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_existing_output_is_kept(tiny_repos, converted, tmp_path):
    src = tiny_repos["wan2.1-t2v"]
    out = shutil.copytree(converted["wan2.1-t2v"], tmp_path / "ck")
    before = _snapshot(out)
    r = invoke("wan-convert", src, out, "-q")
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, str(out), "already exists", "--force")
    with pytest.raises(OutputError, match="already exists"):
        convert(str(src), out)
    assert _snapshot(out) == before and leftovers(tmp_path, "ck") == []


@pytest.mark.parametrize("what", ["folder", "file"])
def test_force_never_replaces_something_else(what, tiny_repos, tmp_path):
    out = tmp_path / "precious"
    if what == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("not a checkpoint")
    else:
        out.write_text("not a checkpoint")
    r = invoke("wan-convert", tiny_repos["wan2.1-t2v"], out, "--force", "-q")
    why = "not a wan-jax checkpoint" if what == "folder" else "is a file"  # (click's own OUTPUT check)
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, str(out), why)
    with pytest.raises(OutputError, match="not a wan-jax checkpoint"):
        convert(str(tiny_repos["wan2.1-t2v"]), out, force=True)
    kept = (out / "notes.txt") if what == "folder" else out
    assert kept.read_text() == "not a checkpoint"
    assert leftovers(tmp_path, "precious") == []


def test_output_inside_source(t2v_src):
    out = t2v_src / "ck"
    r = invoke("wan-convert", t2v_src, out, "-q")
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, str(out), "inside SOURCE")
    assert not out.exists()


def test_output_parent_is_a_file(tiny_repos, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = invoke("wan-convert", tiny_repos["wan2.1-t2v"], tmp_path / "afile" / "ck", "-q")
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, str(tmp_path / "afile"), "cannot create")


@pytest.mark.parametrize("args,needles", [
    (["--mesh", "fsdp=x"], ["--mesh", "fsdp=x"]),
    (["--mesh", "fsdp=0"], ["--mesh", "fsdp"]),
    (["--mesh", "pipeline=2"], ["--mesh", "pipeline"]),
    (["--only", "transformer,unet"], ["--only", "unet"]),
    (["--threads", "0"], ["--threads"]),
    (["--dtype", "int4"], ["--dtype", "int4"]),
    (["--bogus"], ["--bogus"]),
], ids=["mesh-unreadable", "mesh-zero", "mesh-axis", "only-unknown", "threads-zero", "dtype", "unknown-flag"])
def test_bad_flags(args, needles, tiny_repos, tmp_path):
    r = invoke("wan-convert", tiny_repos["wan2.1-t2v"], tmp_path / "out", *args, "-q")
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, *needles)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_no_source(tmp_path):
    for source, needle in [(tmp_path / "nope", "no such folder"), (tmp_path, "model_index.json: missing")]:
        r = invoke("wan-convert", source, tmp_path / "out", "-q")
        assert_one_line_error("wan-convert", r.exit_code, r.stderr, str(source), needle)
    (tmp_path / "f").write_text("x")
    r = invoke("wan-convert", tmp_path / "f", tmp_path / "out", "-q")
    assert_one_line_error("wan-convert", r.exit_code, r.stderr, "not a folder")
