"""Check a written checkpoint bit for bit against its source and against the runtime's tree.

The comparison replays each target's transforms (``Target.layer``: the same code the converter runs),
so whatever a transform does to a weight, verify expects exactly that."""
from __future__ import annotations

import pathlib

import numpy as np

from wan_runtime import format as fmt
from wan_runtime.errors import one_line

from .mapping import Target, Transforms, plan
from .source import Component, resolve


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
           log=None, transforms: Transforms | None = None) -> int:
    """Check a checkpoint: its trees against the runtime's; without ``source`` every chunk is read back
    (present, complete, crc32c); with it every array is compared bit for bit with the source, through
    the targets' transforms (``transforms``: the same edit ``convert`` was given).
    Returns the number of arrays compared with the source (0 without one). Raises VerifyError."""
    root = pathlib.Path(output)
    manifest = fmt.read_manifest(root)
    weights_dtype = manifest["dtype_policy"]["weights"]
    ctx = fmt.ts_context(threads)
    repo = resolve(source) if source else None
    compared = 0
    for component in manifest["components"]:
        cfg = fmt.read_json(root / component / "config.json", VerifyError)
        try:
            tree = fmt.component_tree(component, cfg, weights_dtype)
        except fmt.FormatError as e:
            raise VerifyError(f"{root / component / 'config.json'}: {e}") from None
        arrays = check_tree(root, component, tree, ctx)
        if repo is None:
            for path, arr in arrays.items():
                check_chunks(component, path, arr)
        else:
            compared += compare(Component(repo.root / component), tree, arrays, transforms)
    return compared


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
