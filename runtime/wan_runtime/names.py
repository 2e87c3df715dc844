"""Tensor names: the ones weight files use, and the runtime param tree's.

Three spellings of a Wan transformer's tensors exist in the files users hold:

- **diffusers** (``WanTransformer3DModel``): ``blocks.3.attn1.to_q.weight``;
- **original** (Wan-AI's repositories, ComfyUI single files with a ``model.diffusion_model.`` prefix,
  LoRAs in the Wan / ComfyUI format with ``diffusion_model.``): ``blocks.3.self_attn.q.weight``;
- the **runtime's** tree (``format.transformer_tree``): diffusers' names with the blocks stacked
  (``blocks.attn1.to_q.weight`` of shape (layers, out, in)) and a few modules flattened
  (``to_out.0`` -> ``to_out``, ``ffn.net.0.proj`` -> ``ffn.fc_in``).

Each table is prefix rules ``(from, to)``, tried in order, first match wins; ``{L}`` is a block index.
wan-convert builds its mapping from them (``wan_convert.mapping``), and the LoRA reader (``lora.py``)
names the modules it changes with them, so the three spellings are written down once.
"""
from __future__ import annotations

import re

def _block(src: str, dst: str) -> tuple[tuple[str, str], ...]:
    """diffusers' names of one stack of ``WanTransformerBlock``s (``src.{L}.``) -> the runtime's (``dst.``)."""
    return ((f"{src}.{{L}}.attn1.to_out.0.", f"{dst}.attn1.to_out."),
            (f"{src}.{{L}}.attn2.to_out.0.", f"{dst}.attn2.to_out."),
            (f"{src}.{{L}}.ffn.net.0.proj.", f"{dst}.ffn.fc_in."),
            (f"{src}.{{L}}.ffn.net.2.", f"{dst}.ffn.fc_out."),
            (f"{src}.{{L}}.", f"{dst}."))


#: diffusers' transformer names -> the runtime tree's (VACE: its blocks stacked as ``vace_blocks``, block
#: 0's input projection on its own, ``vace_patch_embedding`` as it is)
TRANSFORMER = (
    *_block("blocks", "blocks"),
    ("vace_blocks.0.proj_in.", "vace_proj_in."),
    *_block("vace_blocks", "vace_blocks"),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "condition_embedder.image_embedder.ff.fc_in."),
    ("condition_embedder.image_embedder.ff.net.2.", "condition_embedder.image_embedder.ff.fc_out."),
    ("", ""),
)


def _original_block(blocks: str) -> tuple[tuple[str, str], ...]:
    """The original names of one stack of Wan blocks (``blocks`` or VACE's ``vace_blocks``) -> diffusers'."""
    b = f"{blocks}.{{L}}"
    return (
        *((f"{b}.self_attn.{o}.", f"{b}.attn1.{d}.") for o, d in
          (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))),
        *((f"{b}.cross_attn.{o}.", f"{b}.attn2.{d}.") for o, d in
          (("q", "to_q"), ("k_img", "add_k_proj"), ("v_img", "add_v_proj"), ("k", "to_k"), ("v", "to_v"),
           ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k_img", "norm_added_k"), ("norm_k", "norm_k"))),
        (f"{b}.ffn.0.", f"{b}.ffn.net.0.proj."),
        (f"{b}.ffn.2.", f"{b}.ffn.net.2."),
        (f"{b}.norm3.", f"{b}.norm2."),  # the cross-attention norm (the only block norm with weights)
        (f"{b}.modulation", f"{b}.scale_shift_table"),
    )


#: the original Wan transformer names -> diffusers' (the inverse of diffusers' conversion script; VACE's
#: ``before_proj`` / ``after_proj`` are diffusers' ``proj_in`` / ``proj_out``)
ORIGINAL_TRANSFORMER = (
    *_original_block("blocks"),
    *_original_block("vace_blocks"),
    ("vace_blocks.{L}.before_proj.", "vace_blocks.{L}.proj_in."),
    ("vace_blocks.{L}.after_proj.", "vace_blocks.{L}.proj_out."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding.", "patch_embedding."),
    ("vace_patch_embedding.", "vace_patch_embedding."),
)


def _compile(rules):
    return tuple((re.compile(re.escape(a).replace(re.escape("{L}"), r"(?P<L>\d+)")), b) for a, b in rules)


_TO_RUNTIME = _compile(TRANSFORMER)
_FROM_ORIGINAL = _compile(ORIGINAL_TRANSFORMER)


def rename(name: str, rules) -> tuple[str, int | None] | None:
    """``name`` under the first rule of ``rules`` (compiled by ``_compile``) whose prefix matches: the new
    name (``{L}`` in the target replaced by the block index) and the block index (None if the rule has
    none); None if no rule matches."""
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            layer = int(m.group("L")) if "L" in pattern.groupindex else None
            head = target.replace("{L}", str(layer)) if layer is not None else target
            return head + name[m.end():], layer
    return None


def original_to_diffusers(name: str) -> str | None:
    """An original Wan transformer tensor or module name in diffusers' spelling (None: not a Wan name)."""
    got = rename(name, _FROM_ORIGINAL)
    return None if got is None else got[0]


def diffusers_to_runtime(name: str) -> tuple[str, int | None]:
    """A diffusers transformer name -> (the runtime tree's path, block index or None)."""
    return rename(name, _TO_RUNTIME)


# --------------------------------------------------------------------------------------------
# The other components' original names (Wan-AI's .pth files, ComfyUI's single files), each table
# mapping them to the diffusers / transformers names the converter's tables take from there.
# --------------------------------------------------------------------------------------------
#: Wan's UMT5-XXL encoder (``models_t5_umt5-xxl-enc-bf16.pth``: ``T5Encoder`` of wan/modules/t5.py, one
#: relative-position embedding per block) -> transformers' ``UMT5EncoderModel``. Wan's feed-forward is
#: ``fc1(x) * gelu_tanh(gate(x))``, transformers' ``wi_1(x) * gelu_new(wi_0(x))``.
ORIGINAL_UMT5 = (
    ("token_embedding.", "shared."),
    ("blocks.{L}.norm1.", "encoder.block.{L}.layer.0.layer_norm."),
    ("blocks.{L}.pos_embedding.embedding.", "encoder.block.{L}.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.{L}.attn.", "encoder.block.{L}.layer.0.SelfAttention."),  # q, k, v, o (no biases)
    ("blocks.{L}.norm2.", "encoder.block.{L}.layer.1.layer_norm."),
    ("blocks.{L}.ffn.gate.0.", "encoder.block.{L}.layer.1.DenseReluDense.wi_0."),
    ("blocks.{L}.ffn.fc1.", "encoder.block.{L}.layer.1.DenseReluDense.wi_1."),
    ("blocks.{L}.ffn.fc2.", "encoder.block.{L}.layer.1.DenseReluDense.wo."),
    ("norm.", "encoder.final_layer_norm."),
)

#: Wan 2.1's CLIP (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: ``XLMRobertaCLIP`` of
#: wan/modules/clip.py), its vision tower -> transformers' ``CLIPVisionModel`` (``cls_embedding`` (1, 1, D)
#: and ``pos_embedding`` (1, P, D) carry size-one axes transformers' do not).
ORIGINAL_CLIP = (
    ("visual.patch_embedding.", "vision_model.embeddings.patch_embedding."),
    ("visual.cls_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.pos_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.pre_norm.", "vision_model.pre_layrnorm."),
    ("visual.transformer.{L}.norm1.", "vision_model.encoder.layers.{L}.layer_norm1."),
    ("visual.transformer.{L}.attn.proj.", "vision_model.encoder.layers.{L}.self_attn.out_proj."),
    ("visual.transformer.{L}.norm2.", "vision_model.encoder.layers.{L}.layer_norm2."),
    ("visual.transformer.{L}.mlp.0.", "vision_model.encoder.layers.{L}.mlp.fc1."),
    ("visual.transformer.{L}.mlp.2.", "vision_model.encoder.layers.{L}.mlp.fc2."),
)
#: fused tensors of Wan's CLIP: one source prefix -> the targets its equal row blocks become, in order
#: (``SelfAttention.to_qkv``: its output is viewed as (3, heads, head_dim), so the rows are q, k, v)
ORIGINAL_CLIP_FUSED = (
    ("visual.transformer.{L}.attn.to_qkv.", tuple(f"vision_model.encoder.layers.{{L}}.self_attn.{p}_proj."
                                                   for p in "qkv")),
)
#: parts of Wan's CLIP file that Wan's image conditioning never reads (the XLM-RoBERTa text tower, the
#: contrastive head and temperature, the last norm: Wan takes the penultimate block's hidden states)
ORIGINAL_CLIP_UNUSED = ("textual.", "log_scale", "visual.head", "visual.post_norm.")

#: inside a VAE residual block (wan/modules/vae.py ``ResidualBlock``: ``residual`` is a Sequential of
#: RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv; ``shortcut`` a 1x1x1 conv where the width changes)
ORIGINAL_VAE_RESNET = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                       ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
#: the VAE's modules outside its stages (wan/modules/vae.py and vae2_2.py ``WanVAE_``; attention blocks and
#: resamplers keep their inner names: ``norm``, ``to_qkv``, ``proj``; ``resample.1``, ``time_conv``)
ORIGINAL_VAE = tuple(
    rule for side in ("encoder", "decoder") for rule in (
        (f"{side}.conv1.", f"{side}.conv_in."),
        (f"{side}.head.0.", f"{side}.norm_out."),
        (f"{side}.head.2.", f"{side}.conv_out."),
        (f"{side}.middle.1.", f"{side}.mid_block.attentions.0."),
    )) + (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))


def original_vae(stages: int, res_blocks: int, residual: bool) -> tuple[tuple[str, str], ...]:
    """The prefix rules of a whole Wan VAE with ``stages`` stages of ``res_blocks`` residual blocks: Wan 2.1
    (``residual`` False) numbers each side's stage modules in one flat Sequential (encoder: resnets, then a
    downsampler per stage but the last, kept flat by diffusers; decoder: ``res_blocks + 1`` resnets and an
    upsampler per stage, grouped by diffusers into ``up_blocks.{s}``); Wan 2.2 nests them per stage
    (``downsamples.{s}.downsamples.{r}`` -> ``down_blocks.{s}.resnets.{r}`` / ``.downsampler``)."""
    resnets = [("encoder.middle.0.", "encoder.mid_block.resnets.0."), ("encoder.middle.2.", "encoder.mid_block.resnets.1."),
               ("decoder.middle.0.", "decoder.mid_block.resnets.0."), ("decoder.middle.2.", "decoder.mid_block.resnets.1.")]
    plain = list(ORIGINAL_VAE)
    if residual:
        for s in range(stages):
            down, up = f"encoder.downsamples.{s}.downsamples.", f"decoder.upsamples.{s}.upsamples."
            resnets += [(f"{down}{r}.", f"encoder.down_blocks.{s}.resnets.{r}.") for r in range(res_blocks)]
            resnets += [(f"{up}{r}.", f"decoder.up_blocks.{s}.resnets.{r}.") for r in range(res_blocks + 1)]
            if s < stages - 1:
                plain += [(f"{down}{res_blocks}.", f"encoder.down_blocks.{s}.downsampler."),
                          (f"{up}{res_blocks + 1}.", f"decoder.up_blocks.{s}.upsampler.")]
    else:
        resnets.append(("encoder.downsamples.{L}.", "encoder.down_blocks.{L}."))
        plain.append(("encoder.downsamples.{L}.", "encoder.down_blocks.{L}."))  # attention blocks, downsamplers
        k = 0
        for s in range(stages):
            for r in range(res_blocks + 1):
                resnets.append((f"decoder.upsamples.{k}.", f"decoder.up_blocks.{s}.resnets.{r}."))
                k += 1
            if s < stages - 1:
                plain.append((f"decoder.upsamples.{k}.", f"decoder.up_blocks.{s}.upsamplers.0."))
                k += 1
    inner = tuple((a + i, b + j) for a, b in resnets for i, j in ORIGINAL_VAE_RESNET)
    return inner + tuple(plain)


def compile_rules(rules):
    """A table of ``(from, to)`` prefix rules compiled for :func:`rename`."""
    return _compile(rules)
