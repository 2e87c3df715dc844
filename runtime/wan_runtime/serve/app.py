"""The HTTP side of wan-serve (Starlette): the OpenAI videos API, ``/health``, ``/metrics`` and the page.

Every request but ``GET /`` (the static page, which holds no data) needs ``Authorization: Bearer TOKEN``
when a token is set. Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
for a bad field (named in ``param``), 401 without the token, 404 for an unknown id or route, 409 for the
content of a job not completed, 413 for a body over the limit, 429 for a full queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import pathlib
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import families
from . import validate
from .jobs import JobStore, QueueFull, new_id, public
from .validate import RequestError
from .worker import Worker, atomic_write

PAGE = pathlib.Path(__file__).with_name("page.html")


class Server:
    """The routes' shared state: the job store, the worker, the checkpoint and the limits."""

    def __init__(self, store: JobStore, worker: Worker, ckpt, tokenizer, *, model: str, preset: str | None,
                 max_queue: int, max_body: int, token: str | None):
        self.store, self.worker, self.ckpt, self.tokenizer = store, worker, ckpt, tokenizer
        self.model, self.preset, self.max_queue, self.max_body, self.token = model, preset, max_queue, max_body, token
        self.inputs = worker.opts.data_dir / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.family = families.get(ckpt.family)
        c = validate.config_of({"settings": {}, "image": self.family.image_input == "required"}, ckpt, preset)
        #: the defaults a request gets (shown by the page)
        self.defaults = {"size": f"{c.width}x{c.height}", "num_frames": c.frames, "num_inference_steps": c.steps,
                         "guidance_scale": c.guidance, "seed": c.seed, "fps": c.fps}

    def job_or_404(self, job_id: str):
        job = self.store.get(job_id)
        if job is None:
            raise RequestError(f"video_id: no video {job_id!r}", "video_id", 404, "not_found_error")
        return job

    def video(self, job) -> dict:
        return public(job, self.model, {"wan": job.request["settings"]})

    # ------------------------------------------------------------------ routes
    async def create(self, request: Request) -> Response:
        fields, image = await self._body(request)
        request_record, config, img = validate.check(fields, image, self.ckpt, self.tokenizer, model=self.model,
                                                     preset=self.preset)
        job_id = new_id()
        if img is not None:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write(self.inputs / f"{job_id}.png", buf.getvalue())
        try:
            job = self.store.add(request_record, validate.batch_key(config, img is not None), self.max_queue, job_id)
        except QueueFull as e:
            (self.inputs / f"{job_id}.png").unlink(missing_ok=True)
            raise RequestError(str(e), None, 429, "rate_limit_error") from None
        self.worker.wake.set()
        return JSONResponse(self.video(job))

    async def _body(self, request: Request) -> tuple[dict[str, Any], bytes | None]:
        """The request's fields and uploaded image bytes; 413 past ``max_body`` bytes (counted as they arrive)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise RequestError(f"request body of {length} bytes is over the limit of {self.max_body}", None, 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise RequestError(f"request body is over the limit of {self.max_body} bytes", None, 413)
        request._body = bytes(body)  # starlette reads a cached body from here for .form()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                fields = json.loads(body)
            except ValueError as e:
                raise RequestError(f"body: not valid JSON ({e})") from None
            if not isinstance(fields, dict):
                raise RequestError("body: must be a JSON object")
            image = fields.pop("input_reference", None)
            return fields, _data_url(image) if image is not None else None
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await request.form(max_files=1, max_fields=64, max_part_size=self.max_body)
            fields, image = {}, None
            for key, value in form.multi_items():
                if key == "input_reference":
                    image = await value.read() if hasattr(value, "read") else _data_url(value)
                elif hasattr(value, "read"):
                    raise RequestError(f"{key}: a file where a value was expected", key)
                else:
                    fields[key] = value
            return fields, image
        raise RequestError(f"content-type: expected application/json or multipart/form-data, got {kind or 'none'!r}",
                           "content-type", 415)

    async def retrieve(self, request: Request) -> Response:
        return JSONResponse(self.video(self.job_or_404(request.path_params["video_id"])))

    async def list(self, request: Request) -> Response:
        q = request.query_params
        limit = validate.number("limit", q.get("limit", "20"), int)
        if not 1 <= limit <= 100:
            raise RequestError(f"limit: must be in [1, 100], got {limit}", "limit")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise RequestError(f"order: 'asc' or 'desc', got {order!r}", "order")
        try:
            jobs, more = self.store.list(limit, q.get("after"), order)
        except KeyError:
            raise RequestError(f"after: no video {q.get('after')!r}", "after") from None
        data = [self.video(j) for j in jobs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    async def delete(self, request: Request) -> Response:
        job_id = request.path_params["video_id"]
        job = self.store.delete(job_id)
        if job is None:
            raise RequestError(f"video_id: no video {job_id!r}", "video_id", 404, "not_found_error")
        if job_id not in self.worker.current:  # a running job's outputs go when it ends
            self.worker.remove_outputs(job_id)
        (self.inputs / f"{job_id}.png").unlink(missing_ok=True)
        return JSONResponse({"id": job_id, "object": "video.deleted", "deleted": True})

    async def content(self, request: Request) -> Response:
        job = self.job_or_404(request.path_params["video_id"])
        variant = request.query_params.get("variant", "video")
        suffix = {"video": (".mp4", "video/mp4"), "thumbnail": (".png", "image/png"),
                  "sidecar": (".json", "application/json")}.get(variant)
        if suffix is None:
            raise RequestError(f"variant: one of video, thumbnail, sidecar; got {variant!r}", "variant")
        if job.status != "completed":
            raise RequestError(f"video {job.id} is {job.status}; its content exists once it is completed", None, 409)
        path = self.worker.videos / f"{job.id}{suffix[0]}"
        if not path.is_file():
            raise RequestError(f"video {job.id}: its {variant} is missing from the data folder", None, 404,
                               "not_found_error")
        return FileResponse(path, media_type=suffix[1], filename=path.name)

    async def health(self, request: Request) -> Response:
        w = self.worker
        if w.load_error:
            return JSONResponse({"status": "failed", "error": w.load_error}, 500)
        status = "ready" if w.ready.is_set() else "loading"
        return JSONResponse({"status": status, "model": self.model, "family": self.ckpt.family,
                             "image_input": self.family.image_input, "defaults": self.defaults,
                             "queue": self.store.counts()},
                            200 if status == "ready" else 503)

    async def metrics(self, request: Request) -> Response:
        counts, m = self.store.counts(), self.worker.metrics
        lines = ["# TYPE wan_serve_ready gauge", f"wan_serve_ready {int(self.worker.ready.is_set())}",
                 "# TYPE wan_serve_queue_depth gauge"]
        lines += [f'wan_serve_queue_depth{{status="{s}"}} {counts[s]}' for s in ("queued", "in_progress")]
        with m.lock:
            lines += ["# TYPE wan_serve_generations_total counter"]
            lines += [f'wan_serve_generations_total{{status="{s}"}} {m.generations[s]}' for s in ("completed", "failed")]
            lines += ["# TYPE wan_serve_phase_seconds_total counter"]
            lines += [f'wan_serve_phase_seconds_total{{phase="{k}"}} {v:.6f}' for k, v in sorted(m.seconds.items())]
            lines += ["# TYPE wan_serve_batches_total counter", f"wan_serve_batches_total {m.batches}",
                      "# TYPE wan_serve_batch_videos_total counter", f"wan_serve_batch_videos_total {m.batch_videos}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())


def _data_url(value: Any) -> bytes:
    """An image given inline: a ``data:image/...;base64,`` URL (JSON bodies, form strings)."""
    import base64
    import binascii

    if isinstance(value, str) and value.startswith("data:") and ";base64," in value:
        try:
            return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            pass
    raise RequestError("input_reference: an image file upload or a data:image/...;base64, URL", "input_reference")


def make_app(server: Server, on_shutdown=None) -> Starlette:
    """The Starlette app; ``on_shutdown()`` runs when the server stops (SIGTERM: after the current batch)."""
    def guarded(handler, public_route: bool = False):
        async def endpoint(request: Request) -> Response:
            try:
                if server.token and not public_route:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                        raise RequestError("missing or wrong bearer token (Authorization: Bearer ...)", None, 401,
                                           "authentication_error")
                return await handler(request)
            except RequestError as e:
                return JSONResponse(e.body(), e.status)
        return endpoint

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(RequestError(f"{request.method} {request.url.path}: {exc.detail}", None,
                                         exc.status_code).body(), exc.status_code)

    s = server
    routes = [Route("/", guarded(s.page, True)), Route("/health", guarded(s.health)), Route("/metrics", guarded(s.metrics)),
              Route("/v1/videos", guarded(s.create), methods=["POST"]), Route("/v1/videos", guarded(s.list)),
              Route("/v1/videos/{video_id}", guarded(s.retrieve)),
              Route("/v1/videos/{video_id}", guarded(s.delete), methods=["DELETE"]),
              Route("/v1/videos/{video_id}/content", guarded(s.content))]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    return Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
