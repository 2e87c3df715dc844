"""Write a real-size Wan transformer with random FP32 weights, diffusers key names and shard layout.

No torch model is built: tensors are written shard by shard straight into safetensors files (values
are a random block tiled over each tensor, so writing 57 GB does not cost minutes of RNG), with a
``diffusion_pytorch_model.safetensors.index.json`` and a ``model_index.json`` that lists only the
transformer. For benchmarks (tools/bench_convert.py, tools/bench.py).

    python tools/make_synthetic_checkpoint.py OUT [--model wan2.1-t2v-1.3b|wan2.1-t2v-14b] [--layers N]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import struct
import sys

import numpy as np

MODELS = {
    "wan2.1-t2v-1.3b": dict(num_attention_heads=12, num_layers=30, ffn_dim=8960),
    "wan2.1-t2v-14b": dict(num_attention_heads=40, num_layers=40, ffn_dim=13824),
}
SHARD_BYTES = 5_000_000_000  # the published diffusers repos use ~5 GB shards


def transformer_config(model: str, layers: int | None = None) -> dict:
    cfg = dict(
        _class_name="WanTransformer3DModel", _diffusers_version="0.42.1", added_kv_proj_dim=None,
        attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=None, freq_dim=256, image_dim=None,
        in_channels=16, num_attention_heads=None, num_layers=None, out_channels=16, patch_size=[1, 2, 2],
        pos_embed_seq_len=None, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096,
    )
    cfg.update(MODELS[model])
    if layers:
        cfg["num_layers"] = layers
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """diffusers state-dict keys and shapes (see shared/reference/diffusers-wan.md section 2)."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    F, T, fq = cfg["ffn_dim"], cfg["text_dim"], cfg["freq_dim"]
    cin, cout = cfg["in_channels"], cfg["out_channels"]
    s: dict[str, tuple[int, ...]] = {
        "scale_shift_table": (1, 2, D),
        "patch_embedding.weight": (D, cin, 1, 2, 2), "patch_embedding.bias": (D,),
        "condition_embedder.time_embedder.linear_1.weight": (D, fq),
        "condition_embedder.time_embedder.linear_1.bias": (D,),
        "condition_embedder.time_embedder.linear_2.weight": (D, D),
        "condition_embedder.time_embedder.linear_2.bias": (D,),
        "condition_embedder.time_proj.weight": (6 * D, D), "condition_embedder.time_proj.bias": (6 * D,),
        "condition_embedder.text_embedder.linear_1.weight": (D, T),
        "condition_embedder.text_embedder.linear_1.bias": (D,),
        "condition_embedder.text_embedder.linear_2.weight": (D, D),
        "condition_embedder.text_embedder.linear_2.bias": (D,),
        "proj_out.weight": (cout * 4, D), "proj_out.bias": (cout * 4,),
    }
    for i in range(cfg["num_layers"]):
        b = f"blocks.{i}."
        s[b + "scale_shift_table"] = (1, 6, D)
        for a in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{b}{a}.{p}.weight"] = (D, D)
                s[f"{b}{a}.{p}.bias"] = (D,)
            s[f"{b}{a}.norm_q.weight"] = (D,)
            s[f"{b}{a}.norm_k.weight"] = (D,)
        s[b + "norm2.weight"] = (D,)
        s[b + "norm2.bias"] = (D,)
        s[b + "ffn.net.0.proj.weight"] = (F, D)
        s[b + "ffn.net.0.proj.bias"] = (F,)
        s[b + "ffn.net.2.weight"] = (D, F)
        s[b + "ffn.net.2.bias"] = (D,)
    return s


def _write_shard(path: pathlib.Path, names: list[str], shapes: dict, block: np.ndarray) -> None:
    header, offset = {}, 0
    for n in names:
        nbytes = math.prod(shapes[n]) * 4
        header[n] = {"dtype": "F32", "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    flat = block.reshape(-1)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, n in enumerate(names):
            count = math.prod(shapes[n])
            start = (i * 7919) % (flat.size // 2)
            while count:
                take = min(count, flat.size - start)
                f.write(flat[start:start + take].tobytes())
                count -= take
                start = 0


def write(out: pathlib.Path, model: str = "wan2.1-t2v-1.3b", layers: int | None = None, seed: int = 0) -> pathlib.Path:
    cfg = transformer_config(model, layers)
    shapes = tensor_shapes(cfg)
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(4 << 20, dtype=np.float32) * 0.02).astype(np.float32)  # 16 MiB
    folder = out / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for n in shapes:  # diffusers writes in state-dict order
        nbytes = math.prod(shapes[n]) * 4
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / fname, names, shapes, block)
        weight_map.update({n: fname for n in names})
    total = sum(math.prod(s) * 4 for s in shapes.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "WanTransformer3DModel"]},
        indent=1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--model", choices=sorted(MODELS), default="wan2.1-t2v-1.3b")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (smaller benchmarks)")
    args = ap.parse_args(argv)
    write(args.out, args.model, args.layers)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.model}: {args.out} ({size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
