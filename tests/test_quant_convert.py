"""Quantized checkpoints (``wan-convert --dtype float8_e4m3fn|int8``, ``--text-encoder-dtype``): the blocks'
2-D weights of the transformer and of the text encoder against the issue's rule recomputed here from its
text (numpy + ml_dtypes, not ``wan_runtime.quant``), every other leaf equal to the bf16 conversion's, the
text encoder's dtype and its prompt embeddings, a LoRA merged in float32 then quantized, verify catching an
altered scale, the bytes on a real-width model, and restore / generation on 1 and 8 devices."""
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from wan_convert.convert import convert
from wan_convert.mapping import plan
from wan_convert.source import Component
from wan_convert.transforms import LoraMerge, Quantize, with_loras
from wan_convert.verify import VerifyError, verify
from wan_runtime import format as fmt
from wan_runtime import lora as L
from wan_runtime import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-wan2.1-t2v"
DTYPES = ("float8_e4m3fn", "int8")
FAMILIES = ("wan2.1-t2v", "wan2.2-t2v-a14b", "wan2.1-i2v")
#: the leaves the issue quantizes (attention q/k/v/o, cross-attention, FFN) -> their diffusers source names
SOURCE_NAMES = {f"blocks.{a}.{p}.weight": f"{a}.{p}{'.0' if p == 'to_out' else ''}.weight"
                for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out")}
SOURCE_NAMES |= {"blocks.ffn.fc_in.weight": "ffn.net.0.proj.weight", "blocks.ffn.fc_out.weight": "ffn.net.2.weight"}
#: Wan 2.1 I2V's image K/V projections of the cross-attention
ADDED_KV = {f"blocks.attn2.{p}.weight": f"attn2.{p}.weight" for p in ("add_k_proj", "add_v_proj")}
#: the UMT5 text encoder's quantized leaves (``--text-encoder-dtype``: attention q/k/v/o, the gated FFN)
#: -> their transformers source names ({i}: the block)
TEXT_NAMES = {f"blocks.attn.{p}.weight": f"encoder.block.{{i}}.layer.0.SelfAttention.{p}.weight" for p in "qkvo"}
TEXT_NAMES |= {f"blocks.ffn.{p}.weight": f"encoder.block.{{i}}.layer.1.DenseReluDense.{p}.weight"
               for p in ("wi_0", "wi_1", "wo")}


def _quantized(component: str, stored: dict) -> dict[str, str]:
    """The quantized leaves a component of this family must have -> their source names ({i}: the block)."""
    if component == "text_encoder":
        return TEXT_NAMES
    names = SOURCE_NAMES | (ADDED_KV if "blocks.attn2.add_k_proj.weight" in stored else {})
    return {path: f"blocks.{{i}}.{name}" for path, name in names.items()}


def rule(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The issue's rule, from its text: one float32 scale per output channel (a row of the torch (out, in)
    weight), scale = max|row| * float32(1 / Q) (Q = 448 for e4m3, 127 for int8; a row of zeros: scale 1),
    values = row / scale in float32, saturated to [-Q, Q], rounded to nearest even into the dtype."""
    import ml_dtypes

    q_max = np.float32(448.0 if dtype == "float8_e4m3fn" else 127.0)
    w32 = w.astype(np.float32)
    row_max = np.max(np.abs(w32), axis=1)
    scale = np.ones(w32.shape[0], np.float32)
    nonzero = row_max != 0
    scale[nonzero] = row_max[nonzero] * (np.float32(1.0) / q_max)
    y = np.minimum(np.maximum(w32 / scale[:, None], -q_max), q_max)
    if dtype == "int8":
        return np.round(y).astype(np.int8), scale  # np.round: half to even
    return y.astype(ml_dtypes.float8_e4m3fn), scale


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _arrays(ck: pathlib.Path, component: str) -> dict[str, np.ndarray]:
    import tensorstore as ts

    folder = ck / component
    return {z.parent.name: ts.open(fmt.zarr_spec(folder, z.parent.name), open=True).result().read().result()
            for z in sorted(folder.glob("*/zarr.json"))}


def _experts(ck: pathlib.Path) -> list[str]:
    return [c for c in fmt.read_manifest(ck)["components"] if c.startswith("transformer")]


@pytest.fixture(scope="module")
def checkpoints(tiny_repos, tmp_path_factory):
    """``get(family, dtype, text)``: the tiny repo converted to ``dtype``, its text encoder to the same
    dtype with ``text`` (``--text-encoder-dtype``), else to the default (made on first use)."""
    root, cache = tmp_path_factory.mktemp("quant"), {}

    def get(family: str, dtype: str, text: bool = False) -> pathlib.Path:
        if (family, dtype, text) not in cache:
            out = root / f"{family}-{dtype}{'-text' if text else ''}"
            cache[family, dtype, text] = convert(str(tiny_repos[family]), out, weights_dtype=dtype, hash_source=False,
                                                 text_encoder_dtype=dtype if text else None).output
        return cache[family, dtype, text]
    return get


#: the text encoder at its default (bf16 beside a quantized transformer) or quantized as well
TEXT = pytest.mark.parametrize("text", [False, True], ids=["text-bf16", "text-quantized"])


@TEXT
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_weights_follow_the_rule(family, dtype, text, tiny_repos, checkpoints):
    """verify passes; exactly the blocks' 2-D weights are stored quantized (the transformers', and the text
    encoder's with ``--text-encoder-dtype``), values and scales bit for bit the rule applied to the source
    float32 weights; the manifest records the scheme, the quantized components and the text encoder's dtype."""
    src, ck = tiny_repos[family], checkpoints(family, dtype, text)
    assert verify(ck, str(src)) > 0
    policy = fmt.read_manifest(ck)["dtype_policy"]
    quantized_components = _experts(ck) + (["text_encoder"] if text else [])
    assert policy["weights"] == dtype and policy.get("components") == (None if text else {"text_encoder": "bfloat16"})
    assert fmt.component_dtype(policy, "text_encoder") == (dtype if text else "bfloat16")
    assert policy["quantization"]["components"] == {c: dtype for c in sorted(quantized_components)}
    assert policy["quantization"]["max"] == {dtype: 448.0 if dtype == "float8_e4m3fn" else 127.0}
    assert policy["quantization"]["scheme"] == "symmetric absmax per output channel"
    for component in quantized_components:
        stored = _arrays(ck, component)
        quantized = {p for p, a in stored.items() if a.dtype == fmt.np_dtype(dtype)}
        assert quantized == set(_quantized(component, stored)), component
        assert (family == "wan2.1-i2v" and component != "text_encoder") == (set(ADDED_KV) <= quantized), component
        comp = Component(src / component)
        try:
            for path, name in _quantized(component, stored).items():
                q, scale = stored[path], stored[f"{path}_scale"]
                assert scale.dtype == np.float32 and scale.shape == q.shape[:2]
                for i in range(q.shape[0]):
                    want_q, want_scale = rule(comp.array(name.format(i=i)), dtype)
                    assert np.array_equal(_bits(q[i]), _bits(want_q)), (component, path, i)
                    assert np.array_equal(_bits(scale[i]), _bits(want_scale)), (component, path, i)
        finally:
            comp.close()


@TEXT
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_other_leaves_equal_the_bf16_conversion(family, dtype, text, checkpoints):
    """Every leaf but the quantized weights (their scales are new) is the bf16 conversion's, bit for bit:
    the rest of the transformer, the VAE and the text encoder (bf16 by default; quantized, its embedding,
    relative-position biases and norms)."""
    bf16, ck = checkpoints(family, "bfloat16"), checkpoints(family, dtype, text)
    assert fmt.read_manifest(ck)["components"].keys() == fmt.read_manifest(bf16)["components"].keys()
    for component in fmt.read_manifest(bf16)["components"]:
        want, got = _arrays(bf16, component), _arrays(ck, component)
        quantized = component.startswith("transformer") or (text and component == "text_encoder")
        skip = set(_quantized(component, want)) if quantized else set()
        assert set(got) == set(want) | {f"{p}_scale" for p in skip}, component
        for path in sorted(set(want) - skip):
            assert got[path].dtype == want[path].dtype, (component, path)
            assert np.array_equal(_bits(got[path]), _bits(want[path])), (component, path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wan_convert.cli", *map(str, args)], capture_output=True, text=True)


def test_text_encoder_dtype_is_honoured(tmp_path):
    """--text-encoder-dtype float32 beside an int8 transformer: recorded, stored float32 (the source's bits),
    verified; the VAE follows the bf16 rule."""
    out = tmp_path / "ck"
    run = _cli(TINY, out, "--dtype", "int8", "--text-encoder-dtype", "float32", "--no-hash", "-q", "--verify")
    assert run.returncode == 0, run.stderr
    policy = fmt.read_manifest(out)["dtype_policy"]
    assert policy["weights"] == "int8" and policy["components"] == {"text_encoder": "float32"}
    comp = Component(TINY / "text_encoder")
    try:
        tree = fmt.flatten(fmt.component_tree("text_encoder", comp.config, "float32"))
        stored = _arrays(out, "text_encoder")
        assert {a.dtype for a in stored.values()} == {np.dtype(np.float32)} and set(stored) == set(tree)
        shared = comp.array("shared.weight")
        assert np.array_equal(_bits(stored["shared.weight"]), _bits(shared))
    finally:
        comp.close()
    vae = {a.dtype.name for a in _arrays(out, "vae").values()}
    assert vae == {"bfloat16", "float32"}


@pytest.mark.parametrize("dtype, text_dtype", [("float8_e4m3fn", "int8"), ("bfloat16", "float8_e4m3fn")])
def test_text_encoder_quantized_beside_another_dtype(dtype, text_dtype, tmp_path):
    """``--text-encoder-dtype`` quantized beside another ``--dtype`` (int8 beside e4m3, e4m3 beside bf16):
    verified bit for bit; the manifest gives each component its dtype (``components`` override, the
    ``quantization`` record names exactly the components holding quantized leaves) and the text encoder's
    tree read from it is the quantized one."""
    out = tmp_path / "ck"
    run = _cli(TINY, out, "--dtype", dtype, "--text-encoder-dtype", text_dtype, "--no-hash", "-q", "--verify")
    assert run.returncode == 0, run.stderr
    policy = fmt.read_manifest(out)["dtype_policy"]
    assert policy["weights"] == dtype and policy["components"] == {"text_encoder": text_dtype}
    quantized = {"text_encoder": text_dtype} | ({"transformer": dtype} if dtype in fmt.QUANT_DTYPES else {})
    assert policy["quantization"]["components"] == quantized
    assert policy["quantization"]["max"] == {d: fmt.QUANT_DTYPES[d] for d in quantized.values()}
    stored = _arrays(out, "text_encoder")
    assert {p for p, a in stored.items() if a.dtype == fmt.np_dtype(text_dtype)} == set(TEXT_NAMES)
    assert {f"{p}_scale" for p in TEXT_NAMES} <= set(stored)
    assert stored["shared.weight"].dtype == fmt.np_dtype("bfloat16")
    assert {a.dtype.name for p, a in _arrays(out, "transformer").items() if "_scale" not in p} <= \
        {"bfloat16", "float32", dtype}


def test_text_encoder_dtype_refuses_an_unknown_dtype(tmp_path):
    """``--text-encoder-dtype int4``: exit 2, one line naming the flag, nothing written (the API: a
    ValueError naming it too)."""
    run = _cli(TINY, tmp_path / "bad", "--dtype", "int8", "--text-encoder-dtype", "int4")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "--text-encoder-dtype" in run.stderr and "int4" in run.stderr
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="--text-encoder-dtype: unsupported dtype 'int4'"):
        convert(str(TINY), tmp_path / "bad", weights_dtype="int8", text_encoder_dtype="int4")


#: relative (Frobenius) error of the tiny text encoder's prompt embeddings against the float32 encoder's
#: (random weights; 3 prompts, 64 tokens, float32 compute), measured: bf16 storage 3.8e-3, int8 1.0e-2,
#: e4m3 4.5e-2. The bounds are ~1.5x these; a broken rule lands far above them (scales dropped: 1.4, one
#: scale per layer: 0.30, per input column: 0.35, int8 truncated instead of rounded to nearest: 2.2e-2)
TEXT_EMB_REL = {"bfloat16": 6e-3, "int8": 1.5e-2, "float8_e4m3fn": 6e-2}
PROMPTS = ("a red fox runs through the snow at dawn", "blurry, low quality, static", "一只猫在窗台上睡觉")


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_text_encoder_prompt_embeddings(dtype, tmp_path, measured):
    """``--dtype D --text-encoder-dtype D`` on the tiny repo: verify passes; the text encoder restores and,
    through the pipeline's weight recast to float32 (``cast_weights``), keeps its block weights quantized
    (no float copy); its prompt embeddings are close to the float32 encoder's, coarser than bf16 storage."""
    from safetensors.numpy import load_file

    from wan_convert.mapping import tree_from_state_dict
    from wan_runtime import checkpoint as C
    from wan_runtime import text
    from wan_runtime.models import umt5
    from wan_runtime.pipeline import cast_weights

    out = tmp_path / "ck"
    run = _cli(TINY, out, "--dtype", dtype, "--text-encoder-dtype", dtype, "--no-hash", "-q", "--verify")
    assert run.returncode == 0 and "verified" in run.stdout, run.stderr
    ck = C.open_checkpoint(out)
    params, _ = C.restore(ck, ["text_encoder"])
    params = cast_weights(params["text_encoder"], "float32")
    leaves = fmt.flatten(params)
    assert {p for p, a in leaves.items() if a.dtype == fmt.np_dtype(dtype)} == set(TEXT_NAMES)
    assert all(leaves[f"{p}_scale"].dtype == np.float32 for p in TEXT_NAMES)
    assert leaves["shared.weight"].dtype == np.float32  # upcast like any bf16 leaf

    cfg, tok = umt5.UMT5Config.from_config(ck.config("text_encoder")), text.Tokenizer.from_file(
        TINY / "tokenizer" / "tokenizer.json")
    source = load_file(str(TINY / "text_encoder" / "model.safetensors"))

    def embed(p):
        return np.asarray(text.encode_prompts(p, cfg, tok, PROMPTS, max_length=64)[0], np.float64)

    ref = embed(tree_from_state_dict("text_encoder", source, ck.config("text_encoder"), "float32"))
    rel = {d: float(np.linalg.norm(e - ref) / np.linalg.norm(ref)) for d, e in (
        ("bfloat16", embed(tree_from_state_dict("text_encoder", source, ck.config("text_encoder"), "bfloat16"))),
        (dtype, embed(params)))}
    measured(f"quant/text_encoder_prompt_rel_error/{dtype}", rel[dtype], bound=TEXT_EMB_REL[dtype],
             bf16=rel["bfloat16"])
    assert rel["bfloat16"] <= TEXT_EMB_REL["bfloat16"], rel
    assert rel["bfloat16"] < rel[dtype] <= TEXT_EMB_REL[dtype], rel


def _lora_file(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A diffusers-format LoRA (no alpha: scale 1) on two modules: blocks.1.attn1.to_q and blocks.0's FFN in."""
    from safetensors.numpy import save_file

    cfg = json.loads((TINY / "transformer" / "config.json").read_text())
    dim, ffn, rank = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], 4
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out_dim, in_dim) in {"blocks.1.attn1.to_q": (dim, dim), "blocks.0.ffn.net.0.proj": (ffn, dim)}.items():
        tensors[f"transformer.{module}.lora_A.weight"] = rng.standard_normal((rank, in_dim), np.float32) * 0.2
        tensors[f"transformer.{module}.lora_B.weight"] = rng.standard_normal((out_dim, rank), np.float32) * 0.2
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_merged_then_quantized(dtype, tmp_path):
    """The chain is [LoraMerge, Quantize]; the stored values and scales are the rule applied to the float32
    merge (a float32 conversion with the same LoRA stores exactly that sum); untouched layers quantize the
    source; verify replays the merge."""
    f = _lora_file(tmp_path / "l.safetensors")
    loras = {"transformer": [f"{f}:0.8"]}
    merged32 = convert(str(TINY), tmp_path / "f32", weights_dtype="float32", only=["transformer"], loras=loras,
                       hash_source=False).output
    ck = convert(str(TINY), tmp_path / "q", weights_dtype=dtype, only=["transformer"], loras=loras,
                 hash_source=False).output
    assert verify(ck, str(TINY), loras=loras) > 0
    comp = Component(TINY / "transformer")
    try:
        tree = fmt.component_tree("transformer", comp.config, dtype)
        hook = with_loras({"transformer": [L.read(f, 0.8)]})
        targets = {t.path: t for t in plan("transformer", comp.tensors, tree, hook)}
        plain = {p: [np.array(comp.array(f"blocks.{i}.{n}")) for i in range(2)] for p, n in SOURCE_NAMES.items()}
    finally:
        comp.close()
    for path in ("blocks.attn1.to_q.weight", "blocks.ffn.fc_in.weight"):
        assert [type(s) for s in targets[path].transforms] == [LoraMerge, Quantize]
        assert targets[f"{path}_scale"].transforms == targets[path].transforms
    assert targets["blocks.attn2.to_q.weight"].transforms == [Quantize(dtype)]
    f32, got = _arrays(merged32, "transformer"), _arrays(ck, "transformer")
    touched = {("blocks.attn1.to_q.weight", 1), ("blocks.ffn.fc_in.weight", 0)}
    for path in SOURCE_NAMES:
        for i in range(2):
            w = f32[path][i] if (path, i) in touched else plain[path][i]
            assert ((path, i) in touched) != np.array_equal(w, plain[path][i]), (path, i)  # the LoRA did merge
            want_q, want_scale = rule(w, dtype)
            assert np.array_equal(_bits(got[path][i]), _bits(want_q)), (path, i)
            assert np.array_equal(_bits(got[f"{path}_scale"][i]), _bits(want_scale)), (path, i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_quantizes_whole_rows_for_any_region(dtype, monkeypatch):
    """``Quantize.store`` fills chunks that split rows and columns (a leaf sharded along its input axis),
    computing in blocks of a few rows: the assembled leaf and scales are the rule applied to whole rows,
    a zero row gets scale 1, an outlier row saturates."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 12), np.float32) * np.logspace(-6, 3, 10, dtype=np.float32)[:, None]
    w[3] = 0
    w[5, 7] = 3e4
    want_q, want_scale = rule(w, dtype)
    assert want_scale[3] == 1 and np.abs(want_q[5].astype(np.float32)).max() == (448 if dtype != "int8" else 127)
    monkeypatch.setattr(Quantize, "BLOCK_BYTES", 3 * 12 * 4)  # three rows per quantize_np call
    step = Quantize(dtype)
    q = np.zeros(w.shape, fmt.np_dtype(dtype))
    for r0 in range(0, 10, 4):
        for c0 in range(0, 12, 5):
            region = (slice(r0, min(r0 + 4, 10)), slice(c0, min(c0 + 5, 12)))
            step.store(q[region], w, region)
    scale = np.zeros(10, np.float32)
    for r0 in range(0, 10, 3):
        step.store(scale[r0:r0 + 3], w, (slice(r0, r0 + 3),), "scale")
    whole = np.zeros(w.shape, fmt.np_dtype(dtype))
    step.store(whole, w, ...)
    for got in (q, whole):
        assert np.array_equal(_bits(got), _bits(want_q))
    assert np.array_equal(_bits(scale), _bits(want_scale))
    with pytest.raises(ValueError, match="no output 'zero'"):
        step.store(scale, w, ..., "zero")


@pytest.mark.parametrize("small", [sharding.SMALL_LAYER_CHUNK, 512])
def test_each_row_is_quantized_once(small, tmp_path, monkeypatch):
    """On tensor=2,fsdp=4 (chunks that split rows and columns; the scales' chunks written by the weight's
    units from the same value) the converter hands every row of every quantized layer to the rule once:
    with the tiny weights small (both layers in one unit, the scales from the same values) and a layer
    deep (``small`` 512 B: the scales, chunked over both layers, gathered from the two layers' units)."""
    import threading

    from wan_runtime import quant

    monkeypatch.setattr(sharding, "SMALL_LAYER_CHUNK", small)
    rows, lock, rule_np = [0], threading.Lock(), quant.quantize_np

    def counting(w, dtype):
        with lock:
            rows[0] += w.shape[0]
        return rule_np(w, dtype)

    monkeypatch.setattr(quant, "quantize_np", counting)
    ck = convert(str(TINY), tmp_path / "ck", weights_dtype="int8", mesh="tensor=2,fsdp=4", only=["transformer"],
                 hash_source=False).output
    leaves = fmt.flatten(fmt.component_tree("transformer", json.loads((ck / "transformer" / "config.json").read_text()),
                                            "int8"))
    assert rows[0] == sum(leaves[p].shape[0] * leaves[p].shape[1] for p in SOURCE_NAMES)
    monkeypatch.undo()
    assert verify(ck, str(TINY)) > 0
    for p in SOURCE_NAMES:  # the layout each case meant: weights a layer deep or not, scales over both layers
        chunks = {q: json.loads((ck / "transformer" / q / "zarr.json").read_text())["chunk_grid"]["configuration"]
                  ["chunk_shape"][0] for q in (p, f"{p}_scale")}
        assert chunks == {p: 2 if small > 1024 else 1, f"{p}_scale": 2}, chunks


def test_layer_blocks_gathered_scales_and_edge_rows(tmp_path, monkeypatch):
    """Any regular chunk grid converts: chunk rows of some of the layers (3 layers, small leaves 2 deep: the
    second row padded), weights a layer deep whose rows are split in chunks of 4 (8 in float8) and whose
    scales are gathered into rows of 2 layers: verify passes in bf16 and float8 and restore gives the
    stored leaves on 1 and 8 devices."""
    import make_synthetic_checkpoint as msc

    from wan_runtime import checkpoint as C

    monkeypatch.setitem(msc.MODELS, "blocks-test", dict(num_attention_heads=1, num_layers=3, ffn_dim=256))
    src = msc.write(tmp_path / "src", "blocks-test")
    real = sharding.chunk_shape

    def chunk_shape(shape, axes, *args, **kwargs):
        chunk = real(shape, axes, *args, **{**kwargs, "target_bytes": 1000})  # splits the weights' rows
        return (2, *chunk[1:]) if axes[:1] == ("layers",) and chunk[0] == 3 else chunk

    monkeypatch.setattr(sharding, "SMALL_LAYER_CHUNK", 4096)  # the 128 x 128 weights stay a layer deep
    monkeypatch.setattr(sharding, "chunk_shape", chunk_shape)
    for dtype in ("bfloat16", "float8_e4m3fn"):
        ck = convert(str(src), tmp_path / dtype, weights_dtype=dtype, only=["transformer"], hash_source=False).output
        assert verify(ck, str(src)) > 0
        folder = ck / "transformer"
        depth = {p: json.loads((folder / p / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
                 for p in ("blocks.norm2.weight", "blocks.attn1.to_q.weight", "blocks.attn1.to_q.weight_scale")
                 if (folder / p).exists()}
        assert depth["blocks.norm2.weight"] == [2, 128]  # rows of 2 layers (3 -> 2 rows)
        assert depth["blocks.attn1.to_q.weight"][:2] == [1, 4 if dtype == "bfloat16" else 8]
        assert depth.get("blocks.attn1.to_q.weight_scale", [2])[0] == 2
        stored = _arrays(ck, "transformer")
        for mesh in ("1", "fsdp=4,tensor=2"):
            restore_mesh = sharding.make_mesh(sharding.parse_mesh(mesh))
            params, _ = C.restore(C.open_checkpoint(ck), ["transformer"], mesh=restore_mesh)
            for path, x in fmt.flatten(params["transformer"]).items():
                assert np.array_equal(_bits(np.asarray(x)), _bits(stored[path])), (dtype, mesh, path)


def _alter_chunk(path: pathlib.Path, offset: int = 0) -> None:
    """Flip a byte of a chunk and write a valid crc32c: only the comparison with the source can tell."""
    from crc32c import crc32c

    data = bytearray(path.read_bytes()[:-4])
    data[offset] ^= 0x01
    path.write_bytes(bytes(data) + struct.pack("<I", crc32c(bytes(data))))


def test_verify_fails_on_an_altered_scale(tmp_path):
    ck = convert(str(TINY), tmp_path / "ck", weights_dtype="float8_e4m3fn", only=["transformer"],
                 hash_source=False).output
    scale = ck / "transformer" / "blocks.attn1.to_q.weight_scale"
    layers, out = json.loads((scale / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
    assert layers == 2  # a small leaf: both layers in one chunk; layer 1 starts after layer 0's float32 scales
    _alter_chunk(scale / fmt.chunk_key((0, 0)), offset=out * 4)
    assert verify(ck) == 0  # every chunk reads back: the damage is invisible without the source
    with pytest.raises(VerifyError, match=r"transformer/blocks.attn1.to_q.weight_scale layer 1: differs from source "
                                          r"tensor blocks.1.attn1.to_q.weight"):
        verify(ck, str(TINY))
    run = _cli("verify", ck, "--source", TINY)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "blocks.attn1.to_q.weight_scale layer 1" in run.stderr


@pytest.mark.parametrize("mesh", [None, "fsdp=8", "tensor=2,fsdp=4"])
def test_restore_quantized_sharded(mesh, tmp_path):
    """A quantized checkpoint laid out for ``mesh`` verifies (chunks that split the input axis included) and
    restores float8 leaves and float32 scales, sharded as the tree says (a scale with its weight's rows),
    with the stored bits."""
    import jax

    from wan_runtime import checkpoint as C

    ck = convert(str(TINY), tmp_path / "ck", weights_dtype="float8_e4m3fn", mesh=mesh, only=["transformer"],
                 hash_source=False).output
    assert verify(ck, str(TINY)) > 0
    shape = sharding.parse_mesh(mesh)
    devices = jax.devices()[:sharding.mesh_size(shape)]
    params, _ = C.restore(C.open_checkpoint(ck), ["transformer"], mesh=sharding.make_mesh(shape, devices))
    got, stored = fmt.flatten(params["transformer"]), _arrays(ck, "transformer")
    split = 0
    for path in SOURCE_NAMES:
        w, s = got[path], got[f"{path}_scale"]
        assert w.dtype == fmt.np_dtype("float8_e4m3fn") and s.dtype == np.float32, path
        assert len(w.sharding.device_set) == len(devices)
        spec = tuple(w.sharding.spec) + (None,) * (3 - len(w.sharding.spec))
        assert tuple(s.sharding.spec) + (None,) * (2 - len(s.sharding.spec)) == spec[:2], path
        split += spec != (None, None, None)
        assert np.array_equal(_bits(np.asarray(w)), _bits(stored[path]))
        assert np.array_equal(_bits(np.asarray(s)), _bits(stored[f"{path}_scale"]))
    assert split == (0 if mesh is None else len(SOURCE_NAMES))  # fsdp splits the input axis of to_q / fc_in


def test_quantized_checkpoint_generates(tmp_path):
    """WanPipeline on an e4m3 checkpoint, text encoder included (float32 activations), makes finite,
    non-constant frames; the loaded text encoder keeps its block weights in e4m3."""
    from wan_runtime.pipeline import WanPipeline

    ck = convert(str(TINY), tmp_path / "ck", weights_dtype="float8_e4m3fn", text_encoder_dtype="float8_e4m3fn",
                 hash_source=False).output
    pipe = WanPipeline.from_converted(ck, dtype="float32")
    assert pipe.params["text_encoder"]["blocks"]["ffn"]["wo"]["weight"].dtype == fmt.np_dtype("float8_e4m3fn")
    frames = np.asarray(pipe("a fox", height=32, width=32, num_frames=5, num_inference_steps=2, seed=0).frames)
    assert frames.size and np.isfinite(frames).all() and frames.std() > 0


def _folder_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_bytes_on_a_real_width_model(tmp_path, measured):
    """Transformer bytes of e4m3 and int8 vs bf16 on the 1.3B shape (2 blocks, written for real): the folder
    holds the tree's bytes (plus chunk checksums and metadata), so the full 30-block ratio, which the tree
    gives exactly, is what the disk holds; that ratio is <= 0.55 (the issue's bound)."""
    import make_synthetic_checkpoint as msc

    src = msc.write(tmp_path / "src", "wan2.1-t2v-1.3b", layers=2)
    sizes = {}
    for dtype in ("bfloat16", *DTYPES):
        ck = convert(str(src), tmp_path / dtype, weights_dtype=dtype, only=["transformer"], hash_source=False).output
        disk, tree = _folder_bytes(ck / "transformer"), fmt.read_manifest(ck)["components"]["transformer"]["bytes"]
        assert tree <= disk < tree * 1.003 + (1 << 20), (dtype, disk, tree)
        sizes[dtype] = disk
    full = {d: sum(np.prod(leaf.shape) * fmt.np_dtype(leaf.dtype).itemsize for leaf in fmt.flatten(
        fmt.component_tree("transformer", msc.transformer_config("wan2.1-t2v-1.3b"), d)).values())
        for d in sizes}
    for dtype in DTYPES:
        ratio, ratio_full = sizes[dtype] / sizes["bfloat16"], full[dtype] / full["bfloat16"]
        measured(f"quant/{dtype}/transformer_bytes_vs_bf16/1.3b-2blocks", ratio, bytes=sizes[dtype],
                 bf16_bytes=sizes["bfloat16"])
        measured(f"quant/{dtype}/transformer_bytes_vs_bf16/1.3b", ratio_full, bytes=int(full[dtype]),
                 bf16_bytes=int(full["bfloat16"]))
        assert ratio < 0.65 and ratio_full <= 0.55, (dtype, ratio, ratio_full)
