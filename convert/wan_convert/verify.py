"""Check a written checkpoint bit for bit against its source and against the runtime's tree."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from wan_runtime import format as fmt

from .convert import ts_context
from .mapping import plan
from .source import Component, resolve


class VerifyError(ValueError):
    """The checkpoint differs from what the source and the format say it must be."""


def _short(e: BaseException) -> str:
    text = str(e)
    return text.split(" [tensorstore_spec=")[0].splitlines()[0][:300] if text else type(e).__name__


def _json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: unreadable ({_short(e)})") from None


def check_tree(root: pathlib.Path, component: str, tree: dict, ctx) -> dict:
    """Every leaf of the runtime's abstract tree exists with its shape and dtype; nothing extra."""
    import tensorstore as ts

    folder = root / component
    meta = _json(folder / fmt.ORBAX_METADATA)
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
            raise VerifyError(f"{fmt.array_dir(folder, path)}: cannot open ({_short(e)})") from None
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
        raise VerifyError(f"{component}/{path}: unreadable or corrupt ({_short(e)})") from None


def verify(output: str | pathlib.Path, source: str | None = None, threads: int = 2,
           log=None) -> int:
    """Check a checkpoint: its trees against the runtime's; without ``source`` every chunk is read back
    (present, complete, crc32c); with it every array is compared bit for bit with the source.
    Returns the number of arrays compared with the source (0 without one). Raises VerifyError."""
    root = pathlib.Path(output)
    manifest = fmt.read_manifest(root)
    weights_dtype = manifest["dtype_policy"]["weights"]
    ctx = ts_context(threads)
    repo = resolve(source) if source else None
    compared = 0
    for component in manifest["components"]:
        cfg = _json(root / component / "config.json")
        try:
            tree = fmt.component_tree(component, cfg, weights_dtype)
        except fmt.FormatError as e:
            raise VerifyError(f"{root / component / 'config.json'}: {e}") from None
        arrays = check_tree(root, component, tree, ctx)
        if repo is None:
            for path, arr in arrays.items():
                check_chunks(component, path, arr)
            continue
        comp = Component(repo.root / component)
        try:
            for tgt in plan(component, comp.tensors, tree):
                stored = arrays[tgt.path]
                dtype = fmt.np_dtype(tgt.leaf.dtype)
                for i, info in enumerate(tgt.sources):
                    want = tgt.leaf.shape[1:] if tgt.stacked else tgt.leaf.shape
                    expect = np.empty(want, dtype)
                    np.copyto(expect, comp.array(info.name).reshape(want), casting="unsafe")
                    try:
                        got = (stored[i] if tgt.stacked else stored).read().result()
                    except Exception as e:  # noqa: BLE001
                        raise VerifyError(f"{component}/{tgt.path}: unreadable or corrupt ({_short(e)})") from None
                    if not np.array_equal(_bits(got), _bits(expect)):
                        where = f" layer {i}" if tgt.stacked else ""
                        raise VerifyError(f"{component}/{tgt.path}{where}: differs from source tensor {info.name}")
                    comp.release(info.name)
                compared += 1
        finally:
            comp.close()
    return compared


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a
