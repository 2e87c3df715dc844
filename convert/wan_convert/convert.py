"""Convert a diffusers Wan repository into a wan-jax checkpoint (see wan_runtime.format).

The work is a list of *units*: one chunk row of a stacked leaf along its layer axis (one layer; every
layer of a small leaf, whose chunks hold them all: ``sharding.SMALL_LAYER_CHUNK``), or one chunk-aligned
row range of an unstacked leaf. A thread pool runs them; each unit applies its target's transforms to
each of its layers (``Target.value``: views of the source mmap for today's Squeeze), and its last
transform makes the single copy into a reused per-thread chunk buffer with the dtype cast fused in
(``Target.store``: numpy casting, round-to-nearest-even for bfloat16, the same bits as torch's
``.to(torch.bfloat16)``), a layer at a time; then the unit writes its chunks and drops the source pages
it read. At most ``2 * threads`` units are in flight, so peak memory is bounded by a few units (a layer;
a small leaf's layers, stacked, then copied into its chunk: at most twice ``SMALL_LAYER_CHUNK`` times the
layers), not by the model.
A LoRA merge (``loras``: ``--lora`` / ``--lora-2``) makes the unit of each layer it touches compute that
layer's float32 sum ``W + s * up @ down`` (a few layer-sized float32 arrays per running thread: measured
~1.6 GB more at 4 threads on 14B-sized layers, about 0.4 GB per thread).
A quantized checkpoint (``weights_dtype`` float8_e4m3fn or int8: ``format.QUANT_DTYPES``) stores the
transformer blocks' 2-D weights through a :class:`~wan_convert.transforms.Quantize` last step. Its scale
leaf ``<weight>_scale`` (a target of its own, for ``verify``) has no units: the units of the weight fill it
from the same values (the rows they quantized are remembered, so each layer is read and quantized once).
Where the scale leaf is chunked like its weight (both small, or both a layer deep) each unit writes the
same layers' scale chunks (``_Unit.also``); a weight a layer deep has small scales chunked over all its
layers, so each unit stores its layer's scales into one buffer for the leaf (``_Gather``: under
``SMALL_LAYER_CHUNK`` times the layers) and the unit that completes it writes the chunk, once. A unit
always holds whole rows: the value handed to the last transform is the whole layer, and a leaf with such
a sibling is never split into row ranges.
The text encoder is stored in ``text_encoder_dtype`` (default bfloat16 when quantizing): float8_e4m3fn or
int8 quantizes its blocks' 2-D weights in the same way (``format.text_encoder_tree``), whatever
``weights_dtype`` is; the other components follow the usual rule for ``format.QUANT_BASE``.

Atomicity: everything is written into a hidden sibling of OUTPUT and renamed into place at the end; an
existing OUTPUT is replaced only with ``force`` and only after the new checkpoint is complete.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import itertools
import json
import os
import struct
import pathlib
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Mapping, Sequence

import numpy as np

from wan_runtime import families
from wan_runtime import format as fmt
from wan_runtime import lora as lora_lib
from wan_runtime import sharding
from wan_runtime.errors import one_line

from . import __version__
from .mapping import Target, Transforms, plan
from .source import Component, Repo, SourceError, SourceOptions, resolve
from .transforms import Quantize, with_loras

try:  # hardware crc32c (SSE4.2 / ARMv8); without it TensorStore encodes the chunks
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover
    _crc32c = None

#: side files wan-run reads (beyond the components' config.json): a complete conversion needs them
NEEDED_FILES = {"tokenizer/tokenizer.json": "text_encoder", "image_processor/preprocessor_config.json": "image_encoder"}
#: the component each LoRA flag merges into
LORA_FLAGS = {"transformer": "--lora", "transformer_2": "--lora-2"}


class OutputError(ValueError):
    """OUTPUT cannot be written (exists without --force, not writable, disk full, ...); names the file."""


_FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit is reached",
         errno.EDQUOT: "the disk quota is exhausted"}


@contextlib.contextmanager
def _writing(path):
    """Turn an OS or TensorStore write failure into a one-line OutputError naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        why = _FULL.get(e.errno, e.strerror or str(e))
        raise OutputError(f"{path}: cannot write ({why}); nothing was written at OUTPUT") from None
    except (ValueError, RuntimeError) as e:  # TensorStore reports I/O errors as ValueError / RuntimeError
        why = next((w for code, w in _FULL.items() if os.strerror(code) in str(e)), None) or one_line(e, 300)
        raise OutputError(f"{path}: cannot write ({why}); nothing was written at OUTPUT") from None


@dataclasses.dataclass
class Summary:
    output: pathlib.Path
    family: str
    bytes_read: int
    bytes_written: int
    seconds: float
    leaves: int
    loras: int = 0  # LoRA files merged (all components)

    def line(self) -> str:
        gb = 1e9
        merged = f", {self.loras} LoRA(s) merged" if self.loras else ""
        return (f"converted {self.family}: {self.leaves} arrays{merged}, read {self.bytes_read / gb:.2f} GB, wrote "
                f"{self.bytes_written / gb:.2f} GB in {self.seconds:.2f} s ({self.bytes_read / gb / max(self.seconds, 1e-9):.2f} "
                f"GB/s of input) -> {self.output}")


def default_threads() -> int:
    # units mostly wait on TensorStore writes (checksums, file I/O); two per core keeps the cores busy
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


@dataclasses.dataclass
class _Unit:
    target: Target
    array: object  # tensorstore.TensorStore
    folder: pathlib.Path
    chunks: tuple[int, ...]
    layers: range  # indices into target.sources: one chunk row along the layer axis (range(1) if unstacked)
    rows: slice  # along the first axis of one layer of the leaf
    nbytes_in: int
    also: tuple["_Unit", ...] = ()  # the same layers and rows of the sibling leaves of ``target`` (its scales)
    gathers: tuple[tuple[int, "_Gather"], ...] = ()  # (layer, the chunk row of a sibling chunked deeper)

    @property
    def last(self) -> bool:
        """Whether this unit is the last to read its layers' source tensors."""
        shape = self.target.layer_shape
        return self.rows.stop is None or not shape or self.rows.stop >= shape[0]

    @property
    def depth(self) -> int:
        """Layers per chunk of the leaf (1 if it is not stacked)."""
        return max(1, self.chunks[0]) if self.target.stacked else 1


class _Gather:
    """One chunk row of a stacked leaf along its layer axis, assembled a layer at a time in one stacked
    buffer and written when its last layer is in: the row of a small leaf (all its layers, in the unit
    that converts them), or of the small ``<weight>_scale`` of a weight converted a layer per unit (each
    of those units puts its layer, from the value it quantized). Under ``SMALL_LAYER_CHUNK`` times the
    layers of memory, from the first layer in to the write."""

    def __init__(self, unit: _Unit):
        self.unit = unit  # the leaf's chunk row: its target, chunks and layers
        self.left = len(unit.layers)
        self.buf: np.ndarray | None = None
        self.lock = threading.Lock()

    def put(self, layer: int, x: np.ndarray, buffers: "_Buffers") -> int:
        """Store ``layer`` of the row from that layer's value ``x`` (region by region of the leaf's chunks:
        a quantizer sees the rows its weight's chunks saw); bytes written (by the last layer in)."""
        tgt, first = self.unit.target, self.unit.layers.start
        with self.lock:
            if self.buf is None:
                self.buf = np.empty((len(self.unit.layers), *tgt.layer_shape), fmt.np_dtype(tgt.leaf.dtype))
            buf = self.buf
        for _, region in _regions(tgt.layer_shape, self.unit.chunks[1:]):
            tgt.store(buf[(layer - first, *region, ...)], x, region)  # a view, also of a 0-d layer
        with self.lock:
            self.left -= 1
            if self.left:
                return 0
            self.buf = None
        return _write(self.unit, lambda out, j, region: np.copyto(out, buf[j - first][region]), buffers)


def _regions(shape: tuple[int, ...], per: tuple[int, ...], rows: slice = slice(None)):
    """(chunk index, region) of each chunk of one layer of ``shape`` (chunks ``per``) that holds ``rows``."""
    grid = [range(-(-n // c)) for n, c in zip(shape, per)]
    if shape:
        r0, r1, _ = rows.indices(shape[0])
        grid[0] = range(r0 // per[0], -(-r1 // per[0]))
    for idx in itertools.product(*grid):
        yield idx, tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, per, shape))


class _Buffers(threading.local):
    """Per-thread reusable output buffers (one large one kept, small ones cached by shape)."""

    def get(self, shape, dtype) -> np.ndarray:
        cache = self.__dict__.setdefault("cache", {})
        key = (tuple(shape), np.dtype(dtype).str)
        buf = cache.get(key)
        if buf is None:
            buf = np.empty(shape, dtype)
            if buf.nbytes > (1 << 20):
                for k in [k for k, v in cache.items() if v.nbytes > (1 << 20)]:
                    del cache[k]
            cache[key] = buf
        return buf


def _units(target: Target, array, folder: pathlib.Path, chunks: tuple[int, ...], siblings=()) -> list[_Unit]:
    """The units of a target: each chunk row of a stacked leaf along its layer axis (one layer, or every
    layer of a small leaf: ``sharding.SMALL_LAYER_CHUNK``), else the whole leaf or its chunk-aligned row
    ranges. ``siblings``: (target, chunks, array) of the leaves its last transform also fills, written by
    the same units (:func:`_attach`; a sibling's chunk may span rows of several row ranges: no split)."""
    leaf, n = target.leaf, len(target.sources)
    if target.stacked:
        depth = max(1, chunks[0])
        out = [_Unit(target, array, folder, chunks, r, slice(None), sum(target.sources[i].nbytes for i in r))
               for r in (range(s, min(n, s + depth)) for s in range(0, n, depth))]
    elif not leaf.shape or not target.splittable or siblings:
        out = [_Unit(target, array, folder, chunks, range(1), slice(None), target.in_bytes)]
    else:
        rows, step = leaf.shape[0], max(1, chunks[0])
        out = [_Unit(target, array, folder, chunks, range(1), slice(r0, min(rows, r0 + step)),
                     target.in_bytes * (min(rows, r0 + step) - r0) // max(rows, 1)) for r0 in range(0, rows, step)]
    for sibling in siblings:
        _attach(out, *sibling, folder)
    return out


def _attach(units: list[_Unit], target: Target, chunks: tuple[int, ...], array, folder: pathlib.Path) -> None:
    """Give the units of a weight its sibling leaf ``target`` (its scales): where the sibling's chunks hold
    as many layers as the units do, each unit writes the same layers of it (``also``); else each layer goes
    into a :class:`_Gather` of the sibling's chunk row, written once when all its layers are in."""
    if not units:
        return
    n = len(target.sources)
    depth = max(1, chunks[0]) if target.stacked else 1
    if depth == units[0].depth:
        for u in units:
            u.also += (_Unit(target, array, folder, chunks, u.layers, slice(None), 0),)
        return
    rows = [_Gather(_Unit(target, array, folder, chunks, range(s, min(n, s + depth)), slice(None), 0))
            for s in range(0, n, depth)]
    for u in units:
        u.gathers += tuple((j, rows[j // depth]) for j in u.layers)


def _run_unit(u: _Unit, comp: Component, buffers: _Buffers) -> int:
    """One unit: its target's transforms, then each chunk stored (cast) into a reused buffer and written;
    then the same for its siblings' chunks (``also``, ``gathers``), from the same value. A unit of several
    layers (a small leaf) stacks them, with its siblings', in :class:`_Gather` rows, one layer at a time."""
    tgt = u.target
    written = 0
    if u.depth == 1:
        x = tgt.value(u.layers.start, comp.array)
        for v in (u, *u.also):
            written += _write(v, lambda out, j, region, t=v.target: t.store(out, x, region), buffers)
        for j, row in u.gathers:
            written += row.put(j, x, buffers)
    else:
        rows = [_Gather(v) for v in (u, *u.also)]
        for j in u.layers:
            x = tgt.value(j, comp.array)
            for row in (*rows, *(g for i, g in u.gathers if i == j)):
                written += row.put(j, x, buffers)
    if u.last:
        for j in u.layers:
            for name in tgt.names(j):
                comp.release(name)
    return written


def _write(u: _Unit, fill, buffers: _Buffers) -> int:
    """Write the unit's region of its leaf; ``fill(out, layer, region)`` stores ``region`` (an index into
    one layer) of one of its layers into ``out``. Bytes written."""
    if not u.target.leaf.shape or _crc32c is None:  # generic path: TensorStore encodes and writes
        return _write_tensorstore(u, fill, buffers)
    return _write_chunks(u, fill, buffers)


def _write_tensorstore(u: _Unit, fill, buffers: _Buffers) -> int:
    tgt = u.target
    shape, dtype = tgt.layer_shape, fmt.np_dtype(tgt.leaf.dtype)
    if tgt.stacked:
        buf = buffers.get((len(u.layers), *shape), dtype)
        for k, j in enumerate(u.layers):
            fill(buf[k, ...], j, ...)
        where = u.array[u.layers.start:u.layers.stop]
    else:
        region = (u.rows,) if shape else ...
        buf = buffers.get((len(range(*u.rows.indices(shape[0]))), *shape[1:]) if shape else (), dtype)
        fill(buf, u.layers.start, region)
        where = u.array[u.rows]
    with _writing(u.folder / tgt.path):
        where.write(buf).result()
    return buf.nbytes


def _write_chunks(u: _Unit, fill, buffers: _Buffers) -> int:
    """Write the zarr3 chunks of a unit (its chunk row of layers, or the chunk rows of its row range).

    Each chunk: ``fill`` of each of its layers into a chunk-shaped buffer (for a unit of one layer, the
    target's last transform: the single fused copy, with the cast, from the layer's value, e.g. the source
    mmap), then its raw little-endian bytes followed by the crc32c of those bytes (the array's codecs), to
    ``c/<i>/<j>/...`` (zarr3 default chunk-key encoding)."""
    tgt, chunks, depth = u.target, u.chunks, u.depth
    per = chunks[1:] if tgt.stacked else chunks  # the chunk shape within one layer
    lead = (u.layers.start // depth,) if tgt.stacked else ()
    dtype = fmt.np_dtype(tgt.leaf.dtype)
    array_dir = u.folder / tgt.path
    written = 0
    for idx, region in _regions(tgt.layer_shape, per, u.rows):
        part = tuple(s.stop - s.start for s in region)
        buf = buffers.get(chunks, dtype)
        out = buf.reshape(depth, *per)
        if part != tuple(per) or len(u.layers) < depth:  # edge chunk: zarr stores it whole, padded with zeros
            buf[...] = 0
            out = out[(slice(None), *(slice(0, n) for n in part))]
        for k, j in enumerate(u.layers):
            fill(out[k, ...], j, region)
        _write_chunk(array_dir / fmt.chunk_key(lead + idx), buf)
        written += buf.nbytes
    return written


def _write_chunk(key: pathlib.Path, buf: np.ndarray) -> None:
    """One chunk file: the raw bytes of ``buf`` and their crc32c."""
    data = memoryview(buf.reshape(-1).view(np.uint8))
    with _writing(key):
        key.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            _write_all(fd, memoryview(struct.pack("<I", _crc32c(data))))
        finally:
            os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    """os.write until done: a short write (the disk filling up) continues, and then fails with its errno."""
    while data.nbytes:
        n = os.write(fd, data[: 1 << 30])
        data = data[n:]


def _open_outputs(folder: pathlib.Path, targets: list[Target], mesh_shape, ctx):
    import tensorstore as ts

    futures, out, failed = [], [], None
    try:
        for t in targets:
            itemsize = fmt.np_dtype(t.leaf.dtype).itemsize
            chunks = sharding.chunk_shape(t.leaf.shape, t.leaf.axes, mesh_shape, itemsize)
            spec = fmt.zarr_spec(folder, t.path, t.leaf, chunks)
            futures.append((t, chunks, ts.open(spec, create=True, context=ctx)))
        for t, chunks, f in futures:
            try:
                out.append((t, chunks, f.result()))
            except Exception as e:  # noqa: BLE001 - TensorStore error types vary
                failed = failed or (t, e)
    finally:  # even when interrupted: let every open finish, so nothing writes into the folder after cleanup
        for _, _, f in futures:
            try:
                f.result()
            except Exception:  # noqa: BLE001
                pass
    if failed:
        with _writing(fmt.array_dir(folder, failed[0].path) / "zarr.json"):
            raise failed[1]
    return out


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert",
                            dynamic_ncols=True, smoothing=0.1)
        self.lock = threading.Lock()

    def update(self, n: int):
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _check_output(output: pathlib.Path, force: bool) -> None:
    """Refuse an OUTPUT that must not be replaced (checked before any work, and again before writing)."""
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists; pass --force to replace it")
    if output.exists() and (not output.is_dir() or (not (output / fmt.MANIFEST).exists() and any(output.iterdir()))):
        raise OutputError(f"{output}: exists and is not a wan-jax checkpoint; refusing to replace it")


def _prepare_output(output: pathlib.Path, force: bool) -> pathlib.Path:
    """Check OUTPUT, clean up after earlier interrupted runs, and name this run's hidden temporary sibling
    (created by the caller inside its clean-up ``try``, so an interrupt cannot orphan it).

    Leftovers of a killed run (``.NAME.tmp-PID``, ``.NAME.old-PID`` of a PID that is gone) are removed
    here; the one exception is an ``.old-`` sibling while OUTPUT is missing, the previous checkpoint of
    a run killed between the two renames of the fallback commit: it is put back at OUTPUT first."""
    output = output.expanduser().absolute()
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: not writable")
    for stale in sorted(parent.glob(f".{output.name}.old-*")) + sorted(parent.glob(f".{output.name}.tmp-*")):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another conversion to the same OUTPUT is running
        if ".old-" in stale.name and not output.exists() and (stale / fmt.MANIFEST).exists():
            os.rename(stale, output)
        else:
            shutil.rmtree(stale, ignore_errors=True)
    _check_output(output, force)
    tmp = parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _remove(folder: pathlib.Path) -> None:
    """Delete a temporary folder, again if a late background write (TensorStore's threads) recreated part of it."""
    for _ in range(20):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.01)
        if not folder.exists():
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _commit(tmp: pathlib.Path, output: pathlib.Path) -> None:
    """Atomically put ``tmp`` at ``output``, replacing an old checkpoint only now that the new one is complete.

    A replacement is one atomic exchange of the two folders (Linux renameat2), so at every instant
    OUTPUT is the old or the new checkpoint; where the exchange is unavailable, two renames, and a
    kill between them leaves the old checkpoint in ``.NAME.old-PID``, which the next run puts back."""
    _fsync_dir(tmp)
    with _writing(output):
        if not output.exists():
            os.rename(tmp, output)
        elif _exchange(tmp, output):
            shutil.rmtree(tmp, ignore_errors=True)  # the old checkpoint, now at tmp
        else:
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(output.parent)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE). False where the OS or filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_file(path: pathlib.Path) -> None:
    with _writing(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _copy_side_files(repo: Repo, tmp: pathlib.Path, components: list[str]) -> None:
    """model_index.json, the components' config.json and the side folders (``Repo.side_files``: copied,
    or written where a source that is not a diffusers repository derived them)."""
    for rel, src in repo.side_files(components).items():
        with _writing(tmp / rel):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                (tmp / rel).write_bytes(src)
            else:
                shutil.copy2(src, tmp / rel)


def _write_text(path: pathlib.Path, text: str) -> None:
    with _writing(path):
        path.write_text(text)


def _component_tree(repo: Repo, component: str, config: dict, weights_dtype: str) -> dict:
    try:
        return fmt.component_tree(component, config, weights_dtype)
    except fmt.FormatError as e:
        raise SourceError(f"{repo.root / component / 'config.json'}: {e}") from None


def convert(source: str, output: str | os.PathLike, *, weights_dtype: str = "bfloat16", mesh: str | None = None,
            force: bool = False, threads: int | None = None, progress: bool = False, revision: str | None = None,
            hash_source: bool = True, only: list[str] | None = None, fsync: bool = False,
            transforms: Transforms | None = None, loras: Mapping[str, Sequence] | None = None,
            lora_ignore_unknown: bool = False, sources: SourceOptions | None = None,
            text_encoder_dtype: str | None = None) -> Summary:
    """Convert SOURCE (local diffusers repo or hub id; a single-file transformer or an original Wan-AI folder,
    with ``sources`` saying where it takes what it lacks: ``wan_convert.original``) into a checkpoint at
    OUTPUT. Returns a summary.

    ``only`` restricts the conversion to some components (e.g. a fine-tuned transformer); the result is
    then a partial checkpoint, marked as such in the manifest. The checkpoint appears at OUTPUT by an
    atomic rename, so a crash or kill never leaves a partial one there; ``fsync`` also makes it durable
    against power loss before the rename (slower: the disk's write speed). Chunk checksums catch
    anything torn at restore either way. ``transforms`` edits each target's transforms (see
    ``wan_convert.mapping.plan``); ``verify`` needs the same to compare with the source. ``loras``
    ({"transformer" / "transformer_2": ["FILE[:STRENGTH]" or ``lora.Lora``, ...]}) are merged into those
    weights in order, in float32 before the cast (:func:`read_loras`); the manifest records them.
    ``weights_dtype`` float8_e4m3fn / int8 quantizes the transformer blocks' 2-D weights (module doc);
    ``text_encoder_dtype`` (default: bfloat16 then, else ``weights_dtype``) is the text encoder's, and
    float8_e4m3fn / int8 quantizes its blocks' 2-D weights."""
    t0 = time.perf_counter()
    dtype_of = component_dtypes(weights_dtype, text_encoder_dtype)
    merged = read_loras(loras, lora_ignore_unknown)
    mesh_shape = sharding.parse_mesh(mesh)
    threads = threads or default_threads()
    output = pathlib.Path(output).expanduser().absolute()
    repo = resolve(source, revision, sources)
    _check_output(output, force)  # fail before any work
    if output.resolve().is_relative_to(repo.root):
        raise OutputError(f"{output}: inside SOURCE {repo.root}; write the checkpoint elsewhere")
    components = _components(repo, only)
    opened = {c: repo.component(c) for c in components}
    try:
        family = _family(repo, opened)
        trees = {c: _component_tree(repo, c, comp.config, dtype_of(c)) for c, comp in opened.items()}
        _check_loras(repo, merged, trees)
        hook = with_loras(merged, transforms) if merged else transforms
        plans = {c: plan(c, comp.tensors, trees[c], hook) for c, comp in opened.items()}
        hashes = _hash_in_background(repo) if hash_source else None
        tmp = _prepare_output(output, force)
        try:
            written = _write_arrays(tmp, plans, opened, mesh_shape, threads, progress, fsync)
            _copy_side_files(repo, tmp, components)
            manifest = fmt.build_manifest(
                family=family, converter=f"wan-convert {__version__}", weights_dtype=weights_dtype,
                source={"id": repo.source_id, "revision": repo.revision, "files": hashes() if hashes else None},
                mesh=sharding.format_mesh(mesh_shape), sharding_rules=sharding.DEFAULT_RULES, trees=trees,
                partial=bool(only), model_index=repo.model_index)
            _record_dtypes(manifest, weights_dtype, trees, {c: dtype_of(c) for c in trees})
            if merged:
                manifest["loras"] = {c: [lo.record() for lo in los] for c, los in merged.items()}
            _write_text(tmp / fmt.MANIFEST, json.dumps(manifest, indent=1) + "\n")
            _commit(tmp, output)
        except BaseException:
            _remove(tmp)
            raise
    finally:
        for comp in opened.values():
            comp.close()
    total_in = sum(t.in_bytes for p in plans.values() for t in p if not t.output)  # a sibling shares its weight's
    return Summary(output, family, total_in, written, time.perf_counter() - t0, sum(len(p) for p in plans.values()),
                   sum(len(los) for los in merged.values()))


def component_dtypes(weights_dtype: str, text_encoder_dtype: str | None = None):
    """``component -> the weights dtype its tree is built with``: ``weights_dtype``, except the text
    encoder's ``text_encoder_dtype`` (default: ``format.QUANT_BASE`` for a quantized ``weights_dtype``,
    else ``weights_dtype``; a quantized one quantizes its blocks). ValueError for a dtype that is not
    one of the format's."""
    if weights_dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(f"--dtype: unsupported weights dtype {weights_dtype!r} ({', '.join(fmt.STORAGE_DTYPES)})")
    if text_encoder_dtype is not None and text_encoder_dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(f"--text-encoder-dtype: unsupported dtype {text_encoder_dtype!r} "
                         f"({', '.join(fmt.STORAGE_DTYPES)})")
    quantized = weights_dtype in fmt.QUANT_DTYPES
    text = text_encoder_dtype or (fmt.QUANT_BASE if quantized else weights_dtype)
    return lambda component: text if component == "text_encoder" else weights_dtype


def _record_dtypes(manifest: dict, weights_dtype: str, trees: Mapping[str, dict], dtypes: Mapping[str, str]) -> None:
    """The manifest's ``dtype_policy``: ``components`` for a component stored in another dtype than
    ``weights`` (``format.component_dtype`` reads it), ``quantization`` naming the components whose
    tree holds quantized leaves (``trees``, built with ``dtypes``), when some do."""
    policy = manifest["dtype_policy"]
    other = {c: d for c, d in dtypes.items() if d != weights_dtype}
    if other:
        policy["components"] = other
    quantized = {c: d for c, d in dtypes.items()
                 if d in fmt.QUANT_DTYPES and any(leaf.dtype == d for leaf in fmt.flatten(trees[c]).values())}
    if quantized:
        policy["quantization"] = Quantize.record(quantized)
    fmt.check_manifest(manifest)


def read_loras(loras: Mapping[str, Sequence] | None, ignore_unknown: bool = False) -> dict[str, tuple]:
    """{component: ["FILE[:STRENGTH]" or ``lora.Lora``, ...]} -> {component: the LoRAs, read} (components
    with none left out). A bad strength, a missing file or an unknown key is a LoraError naming the flag,
    file or key (``ignore_unknown``: unknown keys are skipped and listed in each ``Lora.skipped``)."""
    out = {}
    for c, given in (loras or {}).items():
        if c not in LORA_FLAGS:
            raise lora_lib.LoraError(f"LoRAs merge into {' or '.join(LORA_FLAGS)}, not into {c}")
        specs = [x if isinstance(x, lora_lib.Lora) else lora_lib.parse_spec(str(x), LORA_FLAGS[c]) for x in given]
        read = tuple(x if isinstance(x, lora_lib.Lora) else lora_lib.read(*x, ignore_unknown=ignore_unknown)
                     for x in specs)
        if read:
            out[c] = read
    return out


def _check_loras(repo: Repo, merged: Mapping[str, Sequence], trees: Mapping[str, dict]) -> None:
    """Every LoRA names leaves of the component it merges into, with their shapes (before any output)."""
    for c, los in merged.items():
        if c not in trees:
            why = (f"the {c} is not converted (--only)" if c in repo.components() else
                   f"{repo.root} has one transformer (--lora-2 merges into transformer_2, the low-noise "
                   "expert of Wan 2.2 A14B)" if c == "transformer_2" else f"{repo.root} has no {c}")
            raise lora_lib.LoraError(f"{LORA_FLAGS[c]}: {why}")
        lora_lib.check(los, fmt.flatten(trees[c]), c)


def _components(repo: Repo, only: list[str] | None) -> list[str]:
    """The components to convert: ``only`` (each must exist), else all, which must make a whole Wan repo."""
    components = repo.components()
    if only:
        unknown = sorted(set(only) - set(components))
        if unknown:
            raise SourceError(f"--only: {repo.root} has no component {unknown[0]} (it has {', '.join(components)})")
        return [c for c in components if c in only]
    for needed in repo.needs:
        if needed not in components:
            raise SourceError(repo.missing(needed))
    side = repo.side_files(components)
    for rel, component in NEEDED_FILES.items():
        if component in components and rel not in side:
            raise SourceError(f"{repo.missing(rel)} to use the {component}")
    return components


def _family(repo: Repo, opened: dict[str, Component]) -> str:
    """The Wan family, from the configs (also of components ``--only`` leaves out)."""
    def config(c: str) -> dict | None:
        return opened[c].config if c in opened else repo.config(c)

    try:
        fam = families.detect(repo.model_index, config("transformer") or {}, config("vae"))
    except ValueError as e:
        raise SourceError(f"{repo.root / 'transformer' / 'config.json'}: {e}") from None
    cls = repo.model_index.get("_class_name")
    if cls and cls not in fam.pipelines:
        raise SourceError(f"{repo.root / 'model_index.json'}: {cls}, but transformer/config.json describes a "
                          f"{fam.name} transformer (a {' or '.join(fam.pipelines)}); the repository is inconsistent")
    return fam.name


def _hash_in_background(repo: Repo):
    """Start hashing the source files while converting (they are read anyway); returns the function that
    waits for the hashes (SourceError if a file could not be read)."""
    hashes: dict[str, str] = {}
    failed: list[OSError] = []

    def work():
        try:
            hashes.update(repo.file_hashes())
        except OSError as e:
            failed.append(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()

    def result() -> dict[str, str]:
        thread.join()
        if failed:
            e = failed[0]
            raise SourceError(f"{e.filename or repo.root}: cannot read for its sha256 ({e.strerror or e})")
        return hashes

    return result


def _write_arrays(tmp: pathlib.Path, plans: dict[str, list[Target]], opened: dict[str, Component], mesh_shape,
                  threads: int, progress: bool, fsync: bool) -> int:
    """Create ``tmp`` and write every component's arrays and Orbax metadata into it; returns bytes written."""
    with _writing(tmp):
        tmp.mkdir()
    ctx = fmt.ts_context(threads)
    units: list[tuple[_Unit, Component]] = []
    for c, targets in plans.items():
        folder = tmp / c
        with _writing(folder):
            folder.mkdir()
        outputs = {t.path: (t, chunks, arr) for t, chunks, arr in _open_outputs(folder, targets, mesh_shape, ctx)}
        for t, chunks, arr in outputs.values():
            if not t.output:  # a sibling leaf is written by its weight's units
                siblings = [outputs[p] for p in t.sibling_paths]
                units.extend((u, opened[c]) for u in _units(t, arr, folder, chunks, siblings))
    units.sort(key=lambda x: -x[0].nbytes_in)  # largest first keeps both threads busy to the end
    bar = _Progress(sum(u.nbytes_in for u, _ in units), progress)
    try:
        written = _run_units(units, threads, bar)
    finally:
        bar.close()
    if fsync:  # durable against power loss, at the disk's write speed (crash-safety needs no fsync)
        with ThreadPoolExecutor(threads, thread_name_prefix="fsync") as ex:
            list(ex.map(_fsync_file, (p for p in tmp.rglob("*") if p.is_file())))
    for c, targets in plans.items():
        _write_text(tmp / c / fmt.ORBAX_METADATA, json.dumps(fmt.orbax_metadata([t.path for t in targets])))
        _write_text(tmp / c / fmt.ORBAX_CHECKPOINT_METADATA, json.dumps(
            {"item_handlers": None, "metrics": {}, "performance_metrics": {},
             "init_timestamp_nsecs": time.time_ns(), "commit_timestamp_nsecs": time.time_ns(),
             "custom_metadata": {}}))
    return written


def _run_units(units: list[tuple[_Unit, Component]], threads: int, bar: _Progress) -> int:
    """Run the units on a thread pool, at most ``2 * threads`` in flight (bounded memory); bytes written."""
    buffers = _Buffers()
    written = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="convert") as ex:
        pending = set()
        for u, comp in units:
            if len(pending) >= 2 * threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                written += sum(f.result() for f in done)
            fut = ex.submit(_run_unit, u, comp, buffers)
            fut.add_done_callback(lambda f, n=u.nbytes_in: bar.update(n) if not f.exception() else None)
            pending.add(fut)
        done, _ = wait(pending)
        written += sum(f.result() for f in done)
    return written
