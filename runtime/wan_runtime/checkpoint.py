"""Open a converted checkpoint and restore its components straight into sharded device arrays.

Each leaf's target sharding comes from its logical axes and the current mesh; every process reads only
the shards of its own devices, and no full host copy of a model is assembled unless the mesh is a
single device, where shard == array. The result is a plain nested dict of ``jax.Array``.

Two readers give the same bits:

- direct (arrays as wan-convert writes them: a regular zarr3 chunk grid, each chunk file its raw
  little-endian bytes followed by their crc32c): each device shard gets one page-aligned host buffer
  (an anonymous mapping), and a thread pool puts every chunk in its place there. A chunk that fills
  whole pages of its shard (on Linux: every weight of a checkpoint converted for this mesh) is mapped
  over its place, copy-on-write (``mmap`` MAP_PRIVATE | MAP_FIXED of the chunk file): no copy at all,
  the pages are the page cache's; the crc32c pass then faults them in. Other chunks that are one
  contiguous run of their shard are read into place with ``preadv`` (one kernel copy out of the page
  cache), checksummed piece by piece while each piece is in cache. A chunk that is not one run of its
  shard (a checkpoint converted for another mesh, a padded edge chunk) is read whole into scratch
  memory and copied into every shard it overlaps. A missing, truncated or altered chunk file is an
  error naming the array and the chunk (as TensorStore reports it). Mapped weights rely on what
  wan-convert guarantees: a checkpoint's files are never rewritten in place (a re-conversion writes new
  files and renames the folder; unlinked files stay valid while mapped).
- TensorStore, for everything else (other codecs, OCDBT, an Orbax re-save), or without the ``crc32c``
  module: all shard reads of a component in flight at once.

Reads and host -> device copies overlap: a leaf's copies start as soon as its last chunk is in (the
direct reader: in the order leaves complete; TensorStore: in leaf order), while later leaves are still
being read. ``jax.device_put`` is asynchronous; on CPU it aliases the page-aligned shard buffers (no
copy, one buffer for all the devices that hold a shard); on an accelerator it copies them.

Staged replication: a shard that N devices of this process hold (a replicated leaf, or a leaf split
over some mesh axes and replicated over the others), of at least ``STAGE_MIN_BYTES``, crosses the host
link once, not N times: each holder gets a different 1/N of it, split along the first dimension N
divides (``sharding.stage_spec``), and one compiled all-gather (a jitted identity into the leaf's
sharding, compiled once per shape, dtype and sharding pair) assembles the copies on the devices, whose
interconnect is faster than the host link. Shards no dimension of which N divides, leaves that span
other processes, and (unless ``STAGE_ON_CPU``) CPU devices keep the plain per-device copies.

The same files restore with plain Orbax too (see tests).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import gc
import itertools
import json
import math
import mmap
import os
import pathlib
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Mapping

import numpy as np

from . import format as fmt
from . import sharding as shd
from .errors import one_line

try:  # hardware crc32c that releases the GIL; without it TensorStore reads (and checks) the chunks
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover
    _crc32c = None

#: A shard replicated over several devices is staged (sent once, 1/N per holder, then all-gathered on
#: the devices) from this many bytes up; smaller ones are sent to each holder (no compile for them).
STAGE_MIN_BYTES = 1 << 20
#: Stage on CPU devices too (tests, benchmarks). Off by default: there ``jax.device_put`` aliases one
#: host buffer on every holder, so staging would only add the all-gather's copies.
STAGE_ON_CPU = False
#: Start each leaf's host -> device copies as soon as its chunks are read. False: every read of a
#: component first, then every copy (the order before staged restore; tools/bench_restore.py compares).
OVERLAP = True


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored; names the file or array."""


@dataclasses.dataclass
class Checkpoint:
    root: pathlib.Path
    manifest: dict
    model_index: dict
    _configs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    def config(self, component: str) -> dict:
        """A component's config.json (copied from the source by wan-convert), read once (callers do not
        modify it): settings resolution, validation and the pipeline all ask for it."""
        if component not in self._configs:
            self._configs[component] = read_json(self.root / component / "config.json")
        return self._configs[component]

    @property
    def scheduler_config(self) -> dict:
        """The source's scheduler/scheduler_config.json ({} when the source had none)."""
        path = self.root / "scheduler" / "scheduler_config.json"
        return read_json(path) if path.exists() else {}

    def abstract_tree(self, component: str) -> fmt.Tree:
        return fmt.component_tree(component, self.config(component),
                                  fmt.component_dtype(self.manifest["dtype_policy"], component))


def read_json(path: pathlib.Path) -> dict:
    """A JSON object from a checkpoint file; CheckpointError naming the file otherwise."""
    return fmt.read_json(path, CheckpointError)


def open_checkpoint(root: str | pathlib.Path) -> Checkpoint:
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    return Checkpoint(root, fmt.read_manifest(root), read_json(root / "model_index.json"))


def default_threads() -> int:
    """Reader threads: a chunk read is a kernel copy out of the page cache plus a checksum, both off the
    GIL and bound by memory bandwidth, so one per core (more measured slower on 2 cores, warm cache)."""
    return max(2, os.cpu_count() or 2)


_GC_LOCK = threading.Lock()
_GC_HOLDERS = 0
_GC_WAS_ON = False


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic gc off while restores run (they allocate thousands of small objects, and a gc pass
    also runs jax's gc callback: measured 5-10% of a 1.3B restore); restores in parallel threads share it."""
    global _GC_HOLDERS, _GC_WAS_ON
    with _GC_LOCK:
        if not _GC_HOLDERS:
            _GC_WAS_ON = gc.isenabled()
        _GC_HOLDERS += 1
        gc.disable()
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_HOLDERS -= 1
            if not _GC_HOLDERS and _GC_WAS_ON:
                gc.enable()


@_gc_paused()
def restore_component(ckpt: Checkpoint, component: str, mesh=None, rules: Mapping[str, str | None] = shd.DEFAULT_RULES,
                      concurrency: int | None = None, ctx=None, direct: bool = True) -> dict[str, Any]:
    """Restore one component as a nested dict of (sharded) jax arrays.

    Arrays stored as wan-convert writes them (regular chunk grid, raw little-endian chunks + crc32c) are
    read by the direct reader below; anything else (another codec, OCDBT, no ``crc32c`` module, or
    ``direct=False``) by TensorStore. Both give the same bits."""
    import jax

    if component not in ckpt.manifest["components"]:
        raise CheckpointError(f"{ckpt.root}: has no {component} (it has {', '.join(ckpt.components)})")
    folder = ckpt.root / component
    leaves = fmt.flatten(ckpt.abstract_tree(component))
    if mesh is None:
        mesh = shd.make_mesh(shd.parse_mesh(None), jax.devices()[:1])
    plans, ts_leaves = [], {}
    for path, leaf in leaves.items():
        sharding = shd.named_sharding(mesh, leaf.shape, leaf.axes, rules)
        by_index: dict[tuple, list] = {}
        for dev, idx in sharding.addressable_devices_indices_map(leaf.shape).items():
            by_index.setdefault(_box(idx, leaf.shape), []).append(dev)
        chunks = _direct_chunks(folder, path, leaf) if direct and _crc32c is not None else None
        if chunks is None:
            ts_leaves[path] = (leaf, sharding, by_index)
        else:
            plans.append(_DirectLeaf(path, leaf, sharding, by_index, chunks, fmt.array_dir(folder, path)))
    out: dict[str, Any] = {}
    if ts_leaves:
        out.update(_restore_tensorstore(folder, component, ts_leaves, ctx or fmt.ts_context(concurrency or 8)))
    if plans:
        out.update(_restore_direct(plans, concurrency or default_threads()))
    return fmt.unflatten(out)


def _restore_tensorstore(folder: pathlib.Path, component: str, leaves: dict, ctx) -> dict[str, Any]:
    import tensorstore as ts

    # open every array (metadata reads in flight together)
    opened = {p: ts.open(fmt.zarr_spec(folder, p), open=True, context=ctx, read=True) for p in leaves}
    reads = []
    for path, (leaf, sharding, by_index) in leaves.items():
        try:
            arr = opened[path].result()
        except Exception as e:  # noqa: BLE001 - tensorstore error types vary
            raise CheckpointError(f"{fmt.array_dir(folder, path)}: cannot open ({one_line(e, 300)})") from None
        if tuple(arr.shape) != leaf.shape or arr.dtype.numpy_dtype != fmt.np_dtype(leaf.dtype):
            raise CheckpointError(f"{component}/{path}: stored {list(arr.shape)} {arr.dtype.name}, the runtime "
                                  f"expects {list(leaf.shape)} {leaf.dtype}")
        futures = {key: arr[tuple(slice(a, b) for a, b in key)].read() for key in by_index}
        reads.append((path, leaf, sharding, by_index, futures))
    out: dict[str, Any] = {}
    for path, leaf, sharding, by_index, futures in reads:  # a leaf's copies start while later ones read
        hosts = {}
        for key in by_index:
            try:
                hosts[key] = futures[key].result()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{fmt.array_dir(folder, path)}: unreadable or corrupt ({one_line(e, 300)}); "
                                      "re-convert or re-copy the checkpoint") from None
        out[path] = _to_devices(leaf, sharding, by_index, hosts)
    return out


# --------------------------------------------------------------------------------------------
# Host buffers -> device arrays: plain per-device copies, or staged (1/N per holder + all-gather).
# --------------------------------------------------------------------------------------------
def _box(idx: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A shard's index (slices, None for whole dimensions) as (start, stop) per dimension."""
    return tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(idx, shape))


def _staged_sharding(leaf: fmt.Leaf, sharding, by_index: dict):
    """The sharding a leaf crosses the host link in when it is staged (each replicated shard split 1/N
    over its N holders; see the module docstring for when), or None to copy each shard to each holder."""
    from jax.sharding import NamedSharding, PartitionSpec

    key, devs = next(iter(by_index.items()), ((), ()))
    shard = tuple(b - a for a, b in key)
    nbytes = math.prod(shard) * fmt.np_dtype(leaf.dtype).itemsize
    if (len(devs) < 2 or not nbytes or nbytes < STAGE_MIN_BYTES or not isinstance(sharding, NamedSharding)
            or not sharding.is_fully_addressable or (devs[0].platform == "cpu" and not STAGE_ON_CPU)):
        return None
    spec = shd.stage_spec(tuple(sharding.spec), shard, dict(sharding.mesh.shape))
    if spec is None:
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


@functools.lru_cache(maxsize=None)
def _gather(staged, sharding):
    """The all-gather from ``staged`` to ``sharding``: a jitted identity, one per sharding pair, which jit
    compiles once per shape and dtype (a 40-layer checkpoint compiles a handful, not one per leaf)."""
    import jax

    return jax.jit(lambda x: x, in_shardings=staged, out_shardings=sharding)


def _to_devices(leaf: fmt.Leaf, sharding, by_index: dict, hosts: dict[tuple, np.ndarray]):
    """One leaf's host shards (box -> array, for the boxes of ``by_index``) as a ``jax.Array`` of
    ``sharding``; the copies (and the all-gather of a staged leaf) run on after it returns."""
    import jax

    staged = _staged_sharding(leaf, sharding, by_index)
    if staged is None:
        shards = []
        for key, devs in by_index.items():
            shards.extend(jax.device_put([hosts[key]] * len(devs), devs))
        return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)
    holder = {dev: key for key, devs in by_index.items() for dev in devs}
    parts, devs = [], []
    for dev, idx in staged.addressable_devices_indices_map(leaf.shape).items():
        key = holder[dev]
        parts.append(hosts[key][tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(_box(idx, leaf.shape), key))])
        devs.append(dev)
    pieces = jax.make_array_from_single_device_arrays(leaf.shape, staged, jax.device_put(parts, devs))
    return _gather(staged, sharding)(pieces)


# --------------------------------------------------------------------------------------------
# Direct reader: chunk files straight into aligned per-shard host buffers.
# --------------------------------------------------------------------------------------------
_PIECE = 2 << 20  # bytes read per preadv; each piece is checksummed right away, while it is in cache
_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # Linux on x86-64 and aarch64 (Python's mmap module does not export it)


def _libc_mmap():
    """libc ``mmap``, to map a chunk file at a fixed address inside a shard's buffer; None where it is not
    known to work (then every chunk is read with preadv)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    return fn


_MMAP = _libc_mmap()


@dataclasses.dataclass
class _DirectLeaf:
    path: str
    leaf: fmt.Leaf
    sharding: Any
    by_index: dict  # shard box ((start, stop) per dim) -> devices holding it
    chunks: tuple[int, ...]
    folder: pathlib.Path  # the array's folder


def _direct_chunks(folder: pathlib.Path, path: str, leaf: fmt.Leaf) -> tuple[int, ...] | None:
    """The chunk shape if the direct reader reads this array, None if TensorStore must. Raises
    CheckpointError for an unreadable zarr.json or a shape / dtype other than the runtime's."""
    adir = fmt.array_dir(folder, path)
    try:
        meta = json.loads((adir / "zarr.json").read_text())
        shape, dtype = [int(n) for n in meta["shape"]], str(meta["data_type"])
    except FileNotFoundError:
        raise CheckpointError(f"{adir}: cannot open (no zarr.json: the array is missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{adir}: cannot open (zarr.json: {one_line(e, 300)})") from None
    if tuple(shape) != leaf.shape or dtype != leaf.dtype:
        raise CheckpointError(f"{folder.name}/{path}: stored {shape} {dtype}, the runtime "
                              f"expects {list(leaf.shape)} {leaf.dtype}")
    try:
        grid, keys, codecs = meta["chunk_grid"], meta["chunk_key_encoding"], meta["codecs"]
        chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        fill = meta.get("fill_value")
        plain = (
            meta.get("zarr_format") == 3 and grid.get("name") == "regular" and len(chunks) == len(shape)
            and all(c > 0 for c in chunks)
            and keys.get("name") == "default" and keys.get("configuration", {}).get("separator", "/") == "/"
            and not meta.get("storage_transformers")
            and [c.get("name") for c in codecs] == ["bytes", "crc32c"]
            and (codecs[0].get("configuration", {}).get("endian") == "little" or fmt.np_dtype(dtype).itemsize == 1)
            and isinstance(fill, (int, float)) and fill == 0 and math.copysign(1.0, fill) > 0
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        plain = False
    return chunks if plain else None


def shard_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array on its own page-aligned anonymous mapping (unmapped when the last view of
    it goes): chunk files can be mapped over whole pages of it, and ``jax.device_put`` on CPU aliases it."""
    n = math.prod(shape) * dtype.itemsize
    region = mmap.mmap(-1, max(_PAGE, -(-n // _PAGE) * _PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if n >= 4 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy does: 2 MiB pages where not mapped, far fewer faults
        region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, np.uint8)[:n].view(dtype).reshape(shape)


def _contiguous_run(region: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(first element, element count) if ``region`` of a C-order array of ``shape`` is one contiguous run."""
    ext = [s.stop - s.start for s in region]
    k = next((i for i, e in enumerate(ext) if e != 1), len(ext))
    if ext[k + 1:] != list(shape[k + 1:]):
        return None
    first = 0
    for s, n in zip(region, shape):
        first = first * n + s.start
    return first, math.prod(ext)


class _ChunkError(Exception):
    pass


def _read_chunk(file: pathlib.Path, dest: memoryview) -> None:
    """Read a chunk file into ``dest`` (its exact data size) and check the crc32c that follows the data."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        raise _ChunkError("missing") from None
    try:
        nbytes, off, crc = dest.nbytes, 0, 0
        while off < nbytes:
            got = os.preadv(fd, [dest[off:off + min(_PIECE, nbytes - off)]], off)
            if got == 0:
                raise _ChunkError(f"{os.fstat(fd).st_size} bytes, expected {nbytes + 4}")
            crc = _crc32c(dest[off:off + got], crc)
            off += got
        tail = os.pread(fd, 5, nbytes)
        if len(tail) != 4:
            raise _ChunkError(f"{os.fstat(fd).st_size} bytes, expected {nbytes + 4}")
        if int.from_bytes(tail, "little") != crc:
            raise _ChunkError("crc32c mismatch")
    finally:
        os.close(fd)


def _map_chunk(file: pathlib.Path, dest: np.ndarray) -> bool:
    """Map a chunk file's data over ``dest`` (uint8, page-aligned, owning its last page) copy-on-write and
    check its crc32c. False if the kernel refused the mapping (``dest`` is then anonymous memory again)."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        raise _ChunkError("missing") from None
    try:
        size = os.fstat(fd).st_size
        if size != dest.nbytes + 4:
            raise _ChunkError(f"{size} bytes, expected {dest.nbytes + 4}")
        addr, length = dest.ctypes.data, -(-dest.nbytes // _PAGE) * _PAGE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if _MMAP(addr, length, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0) != addr:
            # a failed MAP_FIXED may leave a hole: put anonymous memory back
            if _MMAP(addr, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0) != addr:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            return False
        if int.from_bytes(os.pread(fd, 4, dest.nbytes), "little") != _crc32c(memoryview(dest)):
            raise _ChunkError("crc32c mismatch")
    finally:
        os.close(fd)
    return True


def _chunk_tasks(p: _DirectLeaf, buffers: dict[tuple, np.ndarray]):
    """(chunk file, dtype, chunk shape, targets) for every chunk that overlaps a shard of this process;
    a target is (shard buffer, region in the shard, region in the chunk)."""
    shape, chunks, folder = p.leaf.shape, p.chunks, str(p.folder)  # str paths: pathlib costs ~10 us a join
    for idx in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks))):
        lo = [i * c for i, c in zip(idx, chunks)]
        hi = [min((i + 1) * c, n) for i, c, n in zip(idx, chunks, shape)]
        targets = []
        for key, buf in buffers.items():
            a = [max(x, s) for x, (s, _) in zip(lo, key)]
            b = [min(x, e) for x, (_, e) in zip(hi, key)]
            if all(x < y for x, y in zip(a, b)):
                targets.append((buf, tuple(slice(x - s, y - s) for x, y, (s, _) in zip(a, b, key)),
                                tuple(slice(x - c, y - c) for x, y, c in zip(a, b, lo))))
        if targets:
            yield os.path.join(folder, fmt.chunk_key(idx)), targets


def _read_task(p: _DirectLeaf, file: str, targets: list) -> None:
    dtype = fmt.np_dtype(p.leaf.dtype)
    try:
        buf, dst, src = targets[0]
        run = _contiguous_run(dst, buf.shape) if len(targets) == 1 else None
        if run is not None and all(s.stop - s.start == c for s, c in zip(src, p.chunks)):
            # the whole chunk is one run of its shard: map it there if it owns whole pages, else read it there
            dest = buf.reshape(-1)[run[0]:run[0] + run[1]].view(np.uint8)
            end = dest.ctypes.data + dest.nbytes - buf.ctypes.data
            owns_pages = dest.ctypes.data % _PAGE == 0 and (dest.nbytes % _PAGE == 0 or end == buf.nbytes)
            if not (_MMAP is not None and owns_pages and _map_chunk(file, dest)):
                _read_chunk(file, memoryview(dest))
            return
        scratch = np.empty(math.prod(p.chunks) * dtype.itemsize, np.uint8)
        _read_chunk(file, memoryview(scratch))
        chunk = scratch.view(dtype).reshape(p.chunks)
        for buf, dst, src in targets:
            buf[dst] = chunk[src]
    except _ChunkError as e:
        raise CheckpointError(f"{p.folder}: unreadable or corrupt (chunk {os.path.relpath(file, p.folder)}: {e}); "
                              "re-convert or re-copy the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{p.folder}: unreadable or corrupt (chunk {os.path.relpath(file, p.folder)}: "
                              f"{e.strerror or e}); re-convert or re-copy the checkpoint") from None


#: the least bytes one reader task reads: a leaf's chunks are read in runs of consecutive chunks of at
#: least this much (a stacked bias or norm, a file per layer, is one task; a 1-byte weight two layers), so
#: small files do not cost a thread-pool round trip each
TASK_BYTES = 4 << 20


def _groups(p: _DirectLeaf, chunk_tasks: list) -> list[list]:
    """A leaf's chunk reads as tasks of at least ``TASK_BYTES`` each (the last one may be less)."""
    per = max(1, -(-TASK_BYTES // (math.prod(p.chunks) * fmt.np_dtype(p.leaf.dtype).itemsize)))
    return [chunk_tasks[i:i + per] for i in range(0, len(chunk_tasks), per)]


def _read_group(p: _DirectLeaf, group: list) -> None:
    for file, targets in group:
        _read_task(p, file, targets)


def _restore_direct(plans: list[_DirectLeaf], threads: int) -> dict[str, Any]:
    """Read every chunk of ``plans`` into per-shard host buffers with ``threads`` threads; the main thread
    starts each leaf's copies to its devices as soon as the last of its chunks is in (``OVERLAP``)."""
    buffers = {p.path: {key: shard_buffer(tuple(b - a for a, b in key), fmt.np_dtype(p.leaf.dtype))
                        for key in p.by_index} for p in plans}
    tasks = [(p, group) for p in plans for group in _groups(p, list(_chunk_tasks(p, buffers[p.path])))]
    tasks.sort(key=lambda t: -len(t[1]) * math.prod(t[0].chunks) * fmt.np_dtype(t[0].leaf.dtype).itemsize)  # big first
    left = collections.Counter(p.path for p, _ in tasks)
    ready = [p for p in plans if not left[p.path]]  # leaves with nothing to read (no elements)
    out: dict[str, Any] = {}

    def put(p: _DirectLeaf) -> None:
        out[p.path] = _to_devices(p.leaf, p.sharding, p.by_index, buffers.pop(p.path))

    with ThreadPoolExecutor(max(1, min(threads, len(tasks))), thread_name_prefix="restore-read") as ex:
        futures = {ex.submit(_read_group, p, group): p for p, group in tasks}
        try:
            for f in as_completed(futures):
                f.result()
                left[futures[f].path] -= 1
                if not left[futures[f].path]:  # the leaf's last chunk is in: its copies start now
                    ready.append(futures[f])
                while OVERLAP and ready:
                    put(ready.pop())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for p in ready:
        put(p)
    return out


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
