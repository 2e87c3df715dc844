"""A ``POST /v1/videos`` body -> a validated job, by the rules wan-run applies to its flags (``RunConfig``),
before anything is queued; every refusal is a :class:`RequestError` naming the request field.

Fields: OpenAI's ``prompt``, ``model``, ``size`` ("WxH"), ``seconds``, ``input_reference`` (an image, for
image-to-video models), and Wan's beside them (``WAN_FIELDS``). Multipart form values arrive as strings
and are parsed here; a JSON body may give numbers. ``seconds`` becomes the nearest 4k+1 frame count at the
preset's fps; ``num_frames`` wins over it.
"""
from __future__ import annotations

import io
import json
import math
import re
from typing import Any

from ..runconfig import DEFAULT_NEGATIVE, InputError, RunConfig
from ..text import tokenize_prompts

#: Wan's fields: API name -> (RunConfig setting, type)
WAN_FIELDS = {"negative_prompt": ("negative_prompt", str), "num_frames": ("frames", int),
              "num_inference_steps": ("steps", int), "guidance_scale": ("guidance", float),
              "guidance_scale_2": ("guidance_2", float), "seed": ("seed", int), "flow_shift": ("flow_shift", float),
              "cache": ("cache", str)}
OPENAI_FIELDS = ("prompt", "model", "size", "seconds", "input_reference")
#: wan-run's flag in a RunConfig error -> the request field it came from
FLAG_FIELDS = {"--height": "size", "--width": "size", "--frames": "num_frames", "--steps": "num_inference_steps",
               "--guidance": "guidance_scale", "--guidance-2": "guidance_scale_2", "--seed": "seed",
               "--flow-shift": "flow_shift", "--image": "input_reference", "--negative-prompt": "negative_prompt",
               "--prompt": "prompt", "--cache": "cache"}
MAX_PROMPT_CHARS = 20_000


class RequestError(Exception):
    """A refused request: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def number(field: str, value: Any, kind: type):
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{field}: must be {'an integer' if kind is int else 'a number'}, got {value!r}", field)
    if isinstance(value, (int, float)) and not (kind is int and isinstance(value, float) and not value.is_integer()):
        return kind(value)
    try:
        return int(str(value).strip()) if kind is int else float(str(value).strip())
    except ValueError:
        raise RequestError(f"{field}: must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                           field) from None


def _size(value: Any) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,5})\s*x\s*(\d{1,5})\s*", str(value))
    if not m:
        raise RequestError(f"size: must be WIDTHxHEIGHT such as 832x480, got {value!r}", "size")
    return int(m.group(1)), int(m.group(2))


def _frames_for(seconds: Any, fps: int) -> int:
    s = number("seconds", seconds, float)
    if not (math.isfinite(s) and 0 < s <= 600):
        raise RequestError(f"seconds: must be a number in (0, 600], got {seconds!r}", "seconds")
    return 4 * max(0, round(s * fps / 4)) + 1


def settings_of(fields: dict[str, Any], ckpt, preset: str | None, image: bool) -> dict[str, Any]:
    """The RunConfig settings a request asks for (types checked; ranges are RunConfig's)."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in WAN_FIELDS:
            key, kind = WAN_FIELDS[name]
            if kind is str:
                if not isinstance(value, str):
                    raise RequestError(f"{name}: must be a string", name)
                out[key] = value
            else:
                out[key] = number(name, value, kind)
    if fields.get("size") is not None:
        out["width"], out["height"] = _size(fields["size"])
    if fields.get("seconds") is not None and "frames" not in out:
        out["frames"] = _frames_for(fields["seconds"], _config(ckpt, preset, {}, image).fps)
    return out


def _config(ckpt, preset: str | None, settings: dict, image: bool) -> RunConfig:
    try:
        return RunConfig.resolve(ckpt, preset or "auto", image=image, defaults={"negative_prompt": DEFAULT_NEGATIVE},
                                 **settings)
    except InputError as e:
        message = str(e)
        flag = message.split(":", 1)[0]
        field = FLAG_FIELDS.get(flag)
        if field:
            message = field + message[len(flag):]
        raise RequestError(message, field) from None
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None


def check(fields: dict[str, Any], image: bytes | None, ckpt, tokenizer, *, model: str,
          preset: str | None = None):
    """-> (the job's request record, its RunConfig, the decoded image or None); RequestError if refused."""
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(WAN_FIELDS))
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown parameter (accepted: {', '.join(OPENAI_FIELDS + tuple(WAN_FIELDS))})",
                           unknown[0])
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt: missing or empty", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt: {len(prompt)} characters, more than {MAX_PROMPT_CHARS}", "prompt")
    if fields.get("model") not in (None, "", model):
        raise RequestError(f"model: this server serves {model!r}, not {fields['model']!r}", "model")
    img = _image(image) if image is not None else None
    config = _config(ckpt, preset, settings_of(fields, ckpt, preset, img is not None), img is not None)
    _, _, truncated = tokenize_prompts(tokenizer, [prompt, config.negative_prompt], config.max_sequence_length)
    for field, cut in zip(("prompt", "negative_prompt"), truncated):
        if cut:
            raise RequestError(f"{field}: longer than {config.max_sequence_length} tokens", field)
    seconds = fields.get("seconds")
    request = {"prompt": prompt, "seconds": str(seconds if seconds is not None else round(config.frames / config.fps, 3)),
               "settings": {k: getattr(config, k) for k in (
                   "height", "width", "frames", "steps", "guidance", "guidance_2", "flow_shift", "seed",
                   "negative_prompt")} | {"cache": fields.get("cache")},
               "image": img is not None}
    return request, config, img


def _image(data: bytes):
    import PIL.Image
    import PIL.ImageOps

    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            return PIL.ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # noqa: BLE001 - whatever PIL says of a bad upload is the client's error
        raise RequestError(f"input_reference: not an image PIL can read ({type(e).__name__})", "input_reference") \
            from None


def batch_key(config: RunConfig, image: bool) -> str | None:
    """``RunConfig.batch_key`` as the jobs table stores it (jobs of equal keys may share a batch)."""
    key = config.batch_key(image)
    return None if key is None else json.dumps(key, default=str)


def config_of(request: dict, ckpt, preset: str | None) -> RunConfig:
    """A stored job's RunConfig again (the worker's side; validated when it was accepted)."""
    s = dict(request["settings"])
    return _config(ckpt, preset, {k: v for k, v in s.items() if v is not None}, request["image"])
