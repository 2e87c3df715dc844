"""Presets: per-model generation defaults from configs/*.toml; every value can be overridden."""
from __future__ import annotations

import os
import pathlib
import tomllib
from typing import Any, Mapping

from . import families

#: every setting a preset may hold, with its type; the CLI flags of the same names override them
SETTINGS: dict[str, type] = {
    "height": int, "width": int, "frames": int, "steps": int, "guidance": float, "guidance_2": float,
    "flow_shift": float, "boundary": float, "fps": int, "scheduler": str, "negative_prompt": str,
    "max_sequence_length": int, "mesh": str, "cache": str, "cache_thresh": float, "cache_k": int,
    "cache_retention": float,
}
#: keys that describe a preset rather than set something (``family``: a user preset for one family only;
#: the published presets' families are in families.py)
META = {"description", "family"}


class PresetError(ValueError):
    pass


def config_dir() -> pathlib.Path:
    env = os.environ.get("WAN_JAX_CONFIGS")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2] / "configs"


def available() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.toml"))


def load(name_or_path: str) -> dict[str, Any]:
    path = pathlib.Path(name_or_path)
    if path.suffix != ".toml":
        path = config_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise PresetError(f"--preset: unknown preset {name_or_path!r}; available: {', '.join(available())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{path}: {e}") from None
    for k, v in data.items():
        if k in META:
            continue
        if k not in SETTINGS:
            raise PresetError(f"{path}: unknown setting {k!r}; settings are {', '.join(sorted(SETTINGS))}")
        try:
            data[k] = SETTINGS[k](v)
        except (TypeError, ValueError):
            raise PresetError(f"{path}: {k} = {v!r} is not of type {SETTINGS[k].__name__}") from None
    data["name"] = path.stem
    return data


def check_family(preset: Mapping[str, Any], family: str) -> None:
    """A published model's preset, or a preset with a ``family`` key, does not run another family's checkpoint."""
    fam = families.preset_family(preset.get("name", ""))
    want = fam.name if fam is not None else preset.get("family")
    if want and want != family:
        raise PresetError(f"--preset: {preset['name']} is for {want} checkpoints, and this checkpoint is {family}")


def for_checkpoint(family: str, transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The preset that matches a checkpoint: test-sized models (width < 1024) get 'tiny', published ones
    their variant's (families.py) by family and head count."""
    heads = transformer_config.get("num_attention_heads")
    dim = heads * transformer_config.get("attention_head_dim", 128)
    if dim < 1024:
        return load("tiny")
    variant = families.get(family).variant(heads=heads)
    if variant is None:
        raise PresetError(f"no preset matches a {family} checkpoint with {heads} heads; pass --preset")
    return load(variant.preset)
