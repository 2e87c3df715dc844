"""Helpers for the reliability suite: the real CLIs (subprocess or in-process), the one-line error
contract, safetensors header surgery, and "hollow" checkpoints (configs, no arrays) that prove a check
ran before any weights were read."""
import json
import os
import pathlib
import shlex
import shutil
import struct
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}
MODULES = {"wan-convert": "wan_convert.cli", "wan-run": "wan_runtime.cli"}


def run_cli(prog: str, *args, prefix: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The real command-line tool in a fresh process (``python -m`` of its module, as the console script)."""
    cmd = [sys.executable, "-m", MODULES[prog], *map(str, args)]
    if prefix:  # e.g. a shell that mounts something first: prefix + [the command as one string]
        cmd = [*prefix, shlex.join(cmd)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=kw.pop("timeout", 300), **kw)


def invoke(prog: str, *args):
    """The same command in this process through click's CliRunner (fast: no interpreter start-up)."""
    from click.testing import CliRunner

    if prog == "wan-convert":
        from wan_convert.cli import main
    else:
        from wan_runtime.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], prog_name=prog)


def assert_one_line_error(prog: str, returncode: int, stderr: str, *needles: str) -> str:
    """Exit code 2, exactly one stderr line ``PROG: error: ...`` naming every needle, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert returncode == 2, (returncode, stderr)
    return lines[0]


def leftovers(parent: pathlib.Path, name: str) -> list[str]:
    """Hidden siblings a conversion to parent/name may create (temporary folder, replaced checkpoint)."""
    return sorted(p.name for p in parent.glob(f".{name}.*"))


# ---------------------------------------------------------------- safetensors surgery
def read_st(path: pathlib.Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: pathlib.Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def edit_json(path: pathlib.Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)  # edits in place
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def t2v_src(tiny_repos, tmp_path) -> pathlib.Path:
    """A private copy of the tiny Wan 2.1 T2V diffusers repo (tests damage it)."""
    return pathlib.Path(shutil.copytree(tiny_repos["wan2.1-t2v"], tmp_path / "src"))


def make_hollow(checkpoint: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A copy of a checkpoint with every array folder removed: manifest, configs, tokenizer remain. Any
    command that reaches the weights fails on it with "cannot open"; a flag check must fail first."""
    return pathlib.Path(shutil.copytree(
        checkpoint, dest, ignore=lambda d, names: [n for n in names if (pathlib.Path(d) / n / "zarr.json").exists()]))


@pytest.fixture(scope="session")
def hollow(converted, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("hollow")
    return {fam: make_hollow(ck, root / fam) for fam, ck in converted.items() if fam in ("wan2.1-t2v", "wan2.1-i2v")}


def _private_mounts() -> bool:
    """True if this process may mount a tmpfs in a private mount namespace (root, util-linux unshare)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


PRIVATE_MOUNTS = _private_mounts()


def in_tmpfs(folder: pathlib.Path, options: str, then: str = "") -> list[str]:
    """A command prefix: mount a tmpfs with ``options`` at ``folder`` in a private mount namespace (no one
    else sees it; it vanishes with the process), run the command, then ``then`` (shell, same namespace),
    and exit with the command's code."""
    folder.mkdir(parents=True, exist_ok=True)
    after = f"; rc=$?; {then}; exit $rc" if then else ""
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))} && '
            f'sh -c "$0"{after}']
