"""The generation worker: one thread that loads the pipeline once, warms up the default size, then takes
batches of queued jobs (``JobStore.claim``) and runs each batch through ``WanPipeline.generate_batch``.

Outputs go to ``<data-dir>/videos/<id>.mp4`` (and ``.png``, the first frame; ``.json``, the sidecar), each
written whole to a temporary sibling and renamed; only then is the job marked completed. A server killed
between the two re-runs the job, which writes the same files again.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import pathlib
import threading
import time
import traceback
from typing import Any

from .. import __version__
from ..errors import one_line
from . import validate
from .jobs import Job, JobStore

log = logging.getLogger("wan-serve")


@dataclasses.dataclass
class Options:
    """What the worker loads and how (wan-serve's flags)."""

    checkpoint: pathlib.Path
    data_dir: pathlib.Path
    preset: str | None = None
    max_batch: int = 4
    mesh: str | None = None
    dtype: str | None = None
    offload: str = "auto"
    loras: tuple = ()
    loras_2: tuple = ()
    compile_cache: str | None = None
    warmup: bool = True


class Metrics:
    """Counters for ``/metrics`` (since this process started)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.generations: collections.Counter = collections.Counter()  # by final status
        self.seconds: collections.Counter = collections.Counter()  # by phase
        self.batches = 0
        self.batch_videos = 0

    def add(self, status: str, n: int = 1) -> None:
        with self.lock:
            self.generations[status] += n

    def add_batch(self, timings: dict[str, float], videos: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_videos += videos
            for k, v in timings.items():
                if k not in ("total", "load"):
                    self.seconds[k] += v


class Worker(threading.Thread):
    def __init__(self, store: JobStore, ckpt, opts: Options):
        super().__init__(name="wan-serve-worker", daemon=True)
        self.store, self.ckpt, self.opts = store, ckpt, opts
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.load_error: str | None = None
        self.pipe = None
        self.current: list[str] = []
        self.videos = opts.data_dir / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - reported by /health and the log; the server stays up to say so
            self.load_error = one_line(e)
            log.error("wan-serve: loading failed: %s\n%s", self.load_error, traceback.format_exc())
            return
        self.ready.set()
        while not self.stopping.is_set():
            jobs = self.store.claim(self.opts.max_batch)
            if not jobs:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            self.current = [j.id for j in jobs]
            try:
                self._run_batch(jobs)
            finally:
                self.current = []

    def stop(self) -> None:
        """Finish the current batch, then end (graceful shutdown)."""
        self.stopping.set()
        self.wake.set()

    def _load(self) -> None:
        from ..pipeline import WanPipeline

        t0 = time.perf_counter()
        o = self.opts
        self.pipe = WanPipeline.from_converted(o.checkpoint, mesh=o.mesh, dtype=o.dtype, compilation_cache=o.compile_cache,
                                               preset=None, offload=o.offload)
        self.pipe.set_loras(o.loras, o.loras_2)
        log.info("wan-serve: loaded %s in %.1f s", o.checkpoint, time.perf_counter() - t0)
        if o.warmup:
            config = validate.config_of({"settings": {}, "image": False}, self.ckpt, o.preset) \
                if self.pipe.family.image_input != "required" else None
            if config is not None:
                s = self.pipe.warmup(config.height, config.width, config.frames,
                                     max_sequence_length=config.max_sequence_length)
                log.info("wan-serve: warmed up %dx%d x %d frames in %.1f s", config.width, config.height,
                         config.frames, s)

    # ------------------------------------------------------------------ one batch
    def _run_batch(self, jobs: list[Job]) -> None:
        from ..image import load_image
        from ..runconfig import InputError

        ids = [j.id for j in jobs]
        try:
            configs = [validate.config_of(j.request, self.ckpt, self.opts.preset) for j in jobs]
            images = [load_image(self.opts.data_dir / "inputs" / f"{j.id}.png") if j.request["image"] else None
                      for j in jobs]
            steps, last = configs[0].steps, [-1]

            def progress(i: int) -> None:
                pct = int(95 * (i + 1) / steps)
                if pct != last[0]:
                    last[0] = pct
                    self.store.set_progress(ids, pct)

            t0 = time.perf_counter()
            gens = self.pipe.generate_batch([j.request["prompt"] for j in jobs], configs,
                                            images=images if any(im is not None for im in images) else None,
                                            output_type="uint8", progress=progress)
            seconds = time.perf_counter() - t0
        except (InputError, validate.RequestError, ValueError) as e:
            return self._fail(jobs, "invalid_request", one_line(e))
        except Exception as e:  # noqa: BLE001 - a failed generation fails its jobs; the server goes on
            log.error("wan-serve: batch %s failed:\n%s", ids, traceback.format_exc())
            return self._fail(jobs, "generation_failed", one_line(e))
        self.metrics.add_batch(gens[0].timings.as_dict(), len(jobs))
        for job, gen in zip(jobs, gens):
            t = time.perf_counter()
            self._write(job, gen, seconds)
            with self.metrics.lock:
                self.metrics.seconds["write"] += time.perf_counter() - t
            if self.store.finish(job):
                self.metrics.add("completed")
            else:  # deleted while it ran
                self.remove_outputs(job.id)

    def _fail(self, jobs: list[Job], code: str, message: str) -> None:
        for job in jobs:
            if self.store.finish(job, {"code": code, "message": message}):
                self.metrics.add("failed")

    def _write(self, job: Job, gen, seconds: float) -> None:
        from ..video import write_mp4, write_sidecar

        mp4 = self.videos / f"{job.id}.mp4"
        write_mp4(mp4, gen.frames, fps=gen.config.fps)
        buf = io.BytesIO()
        import PIL.Image

        PIL.Image.fromarray(gen.frames[0]).save(buf, format="PNG")
        atomic_write(self.videos / f"{job.id}.png", buf.getvalue())
        write_sidecar(mp4, self.record(job, gen, seconds))

    def record(self, job: Job, gen, seconds: float) -> dict[str, Any]:
        return {"id": job.id, **self.pipe.record(gen, job.request["prompt"], image=job.request["image"]),
                "batch": len(self.current), "attempt": job.attempts, "seconds": round(seconds, 4),
                "wan_serve": __version__}

    def remove_outputs(self, job_id: str) -> None:
        for suffix in (".mp4", ".png", ".json"):
            (self.videos / f"{job_id}{suffix}").unlink(missing_ok=True)


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """``data`` to ``path`` whole or not at all (a temporary sibling, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
