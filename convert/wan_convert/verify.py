"""Check a written checkpoint bit for bit against its source and against the runtime's tree.

The comparison replays each target's transforms (``Target.layer``: the same code the converter runs),
so whatever a transform does to a weight, verify expects exactly that. A checkpoint with LoRAs merged
(its manifest's "loras") is compared with the merge replayed: the LoRA files are given again (``loras``,
``--lora`` / ``--lora-2``), each checked against the sha256 the manifest records. A quantized checkpoint's
values and scales (``<weight>_scale``, targets of their own) are compared with the same rule applied to the
source (``wan_runtime.quant.quantize_np``, through the :class:`~wan_convert.transforms.Quantize` step)."""
from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np

from wan_runtime import format as fmt
from wan_runtime import lora as lora_lib
from wan_runtime.errors import one_line

from .convert import LORA_FLAGS
from .mapping import Target, Transforms, plan
from .source import Component, SourceOptions, resolve
from .transforms import with_loras


class VerifyError(ValueError):
    """The checkpoint differs from what the source and the format say it must be."""


def check_tree(root: pathlib.Path, component: str, tree: dict, ctx) -> dict:
    """Every leaf of the runtime's abstract tree exists with its shape and dtype; nothing extra."""
    import tensorstore as ts

    folder = root / component
    meta = fmt.read_json(folder / fmt.ORBAX_METADATA, VerifyError)
    try:
        on_disk = {".".join(v["key_metadata"][i]["key"] for i in range(len(v["key_metadata"])))
                   for v in meta["tree_metadata"].values()}
    except (KeyError, TypeError, AttributeError):
        raise VerifyError(f"{folder / fmt.ORBAX_METADATA}: not an Orbax tree metadata file") from None
    want = fmt.flatten(tree)
    extra, missing = sorted(on_disk - set(want)), sorted(set(want) - on_disk)
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise VerifyError(f"{folder}: tree differs from the runtime's {component} tree ({what})")
    arrays = {}
    for path, leaf in want.items():
        try:
            arr = ts.open(fmt.zarr_spec(folder, path), open=True, context=ctx).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
            raise VerifyError(f"{fmt.array_dir(folder, path)}: cannot open ({one_line(e, 300)})") from None
        if tuple(arr.shape) != leaf.shape or np.dtype(arr.dtype.numpy_dtype) != fmt.np_dtype(leaf.dtype):
            raise VerifyError(f"{component}/{path}: stored {list(arr.shape)} {arr.dtype.name}, "
                              f"expected {list(leaf.shape)} {leaf.dtype}")
        arrays[path] = arr
    return arrays


def check_chunks(component: str, path: str, arr) -> None:
    """Read every chunk of a stored array (one chunk row at a time): a missing or truncated chunk, or one
    whose crc32c does not match, is a VerifyError naming the array."""
    step = max(1, arr.chunk_layout.read_chunk.shape[0]) if arr.ndim else 1
    try:
        if not arr.ndim:
            arr.read().result()
        for r in range(0, arr.shape[0] if arr.ndim else 0, step):
            arr[r:r + step].read().result()
    except Exception as e:  # noqa: BLE001 - TensorStore error types vary
        raise VerifyError(f"{component}/{path}: unreadable or corrupt ({one_line(e, 300)})") from None


def verify(output: str | pathlib.Path, source: str | None = None, threads: int = 2,
           log=None, transforms: Transforms | None = None, loras: Mapping[str, Sequence] | None = None,
           sources: SourceOptions | None = None) -> int:
    """Check a checkpoint: its trees against the runtime's; without ``source`` every chunk is read back
    (present, complete, crc32c); with it every array is compared bit for bit with the source, through
    the targets' transforms (``transforms``: the same edit ``convert`` was given; ``loras``: the LoRA
    files it merged, as ``convert`` takes them, see :func:`merged_loras`; ``sources``: the source flags it
    was given, for a single-file or original Wan-AI source). Returns the number of arrays compared with the source (0 without one). Raises VerifyError."""
    root = pathlib.Path(output)
    manifest = fmt.read_manifest(root)
    ctx = fmt.ts_context(threads)
    repo = resolve(source, options=sources) if source else None
    merged = merged_loras(manifest, loras) if repo is not None or loras else {}
    transforms = with_loras(merged, transforms) if merged else transforms
    compared = 0
    for component in manifest["components"]:
        cfg = fmt.read_json(root / component / "config.json", VerifyError)
        try:
            tree = fmt.component_tree(component, cfg, fmt.component_dtype(manifest["dtype_policy"], component))
        except fmt.FormatError as e:
            raise VerifyError(f"{root / component / 'config.json'}: {e}") from None
        arrays = check_tree(root, component, tree, ctx)
        if repo is None:
            for path, arr in arrays.items():
                check_chunks(component, path, arr)
        else:
            compared += compare(repo.component(component), tree, arrays, transforms)
    return compared


def merged_loras(manifest: Mapping, given: Mapping[str, Sequence] | None) -> dict[str, tuple]:
    """The LoRAs the manifest says were merged (its "loras"), read again from the files ``given``
    ({component: ["FILE[:STRENGTH]" or ``lora.Lora``, ...]}, in the conversion's order) at the recorded
    strengths. A file missing, too many or too few files, a file whose sha256 differs from the recorded
    one, or a strength given that differs: a one-line VerifyError naming the flag and the file."""
    recorded = manifest.get("loras") or {}
    given = {c: list(v) for c, v in (given or {}).items() if v}
    out = {}
    for c in sorted(set(recorded) | set(given)):
        flag, want, have = LORA_FLAGS.get(c, c), recorded.get(c, []), given.get(c, [])
        if len(want) != len(have):
            merged = ", ".join(r["file"] for r in want) or "none"
            raise VerifyError(f"{flag}: {len(have)} LoRA file(s) given, but {len(want)} were merged into the "
                              f"checkpoint's {c} ({merged}); pass the files it was converted with, in order")
        out[c] = tuple(_reread(flag, c, rec, spec) for rec, spec in zip(want, have))
    return {c: los for c, los in out.items() if los}


def _reread(flag: str, component: str, rec: Mapping, spec) -> lora_lib.Lora:
    """One LoRA file given to verify, checked against its manifest record (sha256, strength), at the
    recorded strength (unknown keys skipped: the file is the one the conversion read). A ``Lora`` already
    read (``convert --verify``) is not read again."""
    if isinstance(spec, lora_lib.Lora):
        lo, strength = spec, spec.strength
    else:
        path, strength = lora_lib.parse_spec(str(spec), flag)
        strength = None if path == str(spec) else strength  # no ":STRENGTH": the recorded one
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise VerifyError(f"{flag} {path}: no such file (the checkpoint's {component} merged {rec['file']})")
        lo = lora_lib.read(path, rec["strength"], ignore_unknown=True)
    if lo.sha256 != rec["sha256"]:
        raise VerifyError(f"{flag} {lo.file}: sha256 {lo.sha256[:16]}... differs from that of {rec['file']} merged "
                          f"into the checkpoint's {component} ({rec['sha256'][:16]}...): altered, or another file")
    if strength is not None and strength != rec["strength"]:
        raise VerifyError(f"{flag} {lo.file}: strength {strength:g}, but it was merged at {rec['strength']:g}")
    return lo.with_strength(rec["strength"])


def compare(comp: Component, tree: dict, arrays: dict, transforms: Transforms | None = None) -> int:
    """Every stored array of a component (``arrays``: path -> opened array) against what its target's
    transforms make of the source ``comp`` (closed at the end), layer by layer. Returns the count."""
    try:
        targets = plan(comp.name, comp.tensors, tree, transforms)
        for tgt in targets:
            for layer in range(len(tgt.sources)):
                _compare_layer(comp, tgt, layer, arrays[tgt.path])
        return len(targets)
    finally:
        comp.close()


def _compare_layer(comp: Component, tgt: Target, layer: int, stored) -> None:
    expect = tgt.layer(layer, comp.array)
    try:
        got = (stored[layer] if tgt.stacked else stored).read().result()
    except Exception as e:  # noqa: BLE001 - TensorStore error types vary
        raise VerifyError(f"{comp.name}/{tgt.path}: unreadable or corrupt ({one_line(e, 300)})") from None
    if not np.array_equal(_bits(got), _bits(expect)):
        where = f" layer {layer}" if tgt.stacked else ""
        raise VerifyError(f"{comp.name}/{tgt.path}{where}: differs from source tensor {tgt.sources[layer].name}")
    for name in tgt.names(layer):
        comp.release(name)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a
