"""wan-serve in a subprocess for the tests (tests/test_serve*.py, tests/reliability/test_serve_kills.py)."""
from __future__ import annotations

import io
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-wan2.1-t2v"
BIN = pathlib.Path(sys.executable).parent


class ServerProcess:
    """``wan-serve`` in a subprocess; ``url`` once it listens; ``wait_ready()`` once warm."""

    def __init__(self, checkpoint, data_dir, *args, compile_cache=None):
        cmd = [str(BIN / "wan-serve"), "--checkpoint", str(checkpoint), "--port", "0", "--data-dir", str(data_dir),
               *map(str, args)]
        env = {**os.environ, "WAN_JAX_COMPILATION_CACHE": str(compile_cache)} if compile_cache else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        listening = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"on (http://[\d.]+:\d+)", line)
                if m:
                    self.url = m.group(1)
                    listening.set()
            listening.set()

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(120) or self.url is None:
            self.kill()
            raise RuntimeError("wan-serve did not start:\n" + "".join(self.lines))

    def wait_ready(self, timeout: float = 300, headers=None) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if httpx.get(f"{self.url}/health", headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "wan-serve exited:\n" + "".join(self.lines)
            time.sleep(0.2)
        raise TimeoutError("wan-serve not ready:\n" + "".join(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def decode(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(io.BytesIO(data), extension=".mp4")
