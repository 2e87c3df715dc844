"""wan-serve killed (SIGKILL) three times at random moments while 30 accepted jobs run, restarted on the same
--data-dir each time: every job completes exactly once, none is lost, each video is its own (prompt, seed)'s.
"""
from __future__ import annotations

import random
import sqlite3
import time

import numpy as np
import pytest


httpx = pytest.importorskip("httpx")

from tests.serve_util import ServerProcess, decode  # noqa: E402  (after the skip: it needs httpx)
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # ffmpeg (mp4 decode) beside JAX

JOBS = 30


def _in_progress(url: str) -> bool:
    try:
        return any(v["status"] == "in_progress" for v in httpx.get(f"{url}/v1/videos", params={"limit": 100}).json()["data"])
    except httpx.TransportError:
        return False


def test_sigkill_three_times_loses_nothing(serve_ckpt, serve_compile_cache, tmp_path):
    rng = random.Random(1234)
    data = tmp_path / "data"
    server = ServerProcess(serve_ckpt, data, "--max-batch", 3, compile_cache=serve_compile_cache)
    accepted = {}
    try:
        for i in range(JOBS):  # accepted while the server is still loading: they wait in the queue
            body = {"prompt": f"job {i}: a lighthouse in a storm", "seed": 100 + i, "num_inference_steps": 2 + i % 2,
                    "num_frames": 5}
            r = httpx.post(f"{server.url}/v1/videos", json=body)
            assert r.status_code == 200, r.text
            accepted[r.json()["id"]] = body
        for kill in range(3):
            t0 = time.time()
            while not _in_progress(server.url) and time.time() - t0 < 300:  # a kill in the middle of a job
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            server.kill()
            server = ServerProcess(serve_ckpt, data, "--max-batch", 3, compile_cache=serve_compile_cache)
        t0 = time.time()
        while time.time() - t0 < 600:
            page = httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]
            if sum(v["status"] == "completed" for v in page) == JOBS:
                break
            assert not any(v["status"] == "failed" for v in page), page
            time.sleep(0.3)
        videos = {v["id"]: v for v in httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]}
        contents = {i: decode(httpx.get(f"{server.url}/v1/videos/{i}/content").content) for i in accepted}
    finally:
        server.kill()
    assert set(videos) == set(accepted) and all(v["status"] == "completed" for v in videos.values())
    rows = sqlite3.connect(data / "jobs.sqlite").execute("SELECT id, completions, attempts FROM jobs").fetchall()
    assert {r[0] for r in rows} == set(accepted)
    assert all(r[1] == 1 for r in rows), rows  # each completed exactly once
    assert sum(r[2] for r in rows) > JOBS, rows  # some ran more than once: killed mid-job, re-run from the start

    # each video is its own: equal to an in-process generation of its settings (decoded mp4 of equal frames)
    from wan_runtime.pipeline import WanPipeline
    from wan_runtime.runconfig import DEFAULT_NEGATIVE
    from wan_runtime.video import write_mp4

    pipe = WanPipeline.from_converted(serve_ckpt, preset="tiny")  # what the server resolves for a test-sized model
    errors = []
    for job_id, body in accepted.items():
        gen = pipe(body["prompt"], num_inference_steps=body["num_inference_steps"], seed=body["seed"],
                   num_frames=body["num_frames"], output_type="uint8", negative_prompt=DEFAULT_NEGATIVE)
        ref = tmp_path / "ref.mp4"
        write_mp4(ref, gen.frames, fps=gen.config.fps)
        want = decode(ref.read_bytes()).astype(np.int16)
        errors.append(np.abs(contents[job_id].astype(np.int16) - want).mean())
        assert errors[-1] < 0.5, (job_id, errors[-1])  # batched runs equal solo ones within 1e-5 before uint8
    assert max(errors) < 0.5


def test_sigterm_finishes_the_running_job(serve_ckpt, serve_compile_cache, tmp_path):
    """Graceful stop: SIGTERM while a job runs -> that job completes, the process exits 0; the queued
    job behind it stays queued and runs after a restart."""  # noqa: D401
    import signal

    data = tmp_path / "data"
    server = ServerProcess(serve_ckpt, data, "--max-batch", 1, compile_cache=serve_compile_cache)
    try:
        server.wait_ready()
        running = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a long one", "num_inference_steps": 40}).json()
        waiting = httpx.post(f"{server.url}/v1/videos", json={"prompt": "next", "num_inference_steps": 2}).json()
        t0 = time.time()
        while not _in_progress(server.url) and time.time() - t0 < 120:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown (ours: the running job first) is done
        assert server.proc.wait(120) in (0, -signal.SIGTERM), "".join(server.lines)
    finally:
        server.kill()
    db = sqlite3.connect(data / "jobs.sqlite")
    status = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert status == {running["id"]: "completed", waiting["id"]: "queued"}
    assert (data / "videos" / f"{running['id']}.mp4").stat().st_size > 0
    server = ServerProcess(serve_ckpt, data, compile_cache=serve_compile_cache)
    try:
        t0 = time.time()
        while httpx.get(f"{server.url}/v1/videos/{waiting['id']}").json()["status"] != "completed":
            assert time.time() - t0 < 300
            time.sleep(0.2)
    finally:
        server.kill()
