"""Compiled executables kept across processes, so a warm start neither traces nor compiles.

JAX's persistent compilation cache (also on) skips XLA compilation but still traces and lowers every
function to compute its key, which is most of a warm start here. This cache keys each stage by
everything that determines its executable (the stage's static key, the argument tree with shapes,
dtypes and shardings, the model configs, the jax/jaxlib versions and devices, and a fingerprint of
this package's source) and stores the serialized executable; a hit is deserialized in milliseconds.

Opt-in (``WAN_JAX_EXECUTABLE_CACHE=1`` or ``wan-run --executable-cache``): on XLA:CPU (jaxlib 0.10.2)
some deserialized executables fail at dispatch ("Function wrapped_broadcast not found"), and it has not
been tried on GPU/TPU here. JAX's persistent compilation cache is the default.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import pickle
from typing import Any, Callable

import jax


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    h = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _signature(args) -> str:
    leaves, tree = jax.tree.flatten(args)
    parts = [str(tree)]
    for a in leaves:
        sharding = getattr(a, "sharding", None)
        parts.append(f"{getattr(a, 'shape', ())}:{getattr(a, 'dtype', type(a).__name__)}:{sharding!r}")
    return "|".join(parts)


def _device_ids(compiled) -> list[int]:
    """The executable's device assignment (deserialize_and_load would otherwise assume all devices)."""
    for s in jax.tree.leaves(compiled.input_shardings):
        assignment = getattr(s, "_device_assignment", None)
        if assignment:
            return [d.id for d in assignment]
    return [jax.devices()[0].id]


class ExecutableCache:
    def __init__(self, folder: str | os.PathLike | None):
        self.folder = pathlib.Path(folder) if folder else None
        self.hits = 0

    def key(self, key: Any, context: str, args) -> str:
        devices = ",".join(f"{d.platform}:{d.device_kind}:{d.id}" for d in jax.devices())
        raw = "\n".join([repr(key), context, _signature(args), jax.__version__, jax.lib.__version__ if hasattr(
            jax.lib, "__version__") else "", devices, _code_fingerprint()])
        return hashlib.sha256(raw.encode()).hexdigest()

    def get_or_compile(self, key: Any, context: str, fn: Callable, *args):
        if self.folder is None:
            return jax.jit(fn).lower(*args).compile()
        path = self.folder / f"{self.key(key, context, args)}.exe"
        if path.exists():
            try:
                from jax.experimental import serialize_executable as se

                payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
                by_id = {d.id: d for d in jax.devices()}
                compiled = se.deserialize_and_load(payload, in_tree, out_tree,
                                                   execution_devices=[by_id[i] for i in device_ids])
                self.hits += 1
                return compiled
            except Exception:  # noqa: BLE001 - a stale or damaged entry is recompiled and replaced
                path.unlink(missing_ok=True)
        # Compile afresh, not through JAX's persistent cache: an executable that was itself loaded from a
        # serialized form does not serialize again completely on XLA:CPU ("Function ... not found").
        from jax._src import config as jax_config

        with jax_config.enable_compilation_cache(False):
            compiled = jax.jit(fn).lower(*args).compile()
        try:
            from jax.experimental import serialize_executable as se

            blob = pickle.dumps((*se.serialize(compiled), _device_ids(compiled)))
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        except Exception:  # noqa: BLE001 - executables with host callbacks etc. cannot be serialized
            pass
        return compiled
