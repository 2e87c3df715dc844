"""The code base's layout rules (README "Architecture"): functions a reader can take in at once, entry
points shorter still, no side channels on the pipeline, one registry of families."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "runtime" / "wan_runtime", ROOT / "convert" / "wan_convert")
#: entry points: (file, qualified name) -> at most 60 lines
ENTRY_POINTS = {("runtime/wan_runtime/pipeline.py", "WanPipeline.__call__"),
                ("runtime/wan_runtime/pipeline.py", "WanPipeline.generate"),
                ("runtime/wan_runtime/cli.py", "main"), ("runtime/wan_runtime/cli.py", "run"),
                ("convert/wan_convert/cli.py", "convert_cmd"), ("convert/wan_convert/cli.py", "verify_cmd")}


def _functions():
    for pkg in PACKAGES:
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text())
            stack = [(tree, "")]
            while stack:
                node, prefix = stack.pop()
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        name = f"{prefix}{child.name}"
                        if not isinstance(child, ast.ClassDef):
                            yield rel, name, child.end_lineno - child.lineno + 1
                        stack.append((child, name + "."))


def test_no_function_over_80_lines():
    long = [f"{f}: {name} ({n} lines)" for f, name, n in _functions() if n > 80]
    assert not long, "split these:\n" + "\n".join(long)


def test_entry_points_under_60_lines():
    found = {(f, name): n for f, name, n in _functions() if (f, name) in ENTRY_POINTS}
    assert set(found) == ENTRY_POINTS, f"entry points not found: {ENTRY_POINTS - set(found)}"
    long = {k: n for k, n in found.items() if n > 60}
    assert not long, long


def test_no_side_channels_on_the_pipeline():
    """Results come back in the Generation a call returns, not through attributes set on the pipeline."""
    text = (ROOT / "runtime" / "wan_runtime" / "pipeline.py").read_text()
    assert "self.last_" not in text


def test_families_are_not_listed_elsewhere():
    """Every family name appears in families.py (and its presets) only: the code asks the registry."""
    from wan_runtime import families

    names = [f.name for f in families.FAMILIES]
    for pkg in PACKAGES + (ROOT / "tools", ROOT / "tests"):
        for path in pkg.rglob("*.py"):
            if path.name in ("families.py", "test_layout.py"):
                continue
            text = path.read_text()
            lists = [n for n in names if f'"{n}"' in text]
            assert len(lists) < len(names), f"{path.relative_to(ROOT)} lists every family; import families.NAMES"
