import sys, pathlib
_root = pathlib.Path(__file__).parent
for sub in ("runtime", "convert"):
    p = str(_root / sub)
    if p not in sys.path:
        sys.path.insert(0, p)
