"""Sources that are not diffusers repositories: a single-file transformer (ComfyUI's, with or without its
``model.diffusion_model.`` prefix, or any file of bare original Wan names), an original Wan-AI folder, and
the component files given beside them (``--transformer-2``, ``--vae``, ``--text-encoder``,
``--image-encoder``: safetensors or ``.pth``; ``--tokenizer DIR``; ``--components REPO``, a diffusers
repository that lends what is still missing).

Each is read as a :class:`wan_convert.source.Repo`: a component's tensors appear under diffusers' names
(:class:`Mapped`: renamed by the ``ORIGINAL_*`` tables of ``wan_runtime.names``, or kept where a file
already uses diffusers' / transformers' names), so mapping, convert and verify treat every source alike.
The configs a checkpoint carries (each component's config.json, model_index.json, the scheduler's) are
derived from the tensors' shapes and the original config.json, with the published models' values
(:data:`KINDS`, :data:`LATENTS`, :data:`UMT5_XXL`, :data:`CLIP_VIT_H`, :data:`SCHEDULER`) for what shapes
cannot tell (attention heads, activations, latent statistics, sampler settings); a ``--components``
repository's config.json is used instead wherever it describes the same weights.

``.pth`` files are read with ``torch.load(weights_only=True, mmap=True)`` (zero-copy numpy views of the
mapped file): torch is needed for them only. fp8 checkpoints with scales are refused.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import mmap
import pathlib
from typing import Any, Mapping

import numpy as np

from wan_runtime import families, names, tensorfile
from wan_runtime import format as fmt
from wan_runtime.errors import one_line

from .source import AliasInfo, Repo, SourceError, SourceOptions, TensorFile, TensorInfo, read_json

# --------------------------------------------------------------------------------------------
# The published models' values (facts from Wan-AI's repositories and diffusers' Wan configs)
# --------------------------------------------------------------------------------------------
#: what every published Wan transformer's diffusers config.json holds besides its sizes
TRANSFORMER_COMMON = {
    "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
    "cross_attn_norm": True, "eps": 1e-06, "freq_dim": 256, "image_dim": None, "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}


@dataclasses.dataclass(frozen=True)
class Kind:
    """A published Wan model: its transformer config beyond :data:`TRANSFORMER_COMMON`, its experts, and
    the sampler values of its diffusers repository (diffusers' scripts/convert_wan_to_diffusers.py)."""

    transformer: Mapping[str, Any]
    experts: int = 1
    flow_shift: float = 3.0
    boundary_ratio: float | None = None  # two experts: where the low-noise expert takes over

    @property
    def config(self) -> dict:
        return {**TRANSFORMER_COMMON, **self.transformer}


_T13 = dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16)
_T14 = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16)
_I14 = dict(_T14, in_channels=36)
_CLIP = dict(image_dim=1280, added_kv_proj_dim=5120)


def _vace(layers: int, every: int) -> dict:
    return dict(_class_name="WanVACETransformer3DModel", vace_layers=list(range(0, layers, every)), vace_in_channels=96)


#: the published models, by name (Wan2.1-I2V-14B: the 480P and 720P models have one config; VACE: T2V
#: transformers with VACE blocks after every 2nd (1.3B) / 5th (14B) block, alibaba-pai's Wan2.2-VACE-Fun-A14B
#: two 14B ones)
KINDS = {
    "Wan2.1-T2V-1.3B": Kind(_T13),
    "Wan2.1-T2V-14B": Kind(_T14),
    "Wan2.1-VACE-1.3B": Kind(dict(_T13, **_vace(30, 2))),
    "Wan2.1-VACE-14B": Kind(dict(_T14, **_vace(40, 5))),
    "Wan2.2-VACE-Fun-A14B": Kind(dict(_T14, **_vace(40, 5)), experts=2, boundary_ratio=0.875),
    "Wan2.1-I2V-14B": Kind(dict(_I14, **_CLIP)),
    "Wan2.1-FLF2V-14B": Kind(dict(_I14, **_CLIP, pos_embed_seq_len=514), flow_shift=16.0),
    "Wan2.2-T2V-A14B": Kind(_T14, experts=2, boundary_ratio=0.875),
    "Wan2.2-I2V-A14B": Kind(_I14, experts=2, boundary_ratio=0.9),
    "Wan2.2-TI2V-5B": Kind(dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                                out_channels=48), flow_shift=5.0),
}
#: a published transformer's attention heads by its width (the weights cannot tell them)
HEADS = {128 * k.transformer["num_attention_heads"]: k.transformer["num_attention_heads"] for k in KINDS.values()}

#: the published VAEs' latent statistics by latent channels (wan/modules/vae.py: Wan 2.1, 16 channels;
#: vae2_2.py: Wan 2.2, 48), diffusers' ``latents_mean`` / ``latents_std``
LATENTS = {
    16: ([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
          0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
         [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
          3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]),
    48: ([-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
          0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
          -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
          -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
         [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
          0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
          0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
          0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]),
}

#: google/umt5-xxl's transformers config (Wan's text encoder); the sizes are replaced by the weights'
UMT5_XXL = {
    "architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "scalable_attention": True, "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer", "use_cache": True,
    "vocab_size": 256384}

#: the CLIP ViT-H/14 vision config of the Wan 2.1 I2V diffusers repositories; sizes from the weights
CLIP_VIT_H = {
    "architectures": ["CLIPVisionModelWithProjection"], "attention_dropout": 0.0, "dropout": 0.0,
    "hidden_act": "gelu", "hidden_size": 1280, "image_size": 224, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
    "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 32, "patch_size": 14, "projection_dim": 1024}
#: a published CLIP vision tower's attention heads by its width
CLIP_HEADS = {1280: 16}

#: the image processor of those repositories (OpenAI CLIP's normalisation); sizes from the encoder
IMAGE_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}

#: the UniPC flow-matching scheduler of the diffusers Wan repositories (``flow_shift`` per :class:`Kind`)
SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False}

#: files of an original Wan-AI folder, by component (the transformer: ``diffusion_pytorch_model*.safetensors``,
#: or ``high_noise_model/`` and ``low_noise_model/`` for Wan 2.2 A14B)
FOLDER_FILES = {"vae": "Wan2.*_VAE.pth", "text_encoder": "models_t5_*.pth", "image_encoder": "models_clip_*.pth"}
FOLDER_TOKENIZER = "google/umt5-xxl"
#: what supplies each component or side file a source may lack
HINTS = {
    "transformer_2": "pass the low-noise expert with --transformer-2 FILE",
    "vae": "pass --vae FILE (Wan2.1_VAE.pth, Wan2.2_VAE.pth, or a safetensors VAE) or --components REPO",
    "text_encoder": "pass --text-encoder FILE (models_t5_umt5-xxl-enc-bf16.pth, or a safetensors UMT5) or "
                    "--components REPO",
    "image_encoder": "pass --image-encoder FILE (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, or a "
                     "safetensors CLIP vision model) or --components REPO",
    "tokenizer/tokenizer.json": "pass --tokenizer DIR (google/umt5-xxl: a folder with tokenizer.json) or "
                                "--components REPO",
}
_PTH = (".pth", ".pt", ".bin", ".ckpt")


# --------------------------------------------------------------------------------------------
# Reading weight files: safetensors (mmap) and .pth (torch, mmap)
# --------------------------------------------------------------------------------------------
class _Safetensors:
    """A safetensors file: ``infos`` (name -> TensorInfo), numpy views of its mmap."""

    def __init__(self, path: pathlib.Path):
        self.file = TensorFile(path)
        self.infos = self.file.tensors

    def array(self, name: str) -> np.ndarray:
        return self.file.array(self.infos[name])

    def release(self, name: str) -> None:
        self.file.release(self.infos[name])

    def close(self) -> None:
        self.file.close()


class _Pth:
    """A torch state dict (``.pth``), loaded with ``torch.load(weights_only=True, mmap=True)``: its
    tensors stay in the mapped file, and ``array`` is a numpy view of one (bf16 through its bits)."""

    def __init__(self, path: pathlib.Path):
        self.torch = torch = _torch(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch reports a bad file in many ways
            raise SourceError(f"{path}: not a readable torch checkpoint ({one_line(e, 200)})") from None
        if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
            raise SourceError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
        self.tensors = dict(state)
        self.infos = {}
        for name, t in self.tensors.items():
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype.startswith("float8"):
                raise SourceError(f"{path}: fp8 checkpoints are not supported yet (tensor {name} is {dtype}); "
                                  "convert from a bf16, fp16 or fp32 file")
            self.infos[name] = TensorInfo(name, path, dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name].detach()
        t = t if t.is_contiguous() else t.contiguous()
        if t.dtype == self.torch.bfloat16:
            return t.view(self.torch.int16).numpy().view(fmt.np_dtype("bfloat16"))
        return t.numpy()

    def release(self, name: str) -> None:
        """Drop a consumed tensor's pages from this process, as the safetensors reader does (torch maps the
        file privately and nothing writes to it, so the pages are clean and refault from the file)."""
        t = self.tensors.get(name)
        nbytes = t.numel() * t.element_size() if t is not None else 0
        if nbytes < mmap.PAGESIZE or _madvise is None:
            return
        start = t.data_ptr() - t.data_ptr() % mmap.PAGESIZE
        _madvise(start, t.data_ptr() + nbytes - start, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.tensors.clear()


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):
        return None
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


_madvise = _libc_madvise()


def _torch(path: pathlib.Path):
    try:
        import torch
    except ImportError:
        raise SourceError(f"{path}: reading a .pth file needs torch (pip install torch), or give the "
                          "weights as safetensors") from None
    return torch


def open_weights(path: pathlib.Path):
    """A reader of one weight file, by its suffix: safetensors, or a torch pickle (``.pth``, ``.pt``, ...)."""
    if path.suffix == ".safetensors":
        return _Safetensors(path)
    if path.suffix in _PTH:
        return _Pth(path)
    raise SourceError(f"{path}: not a weight file wan-convert reads (.safetensors or .pth)")


# --------------------------------------------------------------------------------------------
# Names: a file's tensors under diffusers' names
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Naming:
    """How a file's tensor names become diffusers' (or transformers'): ``prefix`` stripped, ``unused``
    prefixes dropped, ``fused`` tensors split into equal row blocks, then the first of ``rules`` (an
    ``ORIGINAL_*`` table, compiled) that matches. No ``rules``: the names are diffusers' already."""

    prefix: str = ""
    rules: tuple = ()
    fused: tuple = ()
    unused: tuple[str, ...] = ()

    def rename(self, key: str, rows: int) -> list[tuple[str, tuple[int, int] | None]] | None:
        """The diffusers names of tensor ``key`` (``rows`` long) with the row range each takes (None: all);
        [] for a tensor Wan does not use, None for one that is not a Wan name."""
        if not key.startswith(self.prefix):
            return None
        key = key[len(self.prefix):]
        if key.startswith(self.unused):
            return []
        if not self.rules:
            return [(key, None)]
        for pattern, targets in self.fused:
            m = pattern.match(key)
            if m and rows % len(targets) == 0:
                step, tail = rows // len(targets), key[m.end():]
                return [(t.replace("{L}", m.group("L")) + tail, (i * step, (i + 1) * step))
                        for i, t in enumerate(targets)]
        got = names.rename(key, self.rules)
        return None if got is None else [(got[0], None)]


def naming(component: str, keys: set[str]) -> Naming:
    """The naming of a component file, told by its keys: Wan's original names (ComfyUI's prefixed or bare
    transformer, Wan-AI's .pth files) or diffusers' / transformers' own."""
    if component.startswith("transformer"):
        prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.") if any(k.startswith(p) for k in keys)), "")
        bare = {k[len(prefix):] for k in keys}
        original = "head.modulation" in bare or "head.head.weight" in bare
        return Naming(prefix, names.compile_rules(names.ORIGINAL_TRANSFORMER) if original else ())
    if component == "vae":
        if "decoder.conv1.weight" not in keys:
            return Naming()
        return Naming(rules=names.compile_rules(names.original_vae(*_vae_structure(keys))))
    if component == "text_encoder":
        unused = ("spiece_model",)  # ComfyUI keeps the sentencepiece model in some text encoder files
        if "token_embedding.weight" in keys:
            return Naming(rules=names.compile_rules(names.ORIGINAL_UMT5), unused=unused)
        return Naming(unused=unused)
    if any(k.startswith("visual.") for k in keys):
        return Naming(rules=names.compile_rules(names.ORIGINAL_CLIP), unused=names.ORIGINAL_CLIP_UNUSED,
                      fused=names.compile_rules(names.ORIGINAL_CLIP_FUSED))
    return Naming(unused=("vision_model.embeddings.position_ids",))  # a buffer older transformers saved


def _vae_structure(keys: set[str]) -> tuple[int, int, bool]:
    """(stages, residual blocks per encoder stage, Wan 2.2 layout) of a VAE in Wan's original names."""
    residual = any(k.startswith("encoder.downsamples.0.downsamples.") for k in keys)
    parts = [k.split(".") for k in keys if k.startswith("encoder.downsamples.")]
    if residual:
        stages = len({p[2] for p in parts})
        return stages, len({p[4] for p in parts if p[2] == "0" and p[5] == "residual"}), True
    resamples = {p[2] for p in parts if p[3] == "resample"}
    resnets = {p[2] for p in parts if p[3] == "residual"}
    return len(resamples) + 1, len(resnets) // (len(resamples) + 1), False


class Mapped:
    """One component read from weight files in Wan's original names or format, as :class:`source.Component`
    reads a diffusers folder: ``tensors`` (diffusers' name -> :class:`AliasInfo`), ``array``, ``release``,
    ``close``. A file key that is not a Wan name is a SourceError naming the file and the key."""

    def __init__(self, name: str, files: list[pathlib.Path], config: Mapping | None = None):
        self.name, self.files, self.config = name, list(files), dict(config or {})
        self.folder = self.files[0].parent
        self._readers: list = []
        try:
            for f in self.files:
                self._readers.append(open_weights(f))
            self.tensors, self._where = self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> tuple[dict[str, AliasInfo], dict[str, tuple]]:
        raw: dict[str, tuple] = {}
        for reader in self._readers:
            for key, info in reader.infos.items():
                if key in raw:
                    raise SourceError(f"{info.file}: tensor {key} also stored in {raw[key][1].file.name}")
                raw[key] = (reader, info)
        rename = naming(self.name, set(raw))
        tensors, where = {}, {}
        for key in sorted(raw):
            reader, info = raw[key]
            got = rename.rename(key, info.shape[0] if info.shape else 0)
            if got is None:
                raise SourceError(f"{info.file}: tensor {key} is not part of a Wan {self.name} "
                                  "(neither Wan's original names nor diffusers')")
            for new, rows in got:
                if new in tensors:
                    raise SourceError(f"{info.file}: tensors {tensors[new].original} and {key} are both {new}")
                tensors[new], where[new] = _alias(info, new, key, rows), (reader, key, rows)
        return tensors, where

    def array(self, name: str) -> np.ndarray:
        reader, key, rows = self._where[name]
        x = reader.array(key)
        return x if rows is None else x[rows[0]:rows[1]]

    def release(self, name: str) -> None:
        reader, key, _ = self._where[name]
        reader.release(key)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers.clear()


def _alias(info: TensorInfo, name: str, original: str, rows: tuple[int, int] | None) -> AliasInfo:
    if rows is None:
        return AliasInfo(name, info.file, info.dtype, info.shape, info.begin, info.end, original=original)
    per_row = info.nbytes // info.shape[0]
    return AliasInfo(name, info.file, info.dtype, (rows[1] - rows[0], *info.shape[1:]),
                     info.begin + rows[0] * per_row, info.begin + rows[1] * per_row, original=original)


# --------------------------------------------------------------------------------------------
# Configs from shapes (diffusers' names)
# --------------------------------------------------------------------------------------------
class Shapes:
    """A component's tensor shapes under diffusers' names; a tensor a config needs and the source lacks
    is a SourceError naming the source."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], where, component: str):
        self.shapes, self.where, self.component = dict(shapes), where, component

    def __call__(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise SourceError(f"{self.where}: no tensor {name} (diffusers' name); not a whole Wan {self.component}")
        return tuple(self.shapes[name])

    def get(self, name: str) -> tuple[int, ...] | None:
        return tuple(self.shapes[name]) if name in self.shapes else None

    def count(self, pattern: str) -> int:
        """How many consecutive blocks ``pattern`` (with ``{}`` for the index) names, from 0."""
        n = 0
        while pattern.format(n) in self.shapes:
            n += 1
        return n


#: original config.json keys checked against the weights -> the diffusers config's value they equal
_ORIGINAL_KEYS = {"dim": lambda c: c["num_attention_heads"] * c["attention_head_dim"], "ffn_dim": "ffn_dim",
                  "num_layers": "num_layers", "in_dim": "in_channels", "out_dim": "out_channels",
                  "freq_dim": "freq_dim", "text_dim": "text_dim", "num_heads": "num_attention_heads",
                  "vace_in_dim": "vace_in_channels"}


def transformer_config(s: Shapes, original: Mapping | None = None) -> dict:
    """A transformer's diffusers config from its shapes; the heads (and eps) from the original config.json
    when there is one, else the published model of that width's. Original values that contradict the
    weights are a SourceError naming the key."""
    dim, cin, *patch = s("patch_embedding.weight")
    heads = int((original or {}).get("num_heads") or HEADS.get(dim, 0))
    if not heads or dim % heads:
        raise SourceError(f"{s.where}: cannot tell the attention heads of a {dim}-wide transformer (not a "
                          "published Wan size): give its config.json with --components REPO")
    image, pos = s.get("condition_embedder.image_embedder.norm1.weight"), s.get("condition_embedder.image_embedder.pos_embed")
    added = s.get("blocks.0.attn2.add_k_proj.weight")
    cfg = dict(
        TRANSFORMER_COMMON, patch_size=list(patch), num_attention_heads=heads, attention_head_dim=dim // heads,
        in_channels=cin, out_channels=s("proj_out.weight")[0] // math.prod(patch),
        text_dim=s("condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=s("condition_embedder.time_embedder.linear_1.weight")[1], ffn_dim=s("blocks.0.ffn.net.0.proj.weight")[0],
        num_layers=s.count("blocks.{}.attn1.to_q.weight"), cross_attn_norm=s.get("blocks.0.norm2.weight") is not None,
        qk_norm="rms_norm_across_heads" if s.get("blocks.0.attn1.norm_q.weight") else None,
        eps=float((original or {}).get("eps", TRANSFORMER_COMMON["eps"])), image_dim=image[0] if image else None,
        added_kv_proj_dim=added[1] if added else None, pos_embed_seq_len=pos[1] if pos else None)
    cfg.update(_vace_config(s, cfg["num_layers"], original))
    for key, ours in _ORIGINAL_KEYS.items():
        want = ours(cfg) if callable(ours) else cfg.get(ours)
        if original and key in original and original[key] != want:
            raise SourceError(f"{s.where}: its config.json says {key}={original[key]!r}, the weights {want}")
    return cfg


def _vace_config(s: Shapes, layers: int, original: Mapping | None) -> dict:
    """A VACE transformer's keys (none without VACE blocks): which blocks take the hints, from the original
    config.json (``vace_layers``) or, for a published size, the published model's."""
    n = s.count("vace_blocks.{}.attn1.to_q.weight")
    if not n:
        return {}
    given = (original or {}).get("vace_layers")
    published = next((k.transformer["vace_layers"] for k in KINDS.values() if k.transformer["num_layers"] == layers
                      and len(k.transformer.get("vace_layers", ())) == n), None)
    vace_layers = list(given) if given is not None else published
    if vace_layers is None or len(vace_layers) != n:
        raise SourceError(f"{s.where}: {n} VACE blocks, and which of the {layers} blocks take their hints is not "
                          "a published model's: give its config.json (vace_layers) with --components REPO")
    return dict(_class_name="WanVACETransformer3DModel", vace_layers=vace_layers,
                vace_in_channels=s("vace_patch_embedding.weight")[1])


def detect(shapes: Mapping[str, tuple[int, ...]], experts: int = 1, original: Mapping | None = None,
           where: str = "transformer") -> tuple[str | None, dict]:
    """The published model a transformer is (a :data:`KINDS` name, None for another size) and its diffusers
    config, from its tensor shapes (``shapes``: any naming a transformer file uses; no weights needed)."""
    rename = naming("transformer", set(shapes))
    renamed = {}
    for key, shape in shapes.items():
        for new, _ in rename.rename(key, shape[0] if shape else 0) or ():
            renamed[new] = shape
    cfg = transformer_config(Shapes(renamed, where, "transformer"), original)
    return _kind(cfg, experts), cfg


def _kind(cfg: Mapping, experts: int) -> str | None:
    return next((name for name, k in KINDS.items() if k.experts == experts and k.config == dict(cfg)), None)


def vae_config(s: Shapes) -> dict:
    """An ``AutoencoderKLWan`` config from its shapes: widths, stages, residual blocks, temporal
    downsampling, patching; latent statistics of the published VAE with as many latent channels."""
    base, cin = s("encoder.conv_in.weight")[:2]
    z, (cout, last) = s("post_quant_conv.weight")[0], s("decoder.conv_out.weight")[:2]
    residual = s.get("encoder.down_blocks.0.resnets.0.conv1.weight") is not None
    widths, tdown, res = (_vae_stages_22 if residual else _vae_stages_21)(s)
    if any(w % base or w < base for w in widths) or last % (widths[0] // base) or z not in LATENTS:
        raise SourceError(f"{s.where}: not a Wan VAE wan-convert can describe (stage widths {widths}, "
                          f"{z} latent channels): give its config.json with --components REPO")
    mult = [w // base for w in widths]
    patch = math.isqrt(cin // 3) if cin % 3 == 0 and math.isqrt(cin // 3) ** 2 * 3 == cin and cin > 3 else None
    dec = last // mult[0]
    return {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": base,
            "decoder_base_dim": None if dec == base else dec, "dim_mult": mult, "dropout": 0.0, "in_channels": cin,
            "is_residual": residual, "latents_mean": LATENTS[z][0], "latents_std": LATENTS[z][1],
            "num_res_blocks": res, "out_channels": cout, "patch_size": patch,
            "scale_factor_spatial": 2 ** (len(widths) - 1) * (patch or 1), "scale_factor_temporal": 2 ** sum(tdown),
            "temperal_downsample": tdown, "z_dim": z, "clip_output": not residual}


def _vae_stages_21(s: Shapes) -> tuple[list[int], list[bool], int]:
    """Wan 2.1: the encoder's flat ``down_blocks`` (resnets, attention blocks, a downsampler per stage)."""
    widths, tdown, resnets, k = [0], [], 0, 0
    while any(n.startswith(f"encoder.down_blocks.{k}.") for n in s.shapes):
        p = f"encoder.down_blocks.{k}."
        if s.get(p + "conv1.weight"):
            widths[-1], resnets = s(p + "conv1.weight")[0], resnets + 1
        elif s.get(p + "resample.1.weight"):
            tdown.append(s.get(p + "time_conv.weight") is not None)
            widths.append(0)
        elif s.get(p + "to_qkv.weight"):
            raise SourceError(f"{s.where}: attention in the VAE's stages (attn_scales) is not supported")
        k += 1
    return widths, tdown, resnets // len(widths)


def _vae_stages_22(s: Shapes) -> tuple[list[int], list[bool], int]:
    """Wan 2.2: ``down_blocks.{s}`` each holding ``resnets`` and a ``downsampler``."""
    stages = 0
    while s.get(f"encoder.down_blocks.{stages}.resnets.0.conv1.weight"):
        stages += 1
    widths = [s(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(stages)]
    tdown = [s.get(f"encoder.down_blocks.{i}.downsampler.time_conv.weight") is not None for i in range(stages - 1)]
    return widths, tdown, s.count("encoder.down_blocks.0.resnets.{}.conv1.weight")


def umt5_config(s: Shapes) -> dict:
    """A ``UMT5EncoderModel`` config from its shapes (:data:`UMT5_XXL` for the rest)."""
    vocab, d = s.get("shared.weight") or s("encoder.embed_tokens.weight")
    buckets, heads = s("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    layers = s.count("encoder.block.{}.layer.0.SelfAttention.q.weight")
    return dict(UMT5_XXL, vocab_size=vocab, d_model=d, num_heads=heads, relative_attention_num_buckets=buckets,
                d_kv=s("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads, num_layers=layers,
                num_decoder_layers=layers, d_ff=s("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0])


def clip_config(s: Shapes) -> dict:
    """A ``CLIPVisionModelWithProjection`` config from its shapes; heads and activation of the published
    ViT-H/14 (:data:`CLIP_VIT_H`) of that width."""
    hidden, channels, patch = s("vision_model.embeddings.patch_embedding.weight")[:3]
    positions = s("vision_model.embeddings.position_embedding.weight")[0]
    side = math.isqrt(positions - 1)
    if hidden not in CLIP_HEADS or side * side != positions - 1:
        raise SourceError(f"{s.where}: cannot tell the attention heads of a {hidden}-wide CLIP vision model (not "
                          "the published ViT-H/14): give its config.json with --components REPO")
    proj = s.get("visual_projection.weight")
    return dict(CLIP_VIT_H, hidden_size=hidden, num_channels=channels, patch_size=patch, image_size=side * patch,
                num_attention_heads=CLIP_HEADS[hidden], num_hidden_layers=s.count("vision_model.encoder.layers.{}.mlp.fc1.weight"),
                intermediate_size=s("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
                projection_dim=proj[0] if proj else CLIP_VIT_H["projection_dim"])


_DERIVE = {"vae": vae_config, "text_encoder": umt5_config, "image_encoder": clip_config}


def derive_config(component: str, shapes: Mapping[str, tuple[int, ...]], where, original: Mapping | None = None) -> dict:
    """A component's config.json from its tensor shapes under diffusers' names (see each ``*_config``)."""
    s = Shapes(shapes, where, component)
    return transformer_config(s, original) if component.startswith("transformer") else _DERIVE[component](s)


# --------------------------------------------------------------------------------------------
# The source as a repository
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OriginalRepo(Repo):
    """A single-file or original Wan-AI source read as a diffusers repository (see the module doc):
    ``files`` per component, ``configs`` (derived or lent) for every component it has, ``lender`` (the
    ``--components`` repository) for the components in ``lent``, ``sides``: tokenizer, scheduler, image
    processor files."""

    files: dict[str, list[pathlib.Path]] = dataclasses.field(default_factory=dict)
    configs: dict[str, dict] = dataclasses.field(default_factory=dict)
    lender: Repo | None = None
    lent: tuple[str, ...] = ()
    sides: dict[str, pathlib.Path | bytes] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ("transformer", "vae", "text_encoder")

    def components(self) -> list[str]:
        return [c for c in families.COMPONENTS if c in self.files or c in self.lent]

    def component(self, name: str):
        if name in self.files:
            return Mapped(name, self.files[name], self.configs[name])
        if name not in self.lent:
            raise SourceError(self.missing(name))
        return self.lender.component(name)

    def config(self, name: str) -> dict | None:
        return self.configs.get(name)

    def side_files(self, components: list[str]) -> dict[str, pathlib.Path | bytes]:
        out: dict[str, pathlib.Path | bytes] = {"model_index.json": _json(self.model_index)}
        out.update({f"{c}/config.json": _json(self.configs[c]) for c in components})
        out.update(self.sides)
        return out

    def missing(self, what: str) -> str:
        hint = HINTS.get(what, "pass --components REPO")
        return f"{self.source_id}: no {what.split('/')[0]}: {hint} (or --only to convert single components)"

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file the conversion reads (component/name -> hex); side files written from
        derived values are in the checkpoint itself."""
        out = {f"{c}/{f.name}": tensorfile.sha256(f) for c, fs in self.files.items() for f in fs}
        for c in self.lent:
            folder = self.lender.root / c
            out.update({f"{c}/{p.relative_to(folder).as_posix()}": tensorfile.sha256(p)
                        for p in sorted(folder.rglob("*")) if p.is_file()})
        out.update({rel: tensorfile.sha256(p) for rel, p in self.sides.items() if isinstance(p, pathlib.Path)})
        return out


def _json(data: Mapping) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def recognised(path: pathlib.Path) -> bool:
    """Whether ``path`` is a source this module reads: a weight file, or a folder with an original Wan
    config.json (``dim``, ``num_heads``, ``num_layers``; Wan 2.2 A14B: in ``high_noise_model/``)."""
    if path.is_file():
        return path.suffix in (".safetensors", *_PTH)
    for cfg in (path / "config.json", path / "high_noise_model" / "config.json"):
        if cfg.is_file():
            data = read_json(cfg)
            return {"dim", "num_heads", "num_layers"} <= set(data)
    return False


def resolve(path: pathlib.Path, options: SourceOptions) -> OriginalRepo:
    """The repository of a single-file transformer (``path`` a file) or an original Wan-AI folder, with the
    component files, tokenizer and lending repository of ``options``."""
    path = path.resolve()
    files, tokenizer, originals = _layout(path, options)
    tensors = {c: _tensors(c, fs) for c, fs in files.items()}
    clip = "condition_embedder.image_embedder.norm1.weight" in tensors["transformer"]
    lender = _lender(options.components, files, tokenizer, clip) if options.components else None
    configs = {c: _config(c, tensors[c], _where(fs), originals.get(c), lender) for c, fs in files.items()}
    experts = 2 if "transformer_2" in files else 1
    kind = _kind(configs["transformer"], experts)
    lendable = set(lender.components()) if lender is not None else set()
    lent = tuple(c for c in ("vae", "text_encoder", "image_encoder")
                 if c not in files and c in lendable and (clip or c != "image_encoder"))
    configs.update({c: lender.config(c) for c in lent})
    model_index = _model_index(configs, experts, kind, clip)
    family = _family(path, model_index, configs, experts)
    sides = _sides(tokenizer, lender, kind, bool(model_index["expand_timesteps"]), configs if clip else {})
    return OriginalRepo(path, str(path), None, model_index, files=files, configs=configs, lender=lender, lent=lent,
                        sides=sides, needs=family.components)


def _where(files: list[pathlib.Path]) -> pathlib.Path:
    return files[0] if len(files) == 1 else files[0].parent


def _layout(path: pathlib.Path, options: SourceOptions) -> tuple[dict, pathlib.Path | None, dict]:
    """The weight files of each component (the source's own, then the flags'), the tokenizer folder,
    and the original config.json of each transformer."""
    files: dict[str, list[pathlib.Path]] = {}
    originals: dict[str, dict] = {}
    tokenizer = None
    if path.is_file():
        files["transformer"] = [path]
    else:
        experts = [path / "high_noise_model", path / "low_noise_model"]
        folders = experts if (experts[0] / "config.json").is_file() else [path]
        for c, folder in zip(("transformer", "transformer_2"), folders):
            files[c], originals[c] = _transformer_files(folder), read_json(folder / "config.json")
        for c, pattern in FOLDER_FILES.items():
            found = sorted(path.glob(pattern))
            if len(found) > 1:
                raise SourceError(f"{path}: several {c} files ({', '.join(f.name for f in found)}); pass one "
                                  f"with --{c.replace('_', '-')}")
            files.update({c: found} if found else {})
        tokenizer = path / FOLDER_TOKENIZER if (path / FOLDER_TOKENIZER).is_dir() else None
    for c in ("transformer_2", "vae", "text_encoder", "image_encoder"):
        given = getattr(options, c)
        if given:
            files[c] = [_given(given, f"--{c.replace('_', '-')}", folder=False)]
    if options.tokenizer:
        tokenizer = _given(options.tokenizer, "--tokenizer", folder=True)
    return files, tokenizer, originals


def _given(value: str, flag: str, folder: bool) -> pathlib.Path:
    p = pathlib.Path(value).expanduser()
    if not (p.is_dir() if folder else p.is_file()):
        raise SourceError(f"{flag} {value}: no such {'folder' if folder else 'file'}")
    return p.resolve()


def _transformer_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """An original Wan-AI transformer: its shards (from the index) or its one safetensors file."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SourceError(f"{index}: not a safetensors index (no weight_map)")
        files = [folder / f for f in sorted(set(map(str, weight_map.values())))]
        for f in files:
            if not f.is_file():
                raise SourceError(f"{f}: shard named in {index.name} is missing")
        return files
    found = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if len(found) != 1:
        raise SourceError(f"{folder}: {'several' if found else 'no'} diffusion_pytorch_model*.safetensors "
                          f"{'without an index' if found else '(the transformer of an original Wan-AI folder)'}")
    return found


def _tensors(component: str, files: list[pathlib.Path]) -> dict[str, AliasInfo]:
    """A component's tensors under diffusers' names (headers only: no weights are read)."""
    comp = Mapped(component, files)
    comp.close()
    return comp.tensors


def _lender(source: str, files: Mapping, tokenizer, clip: bool) -> Repo:
    """The ``--components`` repository (for a hub id: only the files of what the source lacks)."""
    from .source import resolve as resolve_repo

    wanted = [c for c in ("vae", "text_encoder") + (("image_encoder",) if clip else ()) if c not in files]
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "image_processor/*", *(f"{c}/*" for c in wanted)]
    try:
        repo = resolve_repo(source, patterns=patterns + ([] if tokenizer else ["tokenizer/*"]))
    except SourceError as e:
        raise SourceError(f"--components: {e}") from None
    if isinstance(repo, OriginalRepo):
        raise SourceError(f"--components {source}: not a diffusers repository (model_index.json)")
    return repo


def _config(component: str, tensors: Mapping[str, AliasInfo], where, original: Mapping | None,
            lender: Repo | None) -> dict:
    """The lender's config.json of the component where it describes these weights (its param tree takes
    every tensor with its shape), else one derived from the shapes. Where neither works, the error is
    the lender's mismatch (it names the tensor) if it has the component, else the derivation's."""
    lent = lender.config(component) if lender is not None else None
    mismatch = None
    if lent is not None:
        from .mapping import plan

        try:
            plan(component, tensors, fmt.component_tree(component, lent, "float32"))
            return lent
        except (SourceError, ValueError) as e:  # FormatError is a ValueError
            mismatch = e
    try:
        return derive_config(component, {n: i.shape for n, i in tensors.items()}, where, original)
    except SourceError:
        if mismatch is None:
            raise
        raise SourceError(f"{mismatch} (with the {component} config.json of --components)") from None


def _model_index(configs: Mapping[str, dict], experts: int, kind: str | None, clip: bool) -> dict:
    """The model_index.json of the source's pipeline (what families.detect and wan-run read)."""
    t = configs["transformer"]
    z = int((configs.get("vae") or {}).get("z_dim") or t["out_channels"])
    i2v = t["in_channels"] == 2 * z + 4
    none = [None, None]
    boundary = (KINDS[kind].boundary_ratio if kind else 0.9 if i2v else 0.875) if experts == 2 else None
    cls = t.get("_class_name", "WanTransformer3DModel")
    pipeline = "WanVACEPipeline" if cls == "WanVACETransformer3DModel" else \
        "WanImageToVideoPipeline" if i2v else "WanPipeline"
    return {"_class_name": pipeline, "boundary_ratio": boundary,
            "expand_timesteps": z == 48,
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"] if clip else none,
            "image_processor": ["transformers", "CLIPImageProcessor"] if clip else none,
            "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", cls],
            "transformer_2": ["diffusers", cls] if experts == 2 else none,
            "vae": ["diffusers", "AutoencoderKLWan"]}


def _family(path: pathlib.Path, model_index: Mapping, configs: Mapping, experts: int) -> families.Family:
    t = configs["transformer"]
    if t["in_channels"] != t["out_channels"] and not t.get("image_dim") and experts == 1:
        raise SourceError(f"{path}: an image-to-video transformer without CLIP projections is one expert of "
                          f"Wan2.2-I2V-A14B: {HINTS['transformer_2']}")
    try:
        return families.detect(model_index, t, configs.get("vae"))
    except ValueError as e:
        raise SourceError(f"{path}: {e}") from None


def _sides(tokenizer: pathlib.Path | None, lender: Repo | None, kind: str | None, ti2v: bool,
           clip_configs: Mapping) -> dict[str, pathlib.Path | bytes]:
    """Tokenizer files (the folder given or found, else the lender's), the scheduler config (the published
    model's; another size: the lender's, else the published family's) and, for CLIP models, the image
    processor's."""
    lent = lender.root if lender is not None else None
    if tokenizer is None and lent is not None and (lent / "tokenizer").is_dir():
        tokenizer = lent / "tokenizer"
    out: dict[str, pathlib.Path | bytes] = {}
    if tokenizer is not None:
        out.update({f"tokenizer/{p.relative_to(tokenizer).as_posix()}": p
                    for p in sorted(tokenizer.rglob("*")) if p.is_file()})
    scheduler = lent / "scheduler" / "scheduler_config.json" if lent is not None else None
    if kind is None and scheduler is not None and scheduler.is_file():
        out["scheduler/scheduler_config.json"] = scheduler
    else:
        shift = KINDS[kind].flow_shift if kind else KINDS["Wan2.2-TI2V-5B"].flow_shift if ti2v else SCHEDULER["flow_shift"]
        out["scheduler/scheduler_config.json"] = _json(dict(SCHEDULER, flow_shift=shift))
    processor = lent / "image_processor" / "preprocessor_config.json" if lent is not None else None
    if clip_configs.get("image_encoder") and processor is not None and processor.is_file():
        out["image_processor/preprocessor_config.json"] = processor
    elif clip_configs.get("image_encoder"):
        size = int(clip_configs["image_encoder"].get("image_size", 224))
        out["image_processor/preprocessor_config.json"] = _json(
            dict(IMAGE_PROCESSOR, crop_size={"height": size, "width": size}, size={"shortest_edge": size}))
    return out
