"""wan-convert when the disk fills up or the process dies: never a partial checkpoint at OUTPUT, a
replaced checkpoint survives intact until the new one is complete, and the next run succeeds.

Design (README, "Errors and guarantees"): a run writes into ``.OUTPUT.tmp-PID`` and renames it into
place (an atomic exchange when replacing), so OUTPUT is always absent, the previous checkpoint or the
new complete one. A killed run's temporary sibling is removed by the next run for the same OUTPUT."""
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest

from tests.reliability.conftest import (ENV, MODULES, PRIVATE_MOUNTS, assert_one_line_error, in_tmpfs, leftovers,
                                        run_cli)
from wan_convert.convert import convert
from wan_convert.verify import verify
from wan_runtime import format as fmt


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # preexec_fn: the child only sets a limit, then execs
@pytest.mark.parametrize("limit", [100, 2000, 30000], ids=["metadata", "chunk", "orbax-metadata"])
def test_file_size_limit(limit, tiny_repos, tmp_path):
    """RLIMIT_FSIZE makes some write fail with EFBIG (which one depends on the limit): one line naming the
    file inside the temporary folder, exit 2, nothing at OUTPUT, the temporary folder removed."""
    out = tmp_path / "ck"
    r = run_cli("wan-convert", tiny_repos["wan2.1-t2v"], out, "-q", preexec_fn=_limit_file_size(limit))
    line = assert_one_line_error("wan-convert", r.returncode, r.stderr, f".ck.tmp-", "cannot write",
                                 "file size limit")
    assert not out.exists() and leftovers(tmp_path, "ck") == [], line
    ok = run_cli("wan-convert", tiny_repos["wan2.1-t2v"], out, "-q")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.skipif(not PRIVATE_MOUNTS, reason="needs a private mount namespace (root and unshare) for a small tmpfs")
def test_disk_full(tiny_repos, tmp_path):
    """A real ENOSPC: OUTPUT on a 512 KiB tmpfs (the checkpoint needs ~2 MiB there)."""
    disk = tmp_path / "disk"
    r = run_cli("wan-convert", tiny_repos["wan2.1-t2v"], disk / "ck", "-q",
                prefix=in_tmpfs(disk, "size=512k", then=f"ls -A {disk}"))
    assert r.stdout.strip() == "", f"left on the full disk: {r.stdout}"
    assert_one_line_error("wan-convert", r.returncode, r.stderr, f"{disk}/.ck.tmp-", "the disk is full")


def _spawn(src, out, *args):
    return subprocess.Popen([sys.executable, "-m", MODULES["wan-convert"], str(src), str(out), "-q", *args],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path, proc, timeout=60.0) -> bool:
    """Poll until ``path`` exists (True) or the process ends (False)."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.0005)
    return True


def test_sigkill_at_random_points(tiny_repos, tmp_path):
    """SIGKILL at seeded random moments while writing, some runs creating OUTPUT and some replacing an
    existing checkpoint with --force: OUTPUT is always absent, the old checkpoint or a new complete one
    (every chunk reads back); then a normal run succeeds, verifies, and no hidden sibling is left."""
    src, out = tiny_repos["wan2.1-t2v"], tmp_path / "ck"
    rng = random.Random(20261122)
    # how long a run writes: from its temporary folder appearing to its exit
    p = _spawn(src, out)
    assert _wait_for(tmp_path / f".ck.tmp-{p.pid}", p)
    t0 = time.monotonic()
    assert p.wait() == 0, p.stderr.read()
    window = time.monotonic() - t0
    phases = []
    for i in range(8):
        replace = i % 2 == 1
        if replace:  # OUTPUT holds a complete float32 checkpoint; the killed run replaces it with bf16
            convert(str(src), out, weights_dtype="float32", force=True, hash_source=False)
            before = fmt.read_manifest(out)["created"], (out / fmt.MANIFEST).read_bytes()
        else:
            import shutil
            shutil.rmtree(out, ignore_errors=True)
        p = _spawn(src, out, "--force", "--dtype", "bfloat16", "--threads", str(rng.choice([1, 2, 4])))
        if i < 2:  # anywhere in the process's life, start-up included
            time.sleep(rng.uniform(0.0, 1.5))
        elif _wait_for(tmp_path / f".ck.tmp-{p.pid}", p):
            time.sleep(rng.uniform(0.0, 1.1 * window))
        p.kill()
        code = p.wait()
        tmp = tmp_path / f".ck.tmp-{p.pid}"
        mid_write = code == -signal.SIGKILL and tmp.exists()
        phases.append("finished" if code == 0 else "mid-write" if mid_write else "killed")
        if out.exists():
            verify(out)  # complete: every chunk present, whole, its crc32c right
            m = fmt.read_manifest(out)
            if m["dtype_policy"]["weights"] == "float32":
                assert replace and (m["created"], (out / fmt.MANIFEST).read_bytes()) == before, "old checkpoint changed"
            else:
                assert m["dtype_policy"]["weights"] == "bfloat16"
        else:
            assert not replace, f"run {i}: the previous checkpoint is gone ({phases[-1]})"
    print("kills:", phases)
    assert phases.count("mid-write") >= 3, phases  # the interesting case really happened
    assert leftovers(tmp_path, "ck"), "expected temporary folders of killed runs"
    r = run_cli("wan-convert", src, out, "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path, "ck") == [], "the next run removes what killed runs left"
    assert verify(out, str(src)) > 0


def test_sigterm_cleans_up(tiny_repos, tmp_path):
    """SIGTERM (or Ctrl-C) mid-write: exit 130, one line, OUTPUT absent and the temporary folder removed."""
    src, out = tiny_repos["wan2.1-t2v"], tmp_path / "ck"
    for attempt in range(5):
        p = _spawn(src, out, "--threads", "1")
        if _wait_for(tmp_path / f".ck.tmp-{p.pid}", p):
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate()
        if p.returncode == 0:  # finished before the signal landed: try again
            import shutil
            shutil.rmtree(out)
            continue
        assert p.returncode == 130, err
        assert err.decode().strip().splitlines() == ["wan-convert: interrupted; nothing was written at OUTPUT"]
        assert not out.exists() and leftovers(tmp_path, "ck") == []
        return
    pytest.fail("the conversion always finished before SIGTERM arrived")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_fallback_commit_puts_the_old_checkpoint_back(tiny_repos, tmp_path, monkeypatch):
    """Without an atomic exchange (non-Linux, some filesystems) a replacement is two renames; a run killed
    between them leaves OUTPUT missing and the old checkpoint in .NAME.old-PID: the next run restores it."""
    import wan_convert.convert as conv

    src, out = tiny_repos["wan2.1-t2v"], tmp_path / "ck"
    convert(str(src), out, weights_dtype="float32", hash_source=False)
    pid = _dead_pid()
    out.rename(tmp_path / f".ck.old-{pid}")  # the state after the first rename of a killed run
    (tmp_path / f".ck.tmp-{pid}").mkdir()
    (tmp_path / f".ck.tmp-{pid}" / "half-written").write_text("x")
    r = run_cli("wan-convert", src, out, "-q")
    assert_one_line_error("wan-convert", r.returncode, r.stderr, "already exists")  # it is back: --force needed
    assert fmt.read_manifest(out)["dtype_policy"]["weights"] == "float32" and leftovers(tmp_path, "ck") == []
    verify(out)
    monkeypatch.setattr(conv, "_exchange", lambda a, b: False)  # the two-rename path itself
    convert(str(src), out, force=True, hash_source=False)
    assert fmt.read_manifest(out)["dtype_policy"]["weights"] == "bfloat16" and leftovers(tmp_path, "ck") == []
