"""transformers' OPT state dict <-> refopt's parameter dict.

transformers stores linear weights ``[out, in]``, as refopt does (so loading maps the file without a
copy), names the MLP's LayerNorm
``final_layer_norm`` inside each layer, and keeps ``max_position_embeddings + 2`` position rows
(positions are offset by 2).  refopt drops the two offset rows on load and keeps them aside as
``position_prefix`` so saving writes the same checkpoint back.
"""

from __future__ import annotations

import numpy as np

from refopt.config import OPTConfig

POSITION_OFFSET = 2


def name_map(cfg: OPTConfig) -> dict[str, str]:
    """refopt name -> transformers name, for every parameter but the positions."""
    out = {"embed_tokens": "model.decoder.embed_tokens.weight"}
    if cfg.has_projection:
        out["project_in.weight"] = "model.decoder.project_in.weight"
        out["project_out.weight"] = "model.decoder.project_out.weight"
    norms = {"self_attn_layer_norm": "self_attn_layer_norm", "mlp_layer_norm": "final_layer_norm"}
    dense = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "out_proj": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"model.decoder.layers.{i}."
        if cfg.layer_norm_elementwise_affine:
            for a, b in norms.items():
                out[f"{ours}{a}.gamma"] = f"{theirs}{b}.weight"
                out[f"{ours}{a}.beta"] = f"{theirs}{b}.bias"
        for a, b in dense.items():
            out[f"{ours}{a}.weight"] = f"{theirs}{b}.weight"
            if cfg.enable_bias:
                out[f"{ours}{a}.bias"] = f"{theirs}{b}.bias"
    if cfg.has_final_layer_norm and cfg.layer_norm_elementwise_affine:
        out["final_layer_norm.gamma"] = "model.decoder.final_layer_norm.weight"
        out["final_layer_norm.beta"] = "model.decoder.final_layer_norm.bias"
    return out


POSITIONS_NAME = "model.decoder.embed_positions.weight"


def canonical_name(name: str) -> str:
    """Accept checkpoints saved from OPTModel (``decoder.``) as well as OPTForCausalLM."""
    if name.startswith("model.decoder.") or name == "lm_head.weight":
        return name
    if name.startswith("decoder."):
        return "model." + name
    return name


def same_tensor(a, b) -> bool:
    """Whether two stored tensors hold the same values (views of one storage, as PyTorch's tied
    weights are, are the same without reading them)."""
    if (a.dtype == b.dtype and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]):
        return True
    if a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a.view(np.uint16) if a.dtype.fields else a, b.view(np.uint16) if b.dtype.fields else b))


def to_state_dict(params: dict[str, np.ndarray], cfg: OPTConfig, position_prefix=None):
    """transformers' state dict (without the tied ``lm_head.weight``, as ``save_pretrained`` writes)."""
    out = {}
    for ours, theirs in name_map(cfg).items():
        out[theirs] = np.ascontiguousarray(params[ours])
    pos = params["embed_positions"]
    if position_prefix is None:
        position_prefix = np.zeros((POSITION_OFFSET, pos.shape[1]), pos.dtype)
    out[POSITIONS_NAME] = np.concatenate([np.asarray(position_prefix, pos.dtype), pos], axis=0)
    return out


def grads_to_huggingface(grads: dict[str, np.ndarray], cfg: OPTConfig) -> dict[str, np.ndarray]:
    """Gradients keyed and shaped like transformers' parameters (the offset rows get zero)."""
    return to_state_dict(grads, cfg, position_prefix=np.zeros((POSITION_OFFSET, cfg.hidden_dim),
                                                             grads["embed_positions"].dtype))
