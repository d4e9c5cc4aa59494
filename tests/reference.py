"""An independent dense reference forward pass for tests: float64 numpy, one head at a time.

Written from the definitions (TransformerLens conventions), sharing no code with
jaxinduct.model.forward or jaxinduct.model.
"""

from __future__ import annotations

import math

import numpy as np

from jaxinduct.model.weights import Weights


def _np(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _gelu_exact(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def _norm(kind, eps, x, w, b):
    out = np.empty_like(x)
    for i, row in enumerate(x):  # one position at a time
        if kind == "none":
            out[i] = row
            continue
        if kind == "layernorm":
            row = row - row.sum() / len(row)
        rms = math.sqrt(float(np.dot(row, row)) / len(row) + eps)
        out[i] = row / rms * w + (0.0 if b is None else b)
    return out


def _rotate_pair(vec, pos, rotary_dim, base):
    """Rotate dims (i, i + rotary_dim/2) of one vector by angle pos * base^(-2i/rotary_dim)."""
    vec = vec.copy()
    half = rotary_dim // 2
    for i in range(half):
        theta = pos * base ** (-2.0 * i / rotary_dim)
        a, b = vec[i], vec[i + half]
        vec[i] = a * math.cos(theta) - b * math.sin(theta)
        vec[i + half] = a * math.sin(theta) + b * math.cos(theta)
    return vec


def reference_forward(weights: Weights, tokens, *, head_mask=None, frozen_patterns=None, internals=None):
    """Returns (logits [seq, d_vocab], patterns [layer, head, seq, seq]) in float64.

    internals: a dict to fill with "head_outputs" [layer, head, seq, d_model] (each head's
    write, without b_O) and "final_residual" [seq, d_model] (the input of the final norm).
    """
    spec = weights.spec
    tokens = np.asarray(tokens)
    seq = len(tokens)
    w = {name: _np(arr) for name, arr in weights.arrays().items()}
    pos = spec.positional.value
    norm = spec.norm.value
    x = w["W_E"][tokens].copy()
    if pos == "learned":
        x += w["W_pos"][:seq]
    patterns = np.zeros((spec.n_layers, spec.n_heads, seq, seq))
    head_outputs = np.zeros((spec.n_layers, spec.n_heads, seq, spec.d_model))
    for layer in range(spec.n_layers):

        def get(name):
            return None if name not in w else w[name][layer]

        normed = _norm(norm, spec.norm_eps, x, get("ln1_w"), get("ln1_b"))
        qk_in = normed + w["W_pos"][:seq] if pos == "shortformer" else normed
        attn_out = np.tile(get("b_O"), (seq, 1))
        for head in range(spec.n_heads):
            q = qk_in @ w["W_Q"][layer, head] + w["b_Q"][layer, head]
            k = qk_in @ w["W_K"][layer, head] + w["b_K"][layer, head]
            v = normed @ w["W_V"][layer, head] + w["b_V"][layer, head]
            if pos == "rotary":
                q = np.stack([_rotate_pair(q[t], t, spec.rotary_dim, spec.rotary_base) for t in range(seq)])
                k = np.stack([_rotate_pair(k[t], t, spec.rotary_dim, spec.rotary_base) for t in range(seq)])
            pattern = np.zeros((seq, seq))
            for t in range(seq):
                logits = np.array([q[t] @ k[s] for s in range(t + 1)]) / math.sqrt(spec.d_head)
                e = np.exp(logits - logits.max())
                pattern[t, : t + 1] = e / e.sum()
            if frozen_patterns is not None:
                pattern = np.asarray(frozen_patterns, dtype=np.float64)[layer, head]
            patterns[layer, head] = pattern
            scale = 1.0 if head_mask is None else float(np.asarray(head_mask)[layer, head])
            head_outputs[layer, head] = scale * (pattern @ v) @ w["W_O"][layer, head]
            attn_out += head_outputs[layer, head]
        if spec.d_mlp is None:
            x = x + attn_out
            continue
        act = ACTIVATIONS[spec.activation.value]

        def mlp(inp):
            return act(inp @ get("W_in") + get("b_in")) @ get("W_out") + get("b_out")

        if spec.parallel_attn_mlp:
            x = x + attn_out + mlp(_norm(norm, spec.norm_eps, x, get("ln2_w"), get("ln2_b")))
        else:
            x = x + attn_out
            x = x + mlp(_norm(norm, spec.norm_eps, x, get("ln2_w"), get("ln2_b")))
    if internals is not None:
        internals.update(head_outputs=head_outputs, final_residual=x.copy())
    x = _norm(norm, spec.norm_eps, x, w.get("ln_final_w"), w.get("ln_final_b"))
    return x @ w["W_U"] + w["b_U"], patterns
