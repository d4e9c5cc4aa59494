"""Parity with TransformerLens 3.x on the same weights (test-only dependency).

TransformerLens is an independent implementation: its forward pass, its own weight
processing (load_and_process_state_dict), its composition scores and its head
detector are compared with jaxinduct's on random weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch

from jaxinduct.model.forward import forward
from jaxinduct.model.processing import process_weights
from jaxinduct.scores.batched import all_composition_scores, detect_head
from jaxinduct.model.weights import ModelSpec, init_random_weights
from tests.tl_bridge import hooked_transformer

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

ARCHITECTURES = {
    "gpt2-like": dict(positional="learned", norm="layernorm", d_mlp=32, activation="gelu_new"),
    "pythia-like": dict(positional="rotary", rotary_dim=4, norm="layernorm", d_mlp=32, parallel_attn_mlp=True, activation="gelu"),
    "attn-only": dict(positional="learned", norm="layernorm"),
    "rmsnorm-silu": dict(positional="rotary", norm="rmsnorm", d_mlp=32, activation="silu"),
    "shortformer": dict(positional="shortformer", norm="layernorm", d_mlp=32, activation="relu"),
}
# TransformerLens folds ln1 into W_Q/W_K even for shortformer models, which changes how
# positions are read there; jaxinduct keeps ln1 unfolded (see processing.py), so processed
# weights are compared on the other architectures only.
PROCESSED = [name for name in ARCHITECTURES if name != "shortformer"]


def spec_for(name):
    return ModelSpec(d_vocab=29, d_model=16, n_layers=3, n_heads=2, d_head=8, n_ctx=24, **ARCHITECTURES[name])


def tl_tensor(x):
    return np.asarray(x.detach().numpy())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_forward_matches_transformer_lens(name):
    weights = init_random_weights(init_spec := spec_for(name), 1)
    tokens = np.random.default_rng(0).integers(0, init_spec.d_vocab, size=(2, 20))
    model = hooked_transformer(weights, process=False)
    with torch.no_grad():
        theirs, cache = model.run_with_cache(torch.from_numpy(tokens))
    ours = jax.vmap(lambda t: forward(weights, t, return_patterns=True))(jnp.asarray(tokens))
    np.testing.assert_allclose(ours.logits, tl_tensor(theirs), rtol=1e-4, atol=1e-4)
    for layer in range(init_spec.n_layers):
        np.testing.assert_allclose(ours.patterns[:, layer], tl_tensor(cache["pattern", layer]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PROCESSED)
def test_processed_weights_match_transformer_lens(name):
    weights = init_random_weights(spec_for(name), 2)
    ours = process_weights(weights)
    model = hooked_transformer(weights, process=True)
    pairs = {"W_E": model.W_E, "W_U": model.W_U, "b_U": model.b_U, "W_Q": model.W_Q, "W_K": model.W_K,
             "W_V": model.W_V, "W_O": model.W_O, "b_Q": model.b_Q, "b_K": model.b_K, "b_V": model.b_V,
             "b_O": model.b_O}  # fmt: skip
    if ours.W_pos is not None:
        pairs["W_pos"] = model.W_pos
    if not ours.spec.attn_only:
        pairs.update(W_in=model.W_in, b_in=model.b_in, W_out=model.W_out, b_out=model.b_out)
    for field, theirs in pairs.items():
        np.testing.assert_allclose(getattr(ours, field), tl_tensor(theirs), rtol=1e-4, atol=1e-5, err_msg=field)


@pytest.mark.parametrize("name", PROCESSED)
@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_match_transformer_lens(name, mode):
    weights = init_random_weights(spec_for(name), 3)
    model = hooked_transformer(weights, process=True)
    theirs = tl_tensor(model.all_composition_scores(mode))
    ours = np.asarray(all_composition_scores(process_weights(weights), mode))
    assert ours.shape == theirs.shape == (3, 2, 3, 2)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["previous_token_head", "duplicate_token_head", "induction_head"])
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude_bos,exclude_current_token", [(False, False), (True, False), (False, True), (True, True)])
def test_detect_head_matches_transformer_lens(kind, error_measure, exclude_bos, exclude_current_token):
    from transformer_lens.head_detector import detect_head as tl_detect_head

    spec = spec_for("gpt2-like")
    weights = init_random_weights(spec, 4, scale=2.0)
    rng = np.random.default_rng(1)
    block = rng.choice(np.arange(1, spec.d_vocab), size=7, replace=False)
    sequences = {
        "repeated": np.concatenate([[0], block, block, block[:3]]),
        "random": np.concatenate([[0], rng.integers(1, spec.d_vocab, size=17)]),
    }
    model = hooked_transformer(weights, process=False)
    # detect_head tokenises strings; we test the scoring on given tokens, so map names to tokens.
    # (It tokenises a list as a whole first, then each entry; only the entries' tokens are used.)
    model.to_tokens = lambda seq, **_: torch.from_numpy(sequences[seq if isinstance(seq, str) else seq[0]][None, :])
    options = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, error_measure=error_measure)
    for names in (["repeated"], ["repeated", "random"]):
        theirs = tl_detect_head(model, names if len(names) > 1 else names[0], kind, **options)
        if len(names) == 1:
            ours = detect_head(weights, jnp.asarray(sequences[names[0]][None, :]), kind, **options)
            np.testing.assert_allclose(ours, tl_tensor(theirs), rtol=1e-4, atol=1e-4)
        else:
            # Sequences of different lengths: TransformerLens averages per-sequence scores.
            ours = np.mean([np.asarray(detect_head(weights, jnp.asarray(sequences[n][None, :]), kind, **options)) for n in names], axis=0)
            np.testing.assert_allclose(ours, tl_tensor(theirs), rtol=1e-4, atol=1e-4)
