"""Open a converted checkpoint and restore its components straight into sharded device arrays.

Each leaf's target sharding comes from its logical axes and the current mesh. For every distinct
shard index a device holds, TensorStore reads exactly that region (all reads of a component are in
flight at once), and the host buffer goes to its device(s) with ``jax.device_put``; no full host copy
of a model is ever assembled unless the mesh is a single device, where shard == array. The result is
a plain nested dict of ``jax.Array``. The same files restore with plain Orbax too (see tests).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

from . import format as fmt
from . import sharding as shd


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored; names the file or array."""


@dataclasses.dataclass
class Checkpoint:
    root: pathlib.Path
    manifest: dict
    model_index: dict

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    def config(self, component: str) -> dict:
        path = self.root / component / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from None

    def abstract_tree(self, component: str) -> fmt.Tree:
        return fmt.component_tree(component, self.config(component), self.manifest["dtype_policy"]["weights"])


def open_checkpoint(root: str | pathlib.Path) -> Checkpoint:
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    manifest = fmt.read_manifest(root)
    try:
        model_index = json.loads((root / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root / 'model_index.json'}: unreadable ({e})") from None
    return Checkpoint(root, manifest, model_index)


def _ts_context(concurrency: int):
    import tensorstore as ts

    return ts.Context({
        "cache_pool": {"total_bytes_limit": 0},
        "data_copy_concurrency": {"limit": concurrency},
        "file_io_concurrency": {"limit": 2 * concurrency},
    })


def restore_component(ckpt: Checkpoint, component: str, mesh=None, rules: Mapping[str, str | None] = shd.DEFAULT_RULES,
                      concurrency: int = 8, ctx=None) -> dict[str, Any]:
    """Restore one component as a nested dict of (sharded) jax arrays."""
    import jax
    import tensorstore as ts

    if component not in ckpt.manifest["components"]:
        raise CheckpointError(f"{ckpt.root}: has no {component} (it has {', '.join(ckpt.components)})")
    ctx = ctx or _ts_context(concurrency)
    folder = ckpt.root / component
    leaves = fmt.flatten(ckpt.abstract_tree(component))
    if mesh is None:
        mesh = shd.make_mesh(shd.parse_mesh(None), jax.devices()[:1])
    # open every array (metadata reads in flight together)
    opened = {p: ts.open(fmt.zarr_spec(folder, p), open=True, context=ctx, read=True) for p in leaves}
    reads = []
    for path, leaf in leaves.items():
        try:
            arr = opened[path].result()
        except Exception as e:  # noqa: BLE001 - tensorstore error types vary
            raise CheckpointError(f"{fmt.array_dir(folder, path)}: cannot open ({_short(e)})") from None
        if tuple(arr.shape) != leaf.shape or arr.dtype.numpy_dtype != fmt.np_dtype(leaf.dtype):
            raise CheckpointError(f"{component}/{path}: stored {list(arr.shape)} {arr.dtype.name}, the runtime "
                                  f"expects {list(leaf.shape)} {leaf.dtype}")
        sharding = shd.named_sharding(mesh, leaf.shape, leaf.axes, rules)
        index_map = sharding.addressable_devices_indices_map(leaf.shape)
        by_index: dict[tuple, list] = {}
        for dev, idx in index_map.items():
            key = tuple((s.start, s.stop) for s in idx)
            by_index.setdefault(key, []).append(dev)
        futures = {key: arr[tuple(slice(a, b) for a, b in key)].read() for key in by_index}
        reads.append((path, leaf, sharding, by_index, futures))
    out: dict[str, Any] = {}
    for path, leaf, sharding, by_index, futures in reads:
        shards = []
        for key, devs in by_index.items():
            try:
                host = futures[key].result()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{fmt.array_dir(folder, path)}: unreadable or corrupt ({_short(e)}); "
                                      "re-convert or re-copy the checkpoint") from None
            shards.extend(jax.device_put([host] * len(devs), devs))
        out[path] = jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)
    return fmt.unflatten(out)


def restore(ckpt: Checkpoint, components: list[str] | None = None, mesh=None, parallel: bool = True,
            rules: Mapping[str, str | None] = shd.DEFAULT_RULES) -> tuple[dict[str, Any], dict[str, float]]:
    """Restore several components (in parallel threads by default). Returns (params, seconds per component)."""
    components = components or ckpt.components
    timings: dict[str, float] = {}

    def one(c):
        t0 = time.perf_counter()
        p = restore_component(ckpt, c, mesh, rules)
        timings[c] = time.perf_counter() - t0
        return p

    if parallel and len(components) > 1:
        with ThreadPoolExecutor(len(components), thread_name_prefix="restore") as ex:
            params = dict(zip(components, ex.map(one, components)))
    else:
        params = {c: one(c) for c in components}
    return params, timings


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:300]
