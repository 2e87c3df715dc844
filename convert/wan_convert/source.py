"""Reading a source: resolve it, index its safetensors, read tensors zero-copy (``wan_runtime.tensorfile``:
numpy views of a read-only mmap, nothing goes through torch).

A source is a diffusers-format Wan repository (a folder or a Hugging Face repo id: :class:`Repo`), or a
single-file transformer or an original Wan-AI folder (:mod:`wan_convert.original`, chosen by
:func:`resolve`), which is read as a repository of the same shape: components whose tensors carry
diffusers' names, their config.json files, and the side files (tokenizer, scheduler, ...) a checkpoint
carries.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from wan_runtime import families
from wan_runtime import format as fmt
from wan_runtime import tensorfile
from wan_runtime.tensorfile import TensorInfo  # noqa: F401  (the converter's name for it)


class SourceError(ValueError):
    """A source repository or file that cannot be converted; the message names the file/tensor."""


#: folders of side files a checkpoint carries from its source (besides model_index.json and the configs)
SIDE_FOLDERS = ("tokenizer", "scheduler", "image_processor", "feature_extractor")


@dataclasses.dataclass(frozen=True)
class AliasInfo(TensorInfo):
    """A source tensor under its diffusers name (``name``); ``original`` is its name in ``file``."""

    original: str = ""


def label(info: TensorInfo) -> str:
    """A tensor's name for messages: its diffusers name, and its name in the file where that differs."""
    original = getattr(info, "original", "")
    return f"{original} (as {info.name})" if original and original != info.name else info.name


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Where a single-file or original Wan-AI source takes what it lacks (wan-convert's source flags):
    component files (``.safetensors`` or ``.pth``), a tokenizer folder, and ``components``, a diffusers
    repository (folder or hub id) that supplies every component still missing and the configs."""

    transformer_2: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    image_encoder: str | None = None
    tokenizer: str | None = None
    components: str | None = None

    def given(self) -> list[str]:
        """The flags set, as ``--name``."""
        return [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(self) if getattr(self, f.name)]


class TensorFile(tensorfile.TensorFile):
    """A read-only mmap of one safetensors file (``wan_runtime.tensorfile``); errors are SourceErrors."""

    def __init__(self, path: pathlib.Path):
        super().__init__(path, SourceError, check=lambda header: refuse_fp8(path, header))


#: names that mark a checkpoint quantized to fp8 with scales (ComfyUI's "fp8_scaled" files)
_FP8_MARKS = ("scale_weight", "scaled_fp8", "weight_scale", "scale_input")


def refuse_fp8(path: pathlib.Path, header: dict) -> None:
    """A SourceError naming ``path`` if its safetensors ``header`` (the parsed JSON object) holds float8
    tensors or fp8 scales (the rest of the header is validated by ``tensorfile.read_header``)."""
    for name, info in header.items():
        dtype = str(info.get("dtype", "")) if isinstance(info, dict) else ""
        if dtype.startswith("F8") or name.endswith(_FP8_MARKS):
            what = f"is {dtype}" if dtype.startswith("F8") else "is an fp8 scale"
            raise SourceError(f"{path}: fp8 checkpoints are not supported yet (tensor {name} {what}); "
                              "convert from a bf16, fp16 or fp32 file")


class Component:
    """One component folder (transformer, vae, ...): its config and a name -> tensor index."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.name = folder.name
        self.config = read_json(folder / "config.json")
        self.files = _weight_files(folder)
        self._open: dict[pathlib.Path, TensorFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for path, expected in self.files.items():
            tf = self._file(path)
            if expected is not None:
                missing = sorted(set(expected) - set(tf.tensors))
                if missing:
                    raise SourceError(f"{path}: the index names tensor {missing[0]} but the file lacks it"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            for name, info in tf.tensors.items():
                if expected is not None and name not in expected:
                    continue  # the index is authoritative for sharded repos
                if name in self.tensors:
                    raise SourceError(f"{path}: tensor {name} also stored in {self.tensors[name].file.name}")
                self.tensors[name] = info

    def _file(self, path: pathlib.Path) -> TensorFile:
        if path not in self._open:
            self._open[path] = TensorFile(path)
        return self._open[path]

    def array(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self._file(info.file).array(info)

    def release(self, name: str) -> None:
        info = self.tensors[name]
        self._file(info.file).release(info)

    def close(self):
        for f in self._open.values():
            f.close()
        self._open.clear()


def _weight_files(folder: pathlib.Path) -> dict[pathlib.Path, set[str] | None]:
    """safetensors files of a component: from its *.safetensors.index.json, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        idx = indexes[0]
        weight_map = read_json(idx).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(f"{idx}: not a safetensors index (no weight_map of tensor name -> file name)")
        files: dict[pathlib.Path, set[str] | None] = {}
        for name, fname in weight_map.items():
            files.setdefault(folder / fname, set()).add(name)
        for f in files:
            if not f.exists():
                raise SourceError(f"{f}: shard named in {idx.name} is missing")
        return files
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        hint = " (only pickled torch weights found; re-save with safe_serialization=True)" if bins else ""
        raise SourceError(f"{folder}: no safetensors weights{hint}")
    if len(singles) > 1:
        raise SourceError(f"{folder}: several safetensors files but no index: {', '.join(p.name for p in singles)}")
    return {singles[0]: None}


@dataclasses.dataclass
class Repo:
    """A diffusers-format Wan repository (the other sources subclass it: :mod:`wan_convert.original`)."""

    root: pathlib.Path
    source_id: str
    revision: str | None
    model_index: dict
    #: the components a complete conversion needs
    needs = ("transformer", "vae", "text_encoder")

    def component(self, name: str) -> Component:
        """One component, opened (the caller closes it)."""
        return Component(self.root / name)

    def config(self, name: str) -> dict | None:
        """A component's config.json (None: the repository has no such component)."""
        path = self.root / name / "config.json"
        return read_json(path) if path.is_file() else None

    def side_files(self, components: list[str]) -> dict[str, pathlib.Path | bytes]:
        """What a checkpoint of ``components`` carries besides the arrays: relative path -> the source file
        to copy, or the bytes to write (model_index.json, each component's config.json, SIDE_FOLDERS)."""
        files: dict[str, pathlib.Path | bytes] = {"model_index.json": self.root / "model_index.json"}
        files.update({f"{c}/config.json": self.root / c / "config.json" for c in components})
        for name in SIDE_FOLDERS:
            if (self.root / name).is_dir():
                files.update({p.relative_to(self.root).as_posix(): p
                              for p in sorted((self.root / name).rglob("*")) if p.is_file()})
        return files

    def missing(self, what: str) -> str:
        """The message for a component (or side file) a complete conversion needs and this source lacks."""
        if "/" in what:
            return f"{self.root / what}: missing; wan-run needs it"
        return (f"{self.root}: model_index.json has no {what}; not a complete Wan repository "
                "(use --only to convert single components)")

    def components(self) -> list[str]:
        out = []
        for name in families.COMPONENTS:
            entry = self.model_index.get(name)
            if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None:
                if not (self.root / name).is_dir():
                    raise SourceError(f"{self.root}: model_index.json lists {name} but the folder is missing")
                out.append(name)
        return out

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight and config file (relative path -> hex); revision-independent identity."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                out[str(p.relative_to(self.root))] = tensorfile.sha256(p)
        return out


def resolve(source: str, revision: str | None = None, options: SourceOptions | None = None,
            patterns: list[str] | None = None) -> Repo:
    """The source's repository: a diffusers folder, or a Hugging Face repo id fetched through huggingface_hub
    (honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE: with the model cached, no network is touched;
    ``patterns``: only the files they match); a safetensors file (a single-file transformer) or a folder
    without model_index.json that holds an original Wan config.json: :func:`wan_convert.original.resolve`,
    with ``options``. ``options`` given for a diffusers repository is a SourceError."""
    path = pathlib.Path(source).expanduser()
    if path.is_file() or (path.is_dir() and not (path / "model_index.json").exists()):
        from . import original

        if original.recognised(path):
            return original.resolve(path, options or SourceOptions())
    if options is not None and options.given():
        raise SourceError(f"{options.given()[0]}: applies to a single-file transformer or an original Wan-AI "
                          f"folder; {source} is a diffusers repository")
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source}: not a folder, nor a safetensors or .pth file")
        root, source_id, rev = path.resolve(), str(path.resolve()), revision
    elif _looks_like_repo_id(source):
        root, rev = _download(source, revision, patterns), revision
        source_id = source
        rev = rev or _snapshot_revision(root)
    else:
        raise SourceError(f"{source}: no such folder or file, and not a Hugging Face repo id")
    mi = root / "model_index.json"
    if not mi.is_file():
        raise SourceError(f"{mi}: missing; {source} is not a diffusers pipeline repository, nor an original "
                          "Wan-AI folder (a config.json with dim, num_heads, num_layers)")
    model_index = read_json(mi)
    cls = str(model_index.get("_class_name", ""))
    if not cls.startswith("Wan"):
        raise SourceError(f"{mi}: pipeline class {cls or '(none)'} is not a Wan pipeline")
    if cls not in families.PIPELINES:
        raise SourceError(f"{mi}: {cls} is a Wan variant wan-jax does not support "
                          f"(it converts {' and '.join(families.PIPELINES)} repositories)")
    return Repo(root, source_id, rev, model_index)


def read_json(path: pathlib.Path) -> dict:
    """A JSON object from a source file; anything else is a SourceError naming the file."""
    return fmt.read_json(path, SourceError)


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None, patterns: list[str] | None = None) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        raise SourceError(f"{repo_id}: huggingface_hub is not installed (pip install 'wan-jax[convert]')") from None
    patterns = patterns or ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer/*", "*/tokenizer*"]
    try:
        return pathlib.Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: no such Hugging Face repository") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
                          "(HF_HUB_OFFLINE or no network)") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceError(f"{repo_id}: download failed ({e})") from None


def _snapshot_revision(root: pathlib.Path) -> str | None:
    # HF cache layout: .../snapshots/<commit>/
    return root.name if root.parent.name == "snapshots" else None




__all__ = ["SourceError", "SourceOptions", "TensorInfo", "AliasInfo", "TensorFile", "Component", "Repo", "resolve",
           "read_json", "refuse_fp8", "label", "SIDE_FOLDERS"]
