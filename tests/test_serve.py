"""wan-serve as a real process on the bundled tiny checkpoint, on a free loopback port: the official
``openai`` client (create, retrieve, list, download, delete) and raw HTTP for Wan's fields; outputs equal to
wan-run's bitwise; 20+ kinds of bad request refused with the field named while the server stays up; the
bearer token; a full queue.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import re
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tests.serve_util import BIN, ServerProcess, decode  # noqa: E402  (after the skips: it needs httpx)



@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory, serve_compile_cache):
    s = ServerProcess(serve_ckpt, tmp_path_factory.mktemp("data"), "--max-body-mb", "1",
                      compile_cache=serve_compile_cache)
    s.wait_ready()
    yield s
    s.kill()


def poll(get, job_id, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = get(job_id)
        status = v.status if hasattr(v, "status") else v["status"]
        if status in ("completed", "failed"):
            return v
        time.sleep(0.2)
    raise TimeoutError(job_id)


def wan_run_frames(serve_ckpt, tmp_path, serve_compile_cache, *args) -> np.ndarray:
    out = tmp_path / f"ref-{abs(hash(args))}.mp4"
    subprocess.run([str(BIN / "wan-run"), "--checkpoint", str(serve_ckpt), "--output", str(out), "-q", *map(str, args)],
                   check=True, capture_output=True, env={**os.environ, "WAN_JAX_COMPILATION_CACHE": str(serve_compile_cache)})
    return decode(out.read_bytes())


def test_openai_client_create_retrieve_list_download_delete(server, serve_ckpt, tmp_path, serve_compile_cache):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompt = "a red fox runs through fresh snow"
    video = client.videos.create(prompt=prompt, model="tiny", size="96x64", seconds="1",
                                 extra_body={"seed": 7, "num_inference_steps": 3})
    assert video.status == "queued" and video.progress == 0 and video.id.startswith("video_")
    done = poll(client.videos.retrieve, video.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    assert done.size == "96x64" and done.model == "tiny"
    assert video.id in [v.id for v in client.videos.list(limit=50)]
    content = client.videos.download_content(video.id).read()
    frames = decode(content)
    assert frames.shape == (9, 64, 96, 3)  # 1 s at the tiny preset's 8 fps -> 4k+1 = 9 frames, the requested size
    ref = wan_run_frames(serve_ckpt, tmp_path, serve_compile_cache, "--prompt", prompt, "--seed", 7, "--steps", 3,
                         "--height", 64, "--width", 96, "--frames", 9)
    np.testing.assert_array_equal(frames, ref)  # wan-run with the same settings and seed, bitwise
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    import PIL.Image

    assert PIL.Image.open(io.BytesIO(thumb)).size == (96, 64)
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert video.id not in [v.id for v in client.videos.list(limit=50)]


def test_raw_http_wan_fields_and_sidecar(server, serve_ckpt, tmp_path, serve_compile_cache):
    body = {"prompt": "waves on a beach", "negative_prompt": "blurry", "num_frames": 5, "num_inference_steps": 2,
            "guidance_scale": 1.0, "seed": 11, "flow_shift": 5.0}
    r = httpx.post(f"{server.url}/v1/videos", json=body)
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["wan"]["frames"] == 5 and v["wan"]["guidance"] == 1.0 and v["wan"]["negative_prompt"] == "blurry"
    done = poll(lambda i: httpx.get(f"{server.url}/v1/videos/{i}").json(), v["id"])
    assert done["status"] == "completed", done
    side = httpx.get(f"{server.url}/v1/videos/{v['id']}/content", params={"variant": "sidecar"}).json()
    assert side["prompt"] == body["prompt"] and side["seed"] == 11 and side["settings"]["flow_shift"] == 5.0
    frames = decode(httpx.get(f"{server.url}/v1/videos/{v['id']}/content").content)
    ref = wan_run_frames(serve_ckpt, tmp_path, serve_compile_cache, "--prompt", body["prompt"], "--negative-prompt", "blurry",
                         "--frames", 5, "--steps", 2, "--guidance", 1.0, "--seed", 11, "--flow-shift", 5.0)
    np.testing.assert_array_equal(frames, ref)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'wan_serve_generations_total\{status="completed"\} [1-9]', metrics)
    assert re.search(r'wan_serve_phase_seconds_total\{phase="denoise"\} \d', metrics)


#: (form or JSON body, expected status, the field the error names); each a different way to be wrong
BAD = [
    ({}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "x" * 30_000}, 400, "prompt"),
    ({"prompt": "a", "size": "big"}, 400, "size"),
    ({"prompt": "a", "size": "100x64"}, 400, "size"),
    ({"prompt": "a", "num_frames": "10"}, 400, "num_frames"),
    ({"prompt": "a", "num_frames": "1.5"}, 400, "num_frames"),
    ({"prompt": "a", "num_inference_steps": "0"}, 400, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": "many"}, 400, "num_inference_steps"),
    ({"prompt": "a", "guidance_scale": "-1"}, 400, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": "nan"}, 400, "guidance_scale"),
    ({"prompt": "a", "seed": "-1"}, 400, "seed"),
    ({"prompt": "a", "seed": str(2**32)}, 400, "seed"),
    ({"prompt": "a", "flow_shift": "0"}, 400, "flow_shift"),
    ({"prompt": "a", "seconds": "0"}, 400, "seconds"),
    ({"prompt": "a", "model": "sora-2"}, 400, "model"),
    ({"prompt": "a", "cache": "bogus"}, 400, "cache"),
    ({"prompt": "a", "colour": "red"}, 400, "colour"),
    ({"prompt": "a", "input_reference": ("x.png", b"not an image", "image/png")}, 400, "input_reference"),
]


def _post(url, fields):
    data = {k: v for k, v in fields.items() if not isinstance(v, tuple)}
    files = {k: v for k, v in fields.items() if isinstance(v, tuple)}
    # multipart, as the openai client sends it (a text field as a part without a filename)
    parts = {**{k: (None, v) for k, v in data.items()}, **files} or {"empty": (None, "")}
    if not fields:
        return httpx.post(f"{url}/v1/videos", json={})
    return httpx.post(f"{url}/v1/videos", files=parts)


@pytest.mark.parametrize("fields,status,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_request_names_the_field(server, fields, status, param):
    r = _post(server.url, fields)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    assert "\n" not in err["message"]


def test_other_refusals_and_the_server_stays_up(server, tmp_path):
    u = server.url
    checks = [
        (httpx.post(f"{u}/v1/videos", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (httpx.post(f"{u}/v1/videos", json=["a list"]), 400),
        (httpx.post(f"{u}/v1/videos", content=b"prompt", headers={"content-type": "text/plain"}), 415),
        (httpx.post(f"{u}/v1/videos", files={"prompt": (None, "a"), "input_reference": ("big.png", b"0" * 1_500_000)}),
         413),
        (httpx.get(f"{u}/v1/videos/video_nope"), 404),
        (httpx.delete(f"{u}/v1/videos/video_nope"), 404),
        (httpx.get(f"{u}/v1/videos/video_nope/content"), 404),
        (httpx.get(f"{u}/v1/videos", params={"limit": 0}), 400),
        (httpx.get(f"{u}/v1/videos", params={"after": "video_nope"}), 400),
        (httpx.get(f"{u}/no/such/route"), 404),
    ]
    for r, status in checks:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["error"]["message"]
    queued = httpx.post(f"{u}/v1/videos", json={"prompt": "slow", "num_inference_steps": 40}).json()
    r = httpx.get(f"{u}/v1/videos/{queued['id']}/content")
    assert r.status_code in (409, 200) and (r.status_code == 200 or "completed" in r.json()["error"]["message"])
    r = httpx.get(f"{u}/v1/videos/{queued['id']}/content", params={"variant": "gif"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "variant"
    assert httpx.get(f"{u}/health").status_code == 200 and server.proc.poll() is None
    assert poll(lambda i: httpx.get(f"{u}/v1/videos/{i}").json(), queued["id"])["status"] == "completed"


def test_token_and_full_queue(serve_ckpt, tmp_path, serve_compile_cache):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    s = ServerProcess(serve_ckpt, tmp_path / "data", "--token-file", token, "--max-queue", 2, "--no-warmup",
                      compile_cache=serve_compile_cache)
    try:
        auth = {"Authorization": "Bearer s3cret-token"}
        s.wait_ready(headers=auth)
        for r in (httpx.get(f"{s.url}/v1/videos"), httpx.get(f"{s.url}/health"),
                  httpx.post(f"{s.url}/v1/videos", json={"prompt": "a"}),
                  httpx.get(f"{s.url}/v1/videos", headers={"Authorization": "Bearer wrong"})):
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{s.url}/").status_code == 200  # the page itself holds no data
        codes = [httpx.post(f"{s.url}/v1/videos", json={"prompt": f"job {i}", "num_inference_steps": 30},
                            headers=auth).status_code for i in range(3)]
        assert codes == [200, 200, 429]
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret-token", max_retries=0)
        assert len(client.videos.list().data) == 2
    finally:
        s.kill()


def test_bad_flags_are_one_line(serve_ckpt, tmp_path):
    for args, needle in (
        (["--checkpoint", str(tmp_path / "nope")], "nope"),
        (["--checkpoint", str(serve_ckpt), "--token-file", str(tmp_path / "missing")], "--token-file"),
        (["--checkpoint", str(serve_ckpt), "--lora", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
    ):
        r = subprocess.run([str(BIN / "wan-serve"), *args, "--port", "0"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_jobs_table_is_what_the_api_shows(server):
    """The queue is in SQLite under --data-dir (WAL): what the API lists is what the file holds."""
    import sqlite3

    data = pathlib.Path(server.proc.args[server.proc.args.index("--data-dir") + 1])
    db = sqlite3.connect(data / "jobs.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ids = {r[0] for r in db.execute("SELECT id FROM jobs WHERE deleted = 0")}
    listed = set()
    after = None
    while True:
        page = httpx.get(f"{server.url}/v1/videos", params={"limit": 3, **({"after": after} if after else {})}).json()
        listed |= {v["id"] for v in page["data"]}
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert listed == ids and json.loads(json.dumps(sorted(ids)))
