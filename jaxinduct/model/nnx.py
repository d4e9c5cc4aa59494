"""The reference model: a Flax NNX transformer that the trainer trains.

It covers every architecture a `ModelSpec` describes, and is deliberately written
independently of `jaxinduct.model.forward` (flax's own Linear/LayerNorm/RMSNorm layers,
fused head projections, `jax.nn.dot_product_attention`, rotary as a complex
rotation) so that each checks the other in the tests.

Its parameters, as a pure dict (``nnx.to_pure_dict``), are the checkpoint layout that
the trainer saves (`jaxinduct.checkpoints.layout.Layout.NNX`); `nnx_params_to_weights` and
`weights_to_nnx_params` convert that layout losslessly to and from canonical `Weights`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxinduct.errors import SpecError
from jaxinduct.model.weights import Activation, ModelSpec, NormKind, PositionalScheme, Weights, make_weights

# GPT-2-style init, N(0, 0.02) for every matrix. Measured on the quickstart corpus: with
# flax's default lecun-normal kernels the 2-layer model sits on a "bag of tokens" loss
# plateau (~3.4) for 1500+ steps and never forms an induction head; with 0.02 the layer-1
# head's prefix matching jumps from 0.05 to 0.7 within ~100 steps, a few hundred steps in.
_INIT = nnx.initializers.normal(stddev=0.02)


def _make_norm(spec: ModelSpec, rngs: nnx.Rngs) -> nnx.Module | None:
    if spec.norm == NormKind.LAYERNORM:
        return nnx.LayerNorm(spec.d_model, epsilon=spec.norm_eps, rngs=rngs)
    if spec.norm == NormKind.RMSNORM:
        return nnx.RMSNorm(spec.d_model, epsilon=spec.norm_eps, rngs=rngs)
    return None


def _apply_norm(norm: nnx.Module | None, x: Array) -> Array:
    return x if norm is None else norm(x)


class Attention(nnx.Module):
    """Multi-head causal attention with fused [d_model, head * d_head] projections."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        width = spec.n_heads * spec.d_head
        self.query = nnx.Linear(spec.d_model, width, kernel_init=_INIT, rngs=rngs)
        self.key = nnx.Linear(spec.d_model, width, kernel_init=_INIT, rngs=rngs)
        self.value = nnx.Linear(spec.d_model, width, kernel_init=_INIT, rngs=rngs)
        self.out = nnx.Linear(width, spec.d_model, kernel_init=_INIT, rngs=rngs)

    def __call__(self, qk_in: Array, v_in: Array) -> Array:
        batch, seq, _ = v_in.shape
        heads = (batch, seq, self.spec.n_heads, self.spec.d_head)
        q = self.query(qk_in).reshape(heads)
        k = self.key(qk_in).reshape(heads)
        v = self.value(v_in).reshape(heads)
        if self.spec.positional == PositionalScheme.ROTARY:
            q, k = _rotate(self.spec, q), _rotate(self.spec, k)
        z = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return self.out(z.reshape(batch, seq, -1))


def _rotate(spec: ModelSpec, x: Array) -> Array:
    """GPT-NeoX rotary: dims i and i + rotary_dim/2 form one complex number."""
    assert spec.rotary_dim is not None
    half = spec.rotary_dim // 2
    freqs = spec.rotary_base ** (-np.arange(half) * 2.0 / spec.rotary_dim)
    phase = jnp.exp(1j * jnp.arange(x.shape[1])[:, None] * freqs[None, :])  # [seq, half]
    pairs = (x[..., :half] + 1j * x[..., half : spec.rotary_dim]) * phase[None, :, None, :]
    return jnp.concatenate([pairs.real, pairs.imag, x[..., spec.rotary_dim :]], axis=-1).astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        assert spec.d_mlp is not None
        self.fc_in = nnx.Linear(spec.d_model, spec.d_mlp, kernel_init=_INIT, rngs=rngs)
        self.fc_out = nnx.Linear(spec.d_mlp, spec.d_model, kernel_init=_INIT, rngs=rngs)
        self.activation = spec.activation

    def __call__(self, x: Array) -> Array:
        hidden = self.fc_in(x)
        match self.activation:
            case Activation.GELU:
                hidden = nnx.gelu(hidden, approximate=False)
            case Activation.GELU_NEW:
                hidden = nnx.gelu(hidden, approximate=True)
            case Activation.RELU:
                hidden = nnx.relu(hidden)
            case Activation.SILU:
                hidden = nnx.silu(hidden)
        return self.fc_out(hidden)


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.ln1 = _make_norm(spec, rngs)
        self.attn = Attention(spec, rngs=rngs)
        self.ln2 = None if spec.attn_only else _make_norm(spec, rngs)
        self.mlp = None if spec.attn_only else MLP(spec, rngs=rngs)

    def __call__(self, x: Array, shortformer_pos: Array | None) -> Array:
        normed = _apply_norm(self.ln1, x)
        qk_in = normed if shortformer_pos is None else normed + shortformer_pos
        attn_out = self.attn(qk_in, normed)
        if self.mlp is None:
            return x + attn_out
        if self.spec.parallel_attn_mlp:
            return x + attn_out + self.mlp(_apply_norm(self.ln2, x))
        x = x + attn_out
        return x + self.mlp(_apply_norm(self.ln2, x))


class Transformer(nnx.Module):
    """Decoder-only transformer over int tokens [batch, seq] -> logits [batch, seq, d_vocab]."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = nnx.Embed(spec.d_vocab, spec.d_model, embedding_init=_INIT, rngs=rngs)
        self.pos_embed = (
            nnx.Embed(spec.n_ctx, spec.d_model, embedding_init=_INIT, rngs=rngs)
            if spec.has_pos_embed
            else None
        )
        self.blocks = nnx.List([Block(spec, rngs=rngs) for _ in range(spec.n_layers)])
        self.ln_final = _make_norm(spec, rngs)
        self.unembed = nnx.Linear(spec.d_model, spec.d_vocab, kernel_init=_INIT, rngs=rngs)

    def __call__(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq d_vocab"]:
        seq = tokens.shape[-1]
        if self.spec.has_pos_embed and seq > self.spec.n_ctx:
            raise SpecError(f"sequence of length {seq} exceeds the model's context n_ctx={self.spec.n_ctx}")
        x = self.embed(tokens)
        positions = self.pos_embed(jnp.arange(seq)) if self.pos_embed is not None else None
        if self.spec.positional == PositionalScheme.LEARNED:
            x = x + positions
        shortformer_pos = positions if self.spec.positional == PositionalScheme.SHORTFORMER else None
        for block in self.blocks:
            x = block(x, shortformer_pos)
        return self.unembed(_apply_norm(self.ln_final, x))


# --- the "nnx" checkpoint layout <-> canonical Weights --------------------------------------


def _layer(blocks: dict, index: int) -> dict:
    # Restored Orbax trees key list entries by strings, live NNX state by ints.
    for key in (index, str(index)):
        if key in blocks:
            return blocks[key]
    raise SpecError(f"nnx params have no block {index} (found keys {sorted(map(str, blocks))})")


def _get(tree: dict, *path: str) -> Any:
    node: Any = tree
    for depth, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            raise SpecError(f"nnx params lack {'/'.join(path[: depth + 1])}")
        node = node[key]
    return node


def nnx_params_to_weights(spec: ModelSpec, params: dict) -> Weights:
    """Canonical Weights from the reference model's params (``nnx.to_pure_dict`` layout).

    Host (numpy) params give host Weights, with numpy only: the scan's loader threads
    convert every restored checkpoint, and eager jnp ops there cost ~0.1 s each time.
    """
    H, E, D = spec.n_heads, spec.d_head, spec.d_model
    layers = [_layer(_get(params, "blocks"), i) for i in range(spec.n_layers)]
    on_host = all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(params))
    xp: Any = np if on_host else jnp

    def stacked(*path: str, reshape=None):
        arrays = [xp.asarray(_get(layer, *path)) for layer in layers]
        if reshape is not None:
            arrays = [reshape(a) for a in arrays]
        return xp.stack(arrays)

    def in_proj(kernel):  # [D, H*E] -> [H, D, E]
        return kernel.reshape(D, H, E).transpose(1, 0, 2)

    arrays: dict[str, Any] = {
        "W_E": xp.asarray(_get(params, "embed", "embedding")),
        "W_Q": stacked("attn", "query", "kernel", reshape=in_proj),
        "W_K": stacked("attn", "key", "kernel", reshape=in_proj),
        "W_V": stacked("attn", "value", "kernel", reshape=in_proj),
        "W_O": stacked("attn", "out", "kernel", reshape=lambda k: k.reshape(H, E, D)),
        "b_Q": stacked("attn", "query", "bias", reshape=lambda b: b.reshape(H, E)),
        "b_K": stacked("attn", "key", "bias", reshape=lambda b: b.reshape(H, E)),
        "b_V": stacked("attn", "value", "bias", reshape=lambda b: b.reshape(H, E)),
        "b_O": stacked("attn", "out", "bias"),
        "W_U": xp.asarray(_get(params, "unembed", "kernel")),
        "b_U": xp.asarray(_get(params, "unembed", "bias")),
    }
    if spec.has_pos_embed:
        arrays["W_pos"] = xp.asarray(_get(params, "pos_embed", "embedding"))
    if spec.norm != NormKind.NONE:
        arrays["ln1_w"] = stacked("ln1", "scale")
        arrays["ln_final_w"] = xp.asarray(_get(params, "ln_final", "scale"))
        if not spec.attn_only:
            arrays["ln2_w"] = stacked("ln2", "scale")
        if spec.norm == NormKind.LAYERNORM:
            arrays["ln1_b"] = stacked("ln1", "bias")
            arrays["ln_final_b"] = xp.asarray(_get(params, "ln_final", "bias"))
            if not spec.attn_only:
                arrays["ln2_b"] = stacked("ln2", "bias")
    if not spec.attn_only:
        arrays["W_in"] = stacked("mlp", "fc_in", "kernel")
        arrays["b_in"] = stacked("mlp", "fc_in", "bias")
        arrays["W_out"] = stacked("mlp", "fc_out", "kernel")
        arrays["b_out"] = stacked("mlp", "fc_out", "bias")
    return make_weights(spec, arrays)


def weights_to_nnx_params(weights: Weights) -> dict:
    """The reference model's params (``nnx.to_pure_dict`` layout) from canonical Weights."""
    spec = weights.spec
    H, E, D = spec.n_heads, spec.d_head, spec.d_model
    w = weights

    def norm(scale, bias):
        return {"scale": scale} if bias is None else {"scale": scale, "bias": bias}

    def in_proj(W, b):  # [H, D, E] -> [D, H*E]
        return {"kernel": W.transpose(1, 0, 2).reshape(D, H * E), "bias": b.reshape(H * E)}

    blocks = {}
    for i in range(spec.n_layers):
        block: dict[str, Any] = {
            "attn": {
                "query": in_proj(w.W_Q[i], w.b_Q[i]),
                "key": in_proj(w.W_K[i], w.b_K[i]),
                "value": in_proj(w.W_V[i], w.b_V[i]),
                "out": {"kernel": w.W_O[i].reshape(H * E, D), "bias": w.b_O[i]},
            }
        }
        if spec.norm != NormKind.NONE:
            block["ln1"] = norm(w.ln1_w[i], None if w.ln1_b is None else w.ln1_b[i])
            if not spec.attn_only:
                block["ln2"] = norm(w.ln2_w[i], None if w.ln2_b is None else w.ln2_b[i])
        if not spec.attn_only:
            block["mlp"] = {
                "fc_in": {"kernel": w.W_in[i], "bias": w.b_in[i]},
                "fc_out": {"kernel": w.W_out[i], "bias": w.b_out[i]},
            }
        blocks[i] = block
    params: dict[str, Any] = {
        "embed": {"embedding": w.W_E},
        "blocks": blocks,
        "unembed": {"kernel": w.W_U, "bias": w.b_U},
    }
    if spec.has_pos_embed:
        params["pos_embed"] = {"embedding": w.W_pos}
    if spec.norm != NormKind.NONE:
        params["ln_final"] = norm(w.ln_final_w, w.ln_final_b)
    return params


def model_to_weights(model: Transformer) -> Weights:
    return nnx_params_to_weights(model.spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def model_from_weights(weights: Weights) -> Transformer:
    """A reference model whose parameters are exactly ``weights``."""
    model = nnx.eval_shape(lambda: Transformer(weights.spec, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, weights_to_nnx_params(weights))
    nnx.update(model, state)
    return model
