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


def check_tree(root: pathlib.Path, component: str, tree: dict, ctx) -> dict:
    """Every leaf of the runtime's abstract tree exists with its shape and dtype; nothing extra."""
    import tensorstore as ts

    folder = root / component
    meta = json.loads((folder / fmt.ORBAX_METADATA).read_text())
    on_disk = {".".join(v["key_metadata"][i]["key"] for i in range(len(v["key_metadata"])))
               for v in meta["tree_metadata"].values()}
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
            raise VerifyError(f"{fmt.array_dir(folder, path)}: cannot open ({e})") from None
        if tuple(arr.shape) != leaf.shape or np.dtype(arr.dtype.numpy_dtype) != fmt.np_dtype(leaf.dtype):
            raise VerifyError(f"{component}/{path}: stored {list(arr.shape)} {arr.dtype.name}, "
                              f"expected {list(leaf.shape)} {leaf.dtype}")
        arrays[path] = arr
    return arrays


def verify(output: str | pathlib.Path, source: str | None = None, threads: int = 2,
           log=None) -> int:
    """Returns the number of arrays compared with the source (0 without one). Raises VerifyError."""
    root = pathlib.Path(output)
    manifest = fmt.read_manifest(root)
    weights_dtype = manifest["dtype_policy"]["weights"]
    ctx = ts_context(threads)
    repo = resolve(source) if source else None
    compared = 0
    for component in manifest["components"]:
        cfg = json.loads((root / component / "config.json").read_text())
        tree = fmt.component_tree(component, cfg, weights_dtype)
        arrays = check_tree(root, component, tree, ctx)
        if repo is None:
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
                        raise VerifyError(f"{component}/{tgt.path}: unreadable ({e})") from None
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
