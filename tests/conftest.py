import pathlib

import pytest

FAMILIES = ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")


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
def measured():
    """``measured(key, value, **info)`` records a figure a test measured (a max abs error, a PSNR) under a
    stable key such as "pipeline/wan2.1-t2v/latents_max_abs"; the session writes them to
    out/measured.json (see the repo-root conftest.py) and tools/report.py renders the README from it."""
    import conftest as root_conftest

    def record(key: str, value: float, **info):
        root_conftest.MEASURED[key] = {"value": float(value), **info}
    return record
