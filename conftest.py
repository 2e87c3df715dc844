"""Repo-root pytest setup: import paths for the two packages, and 8 simulated CPU devices."""
import os
import pathlib
import sys

# Must happen before JAX initialises its backends (sharding tests use 8 simulated CPU devices).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_root = pathlib.Path(__file__).parent
for sub in ("runtime", "convert", "tools"):
    p = str(_root / sub)
    if p not in sys.path:
        sys.path.insert(0, p)


# ---- measured figures: tests record what they measure (errors, PSNRs) with the `measured` fixture
# (tests/conftest.py); at the end of the session they are merged into out/measured.json, from which
# `python tools/report.py` renders the README's parity table. A subset run updates only its own keys.
MEASURED: dict = {}


def pytest_sessionfinish(session, exitstatus):
    if not MEASURED:
        return
    import json

    path = pathlib.Path(os.environ.get("WAN_JAX_MEASURED", _root / "out" / "measured.json"))
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        old = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**old, **MEASURED}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
