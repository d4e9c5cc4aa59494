"""Test-only bridge: a TransformerLens HookedTransformer holding the same weights as a Weights."""

from __future__ import annotations

import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from jaxinduct.model.weights import Weights

_NORM = {"none": None, "layernorm": "LN", "rmsnorm": "RMS"}
_POS = {"learned": "standard", "shortformer": "shortformer", "rotary": "rotary"}


def hooked_transformer(weights: Weights, *, process: bool) -> HookedTransformer:
    spec = weights.spec
    cfg = HookedTransformerConfig(
        n_layers=spec.n_layers, d_model=spec.d_model, n_ctx=spec.n_ctx, d_head=spec.d_head, n_heads=spec.n_heads,
        d_vocab=spec.d_vocab, d_mlp=spec.d_mlp, attn_only=spec.attn_only, act_fn=spec.activation.value,
        normalization_type=_NORM[spec.norm.value], positional_embedding_type=_POS[spec.positional.value],
        rotary_dim=spec.rotary_dim, rotary_base=int(spec.rotary_base), parallel_attn_mlp=spec.parallel_attn_mlp,
        eps=spec.norm_eps, device="cpu", dtype=torch.float32,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        _state_dict(weights),
        fold_ln=process,
        center_writing_weights=process,
        center_unembed=process,
        fold_value_biases=process,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def _state_dict(w: Weights) -> dict[str, torch.Tensor]:
    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    sd = {"embed.W_E": t(w.W_E), "unembed.W_U": t(w.W_U), "unembed.b_U": t(w.b_U)}
    if w.W_pos is not None:
        sd["pos_embed.W_pos"] = t(w.W_pos)
    if w.ln_final_w is not None:
        sd["ln_final.w"] = t(w.ln_final_w)
    if w.ln_final_b is not None:
        sd["ln_final.b"] = t(w.ln_final_b)
    for layer in range(w.spec.n_layers):
        prefix = f"blocks.{layer}"
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[f"{prefix}.attn.{name}"] = t(getattr(w, name)[layer])
        for ours, theirs in (("ln1_w", "ln1.w"), ("ln1_b", "ln1.b"), ("ln2_w", "ln2.w"), ("ln2_b", "ln2.b")):
            if getattr(w, ours) is not None:
                sd[f"{prefix}.{theirs}"] = t(getattr(w, ours)[layer])
        if not w.spec.attn_only:
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[f"{prefix}.mlp.{name}"] = t(getattr(w, name)[layer])
    return sd
