"""Shared fixtures, and the test tiers: a test that needs the reference implementations (torch,
diffusers, transformers: directly, or through the tiny repositories they build) is marked ``oracle``;
``python -m pytest -m "not oracle"`` runs the rest, and then refuses those imports, so the fast tier
proves it needs none of them."""
import importlib.abc
import pathlib
import re
import sys

import pytest

from wan_runtime.families import NAMES as FAMILIES

ORACLE_PACKAGES = ("torch", "diffusers", "transformers")
_ORACLE_SOURCE = re.compile(r"^\s*(?:import|from)\s+(?:torch|diffusers|transformers|make_tiny_checkpoint)\b|"
                            r"importorskip\(\"(?:torch|diffusers|transformers)", re.M)
#: fixtures that build or use the tiny repositories (made with diffusers' classes)
ORACLE_FIXTURES = {"tiny_repos"}


def _oracle_module(path: pathlib.Path) -> bool:
    return path.suffix == ".py" and bool(_ORACLE_SOURCE.search(path.read_text()))


def _fast_tier(config) -> bool:
    return config.getoption("markexpr", "").replace(" ", "") == "notoracle"


def pytest_ignore_collect(collection_path, config):
    """The fast tier does not even import the modules that import the reference packages."""
    if _fast_tier(config) and collection_path.name.startswith("test_") and _oracle_module(collection_path):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    sources = {}
    for item in items:
        path = pathlib.Path(str(item.fspath))
        if path not in sources:
            sources[path] = _oracle_module(path)
        if sources[path] or ORACLE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.oracle)


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ORACLE_PACKAGES:
            raise ImportError(f"{name}: the fast tier (-m 'not oracle') must not need the reference packages")
        return None


def pytest_configure(config):
    if _fast_tier(config):
        sys.meta_path.insert(0, _Refuse())


@pytest.fixture(scope="session")
def tiny_repos(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Every tiny diffusers-format family, written once per session with diffusers' own classes."""
    import make_tiny_checkpoint as mtc

    root = tmp_path_factory.mktemp("tiny")
    return {fam: mtc.write(fam, root / fam, seed=0) for fam in FAMILIES}


@pytest.fixture(scope="session")
def converted(tiny_repos, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Every tiny family converted with default settings (bf16, one device)."""
    from wan_convert.convert import convert

    root = tmp_path_factory.mktemp("converted")
    return {fam: convert(str(src), root / fam, hash_source=True).output for fam, src in tiny_repos.items()}


@pytest.fixture(scope="session")
def converted_f32(tiny_repos, tmp_path_factory):
    """``get(family)``: a float32 conversion of the tiny repo (for float32 parity), made on first use and
    shared by the session."""
    from wan_convert.convert import convert

    root, cache = tmp_path_factory.mktemp("converted-f32"), {}

    def get(family: str) -> pathlib.Path:
        if family not in cache:
            cache[family] = convert(str(tiny_repos[family]), root / family, weights_dtype="float32").output
        return cache[family]
    return get


@pytest.fixture(scope="session")
def measured():
    """``measured(key, value, **info)`` records a figure a test measured (a max abs error, a PSNR) under a
    stable key such as "pipeline/wan2.1-t2v/latents_max_abs"; the session writes them to
    out/measured.json (see the repo-root conftest.py) and tools/report.py renders the README from it."""
    import conftest as root_conftest

    def record(key: str, value: float, **info):
        root_conftest.MEASURED[key] = {"value": float(value), **info}
    return record


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory) -> pathlib.Path:
    """The bundled tiny Wan 2.1 T2V converted by the wan-convert command (for the wan-serve tests)."""
    import subprocess

    from tests.serve_util import BIN, TINY

    out = tmp_path_factory.mktemp("serve") / "tiny"
    subprocess.run([str(BIN / "wan-convert"), str(TINY), str(out), "-q"], check=True)
    return out


@pytest.fixture(scope="session")
def serve_compile_cache(tmp_path_factory) -> pathlib.Path:
    """One persistent compilation cache for every wan-serve / wan-run process the tests start."""
    return tmp_path_factory.mktemp("xla-cache")
