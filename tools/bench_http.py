"""Which web framework wan-serve stands on: Starlette against FastAPI (Starlette plus pydantic), measured.

    python tools/bench_http.py [--requests 400] [--json out/bench_http.json]

For each: the import time in a fresh interpreter (median of 5: it is part of every server start), and the
median latency of a small JSON GET and of a multipart POST like the ``openai`` client's ``videos.create``
(a prompt and four form fields), over ``--requests`` sequential requests from one keep-alive client to a
uvicorn server in a subprocess on loopback. Both apps do the same work per request (parse, build a dict,
answer JSON); FastAPI's is declared the FastAPI way (typed ``Form`` parameters, validated by pydantic).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import socket
import statistics
import subprocess
import sys
import time

APPS = {
    "starlette": '''
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
async def get(request):
    return JSONResponse({"id": request.path_params["id"], "object": "video", "status": "queued", "progress": 0})
async def post(request):
    form = await request.form()
    return JSONResponse({"prompt": form["prompt"], "size": form.get("size"), "seconds": form.get("seconds"),
                         "seed": int(form.get("seed", 0)), "steps": int(form.get("num_inference_steps", 50))})
app = Starlette(routes=[Route("/v1/videos/{id}", get), Route("/v1/videos", post, methods=["POST"])])
''',
    "fastapi": '''
from fastapi import FastAPI, Form
app = FastAPI()
@app.get("/v1/videos/{id}")
async def get(id: str):
    return {"id": id, "object": "video", "status": "queued", "progress": 0}
@app.post("/v1/videos")
async def post(prompt: str = Form(), size: str | None = Form(None), seconds: str | None = Form(None),
               seed: int = Form(0), num_inference_steps: int = Form(50)):
    return {"prompt": prompt, "size": size, "seconds": seconds, "seed": seed, "steps": num_inference_steps}
''',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_seconds(name: str) -> float:
    module = "starlette.applications" if name == "starlette" else name
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(5)]
    return statistics.median(runs)


def latency(name: str, n: int, workdir: pathlib.Path) -> dict:
    import httpx

    (workdir / f"app_{name}.py").write_text(APPS[name])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", f"app_{name}:app", "--port", str(port), "--log-level",
                             "warning"], cwd=workdir)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(100):
                try:
                    c.get("/v1/videos/x")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            out = {}
            for kind in ("get", "post"):
                times = []
                for i in range(n):
                    t = time.perf_counter()
                    if kind == "get":
                        r = c.get(f"/v1/videos/video_{i}")
                    else:
                        r = c.post("/v1/videos", files={"prompt": (None, "a fox"), "size": (None, "96x64"),
                                                        "seconds": (None, "4"), "seed": (None, str(i)),
                                                        "num_inference_steps": (None, "8")})
                    r.raise_for_status()
                    times.append(time.perf_counter() - t)
                out[kind] = statistics.median(times[n // 10:])
            return out
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--workdir", default="/tmp/wan-bench-http")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = pathlib.Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in APPS:
        rows[name] = {"import_s": import_seconds(name), **{f"{k}_ms": v * 1e3 for k, v in latency(name, a.requests,
                                                                                                  work).items()}}
    print(f"{'framework':10} {'import s':>9} {'GET ms':>7} {'POST ms':>8}")
    for name, r in rows.items():
        print(f"{name:10} {r['import_s']:9.3f} {r['get_ms']:7.3f} {r['post_ms']:8.3f}")
    s, f = rows["starlette"], rows["fastapi"]
    print(f"fastapi / starlette: import {f['import_s'] / s['import_s']:.2f}x, GET {f['get_ms'] / s['get_ms']:.2f}x, "
          f"POST {f['post_ms'] / s['post_ms']:.2f}x")
    if a.json:
        pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.json).write_text(json.dumps({"bench": "http", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
