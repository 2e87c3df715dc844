"""Convert a diffusers Wan repository into a wan-jax checkpoint (see wan_runtime.format).

The work is a list of *units*: one layer of a stacked leaf, or one chunk-aligned row range of an
unstacked leaf. A thread pool runs them; each unit makes the single copy from the source mmap into a
reused per-thread buffer with the dtype cast fused in (numpy casting, round-to-nearest-even for
bfloat16, the same bits as torch's ``.to(torch.bfloat16)``), then writes its chunks with TensorStore
and drops the source pages it read. At most ``2 * threads`` units are in flight, so peak memory is
bounded by a few units, not by the model.

Atomicity: everything is written into a hidden sibling of OUTPUT and renamed into place at the end; an
existing OUTPUT is replaced only with ``force`` and only after the new checkpoint is complete.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
import pathlib
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from wan_runtime import format as fmt
from wan_runtime import sharding

from . import __version__
from .mapping import Target, plan
from .source import Component, Repo, SourceError, resolve

try:  # hardware crc32c (SSE4.2 / ARMv8); without it TensorStore encodes the chunks
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover
    _crc32c = None

COPIED_FOLDERS = ("tokenizer", "scheduler", "image_processor", "feature_extractor")


class OutputError(ValueError):
    """OUTPUT cannot be written (exists without --force, not writable, ...)."""


@dataclasses.dataclass
class Summary:
    output: pathlib.Path
    family: str
    bytes_read: int
    bytes_written: int
    seconds: float
    leaves: int

    def line(self) -> str:
        gb = 1e9
        return (f"converted {self.family}: {self.leaves} arrays, read {self.bytes_read / gb:.2f} GB, wrote "
                f"{self.bytes_written / gb:.2f} GB in {self.seconds:.2f} s ({self.bytes_read / gb / max(self.seconds, 1e-9):.2f} "
                f"GB/s of input) -> {self.output}")


def default_threads() -> int:
    # units mostly wait on TensorStore writes (checksums, file I/O); two per core keeps the cores busy
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


def ts_context(threads: int):
    import tensorstore as ts

    return ts.Context({
        "cache_pool": {"total_bytes_limit": 0},
        "data_copy_concurrency": {"limit": threads},
        "file_io_concurrency": {"limit": max(4, 2 * threads)},
    })


@dataclasses.dataclass
class _Unit:
    target: Target
    array: object  # tensorstore.TensorStore
    folder: pathlib.Path
    chunks: tuple[int, ...]
    layer: int  # index into target.sources
    rows: slice  # along the first axis of the (per-layer) source array
    nbytes_in: int


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


def _units(target: Target, array, folder: pathlib.Path, chunks: tuple[int, ...]) -> list[_Unit]:
    leaf = target.leaf
    if target.stacked:
        per = target.sources[0].nbytes if target.sources[0] else 0
        return [_Unit(target, array, folder, chunks, i, slice(None), per) for i in range(len(target.sources))]
    if not leaf.shape:
        return [_Unit(target, array, folder, chunks, 0, slice(None), target.in_bytes)]
    rows, step = leaf.shape[0], max(1, chunks[0])
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out.append(_Unit(target, array, folder, chunks, 0, slice(r0, r1), target.in_bytes * (r1 - r0) // max(rows, 1)))
    return out


def _run_unit(u: _Unit, comp: Component, buffers: _Buffers, folder: pathlib.Path, chunks: tuple[int, ...]) -> int:
    """One unit: cast the source region chunk by chunk into a reused buffer and write each chunk file."""
    tgt, leaf = u.target, u.target.leaf
    info = tgt.sources[u.layer]
    want = leaf.shape[1:] if tgt.stacked else leaf.shape
    src = comp.array(info.name).reshape(want)[u.rows]
    dtype = fmt.np_dtype(leaf.dtype)
    if not leaf.shape or _crc32c is None:  # generic path: TensorStore encodes and writes
        buf = buffers.get(src.shape, dtype)
        np.copyto(buf, src, casting="unsafe")
        (u.array[u.layer] if tgt.stacked else u.array[u.rows]).write(buf).result()
        written = buf.nbytes
    else:
        if tgt.stacked:
            src, row = src[None], u.layer
        else:
            row = (u.rows.start or 0) // chunks[0]
        written = _write_chunks(folder / tgt.path, src, row, chunks, dtype, buffers)
    if tgt.stacked or u.rows.stop is None or u.rows.stop >= (leaf.shape[0] if leaf.shape else 0):
        comp.release(info.name)
    return written


def _write_chunks(array_dir: pathlib.Path, src: np.ndarray, row: int, chunks: tuple[int, ...], dtype,
                  buffers: _Buffers) -> int:
    """Write the zarr3 chunks of chunk-row ``row`` (src spans exactly that row of chunks along axis 0).

    Each chunk: the single fused copy (cast) from the mmap into a chunk-shaped buffer, then its raw
    little-endian bytes followed by the crc32c of those bytes (the array's codecs), to
    ``c/<row>/<j>/...`` (zarr3 default chunk-key encoding), fsync'd."""
    grid = [range(-(-n // c)) for n, c in zip(src.shape[1:], chunks[1:])]
    written = 0
    for idx in itertools.product(*grid):
        region = (slice(None),) + tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks[1:]))
        part = src[region]
        buf = buffers.get(chunks, dtype)
        if part.shape != tuple(chunks):  # edge chunk: zarr stores the full chunk, padded with the fill value
            buf[...] = 0
            buf[tuple(slice(0, n) for n in part.shape)] = part
        else:
            np.copyto(buf, part, casting="unsafe")
        key = array_dir / fmt.chunk_key((row, *idx))
        key.parent.mkdir(parents=True, exist_ok=True)
        data = memoryview(buf.reshape(-1).view(np.uint8))
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data) if data.nbytes < (1 << 30) else _write_all(fd, data)
            os.write(fd, struct.pack("<I", _crc32c(data)))
        finally:
            os.close(fd)
        written += buf.nbytes
    return written


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        n = os.write(fd, data[: 1 << 30])
        data = data[n:]


def _open_outputs(folder: pathlib.Path, targets: list[Target], mesh_shape, ctx):
    import tensorstore as ts

    futures = []
    for t in targets:
        itemsize = fmt.np_dtype(t.leaf.dtype).itemsize
        chunks = sharding.chunk_shape(t.leaf.shape, t.leaf.axes, mesh_shape, itemsize)
        spec = fmt.zarr_spec(folder, t.path, t.leaf, chunks)
        futures.append((t, chunks, ts.open(spec, create=True, context=ctx)))
    return [(t, chunks, f.result()) for t, chunks, f in futures]


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


def _prepare_output(output: pathlib.Path, force: bool) -> pathlib.Path:
    output = output.expanduser().absolute()
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists; pass --force to replace it")
    if output.exists() and not (output / fmt.MANIFEST).exists() and any(output.iterdir()):
        raise OutputError(f"{output}: exists and is not a wan-jax checkpoint; refusing to replace it")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: not writable")
    # clear leftovers of earlier interrupted runs for this output
    for stale in parent.glob(f".{output.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _commit(tmp: pathlib.Path, output: pathlib.Path) -> None:
    """Atomically put ``tmp`` at ``output`` (replacing an old checkpoint only now that the new one is complete)."""
    _fsync_dir(tmp)
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)
    _fsync_dir(output.parent)


def _fsync_file(path: pathlib.Path) -> None:
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
    shutil.copy2(repo.root / "model_index.json", tmp / "model_index.json")
    for name in COPIED_FOLDERS:
        src = repo.root / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
    for c in components:
        shutil.copy2(repo.root / c / "config.json", tmp / c / "config.json")


def convert(source: str, output: str | os.PathLike, *, weights_dtype: str = "bfloat16", mesh: str | None = None,
            force: bool = False, threads: int | None = None, progress: bool = False, revision: str | None = None,
            hash_source: bool = True, only: list[str] | None = None, fsync: bool = False) -> Summary:
    """Convert SOURCE (local diffusers repo or hub id) into a checkpoint at OUTPUT. Returns a summary.

    ``only`` restricts the conversion to some components (e.g. a fine-tuned transformer); the result is
    then a partial checkpoint, marked as such in the manifest. The checkpoint appears at OUTPUT by an
    atomic rename, so a crash or kill never leaves a partial one there; ``fsync`` also makes it durable
    against power loss before the rename (slower: the disk's write speed). Chunk checksums catch
    anything torn at restore either way."""
    t0 = time.perf_counter()
    if weights_dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype: unsupported weights dtype {weights_dtype!r} (bfloat16, float16, float32)")
    mesh_shape = sharding.parse_mesh(mesh)
    threads = threads or default_threads()
    output = pathlib.Path(output).expanduser().absolute()
    repo = resolve(source, revision)
    if output.exists() and not force:  # fail before any work
        raise OutputError(f"{output}: already exists; pass --force to replace it")
    components = repo.components()
    if only:
        unknown = sorted(set(only) - set(components))
        if unknown:
            raise SourceError(f"--only: {repo.root} has no component {unknown[0]} (it has {', '.join(components)})")
        components = [c for c in components if c in only]
    else:
        for needed in ("transformer", "vae", "text_encoder"):
            if needed not in components:
                raise SourceError(f"{repo.root}: model_index.json has no {needed}; not a complete Wan repository "
                                  "(use --only to convert single components)")
    opened = {c: Component(repo.root / c) for c in components}
    vae_cfg = opened["vae"].config if "vae" in opened else None
    tcfg = json.loads((repo.root / "transformer" / "config.json").read_text())
    family = fmt.detect_family(repo.model_index, tcfg, vae_cfg)
    plans = {c: plan(c, comp.tensors, fmt.component_tree(c, comp.config, weights_dtype))
             for c, comp in opened.items()}

    # hash the source files in the background while converting (they are read anyway)
    hashes: dict[str, str] = {}
    hasher = threading.Thread(target=lambda: hashes.update(repo.file_hashes()), daemon=True)
    if hash_source:
        hasher.start()

    tmp = _prepare_output(output, force)
    ctx = ts_context(threads)
    total_in = sum(t.in_bytes for p in plans.values() for t in p)
    bar = _Progress(total_in, progress)
    written = 0
    try:
        units: list[tuple[_Unit, Component]] = []
        for c, targets in plans.items():
            folder = tmp / c
            folder.mkdir()
            for t, chunks, arr in _open_outputs(folder, targets, mesh_shape, ctx):
                units.extend((u, opened[c]) for u in _units(t, arr, folder, chunks))
        # largest first keeps both threads busy to the end
        units.sort(key=lambda x: -x[0].nbytes_in)
        buffers = _Buffers()
        with ThreadPoolExecutor(threads, thread_name_prefix="convert") as ex:
            pending = set()
            for u, comp in units:
                if len(pending) >= 2 * threads:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    written += sum(f.result() for f in done)
                fut = ex.submit(_run_unit, u, comp, buffers, u.folder, u.chunks)
                fut.add_done_callback(lambda f, n=u.nbytes_in: bar.update(n) if not f.exception() else None)
                pending.add(fut)
            done, _ = wait(pending)
            written += sum(f.result() for f in done)
            if fsync:  # durable against power loss, at the disk's write speed (crash-safety needs no fsync)
                list(ex.map(_fsync_file, (p for p in tmp.rglob("*") if p.is_file())))
        for c, targets in plans.items():
            (tmp / c / fmt.ORBAX_METADATA).write_text(json.dumps(fmt.orbax_metadata([t.path for t in targets])))
            (tmp / c / fmt.ORBAX_CHECKPOINT_METADATA).write_text(json.dumps(
                {"item_handlers": None, "metrics": {}, "performance_metrics": {},
                 "init_timestamp_nsecs": time.time_ns(), "commit_timestamp_nsecs": time.time_ns(),
                 "custom_metadata": {}}))
        _copy_side_files(repo, tmp, components)
        if hash_source:
            hasher.join()
        manifest = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "family": family,
            "converter": f"wan-convert {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"id": repo.source_id, "revision": repo.revision, "files": hashes if hash_source else None},
            "dtype_policy": {"weights": weights_dtype, "float32": "norms and diffusers' _keep_in_fp32_modules "
                             "(wan_runtime.format.stored_dtype)"},
            "mesh": sharding.format_mesh(mesh_shape),
            "sharding_rules": dict(sharding.DEFAULT_RULES),
            "partial": bool(only),
            "components": {c: {"arrays": len(p), "bytes": sum(math.prod(t.leaf.shape) * fmt.np_dtype(t.leaf.dtype).itemsize
                                                                for t in p)} for c, p in plans.items()},
        }
        if "boundary_ratio" in repo.model_index:
            manifest["boundary_ratio"] = repo.model_index.get("boundary_ratio")
        (tmp / fmt.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        for comp in opened.values():
            comp.close()
    return Summary(output, family, total_in, written, time.perf_counter() - t0, sum(len(p) for p in plans.values()))
