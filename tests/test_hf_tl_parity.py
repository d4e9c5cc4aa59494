"""TL-compatible scores on an imported GPT-2 against TransformerLens 3.x on the same HF model.

A small GPT-2 is built offline, every parameter randomised (tests.test_hf_import.save_model)
and saved with save_pretrained. jaxinduct imports that directory with load_hf_weights;
TransformerLens gets the same transformers model, reloaded from the same directory, through
its own GPT-2 weight conversion (convert_gpt2_weights) and its default processing (fold_ln,
center_writing_weights, center_unembed, fold_value_biases). Composition scores, detect_head
scores and OV-circuit eigenvalue positivity are then compared within 1e-4.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxinduct.checkpoints.hf_weights import load_hf_weights
from jaxinduct.model.processing import process_weights
from jaxinduct.scores.batched import all_composition_scores, detect_head
from jaxinduct.scores.mechanistic import ov_copying
from tests.test_hf_import import gpt2_config, save_model

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

CONFIGS = {
    "gpt2-tied": dict(n_layer=3),
    "gpt2-untied": dict(n_layer=3, n_head=4, vocab_size=40, n_positions=24, tie_word_embeddings=False,
                        layer_norm_epsilon=1e-4),
}  # fmt: skip
ATOL = 1e-4


def tl_tensor(x):
    return np.asarray(x.detach().numpy())


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    """(imported jaxinduct Weights, TransformerLens HookedTransformer with default processing)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    model_dir = save_model(tmp_path_factory.mktemp(request.param), gpt2_config(**CONFIGS[request.param]), seed=7)
    weights = load_hf_weights(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
        normalization_type="LN", positional_embedding_type="standard", eps=c.layer_norm_epsilon,
        device="cpu", dtype=torch.float32,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():
        state_dict = {k: v.detach().clone() for k, v in convert_gpt2_weights(hf, cfg).items()}
    # GPT-2 has no unembedding bias: convert_gpt2_weights leaves it out and fill_missing_keys zeroes it.
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )  # fmt: skip
    model.eval()
    # Sanity: the TL model computes what transformers computes (up to centring of the logits).
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, c.vocab_size, size=(1, 12)))
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        tl_logits = model(tokens)
    np.testing.assert_allclose(
        torch.log_softmax(tl_logits, -1).numpy(), torch.log_softmax(hf_logits, -1).numpy(), atol=1e-4, rtol=0
    )
    return weights, model


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_match_transformer_lens(models, mode):
    weights, model = models
    theirs = tl_tensor(model.all_composition_scores(mode))
    ours = np.asarray(all_composition_scores(process_weights(weights), mode))
    spec = weights.spec
    assert ours.shape == theirs.shape == (spec.n_layers, spec.n_heads, spec.n_layers, spec.n_heads)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    assert np.abs(theirs).max() > 0.05  # not vacuous


@pytest.mark.parametrize("kind", ["previous_token_head", "duplicate_token_head", "induction_head"])
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude_bos,exclude_current_token", [(False, False), (True, True)])
def test_detect_head_matches_transformer_lens(models, kind, error_measure, exclude_bos, exclude_current_token):
    from transformer_lens.head_detector import detect_head as tl_detect_head

    weights, model = models
    d_vocab = weights.spec.d_vocab
    rng = np.random.default_rng(1)
    block = rng.choice(np.arange(1, d_vocab), size=7, replace=False)
    sequences = {
        "repeated": np.concatenate([[0], block, block, block[:3]]),
        "random": np.concatenate([[0], rng.integers(1, d_vocab, size=17)]),
    }
    # detect_head tokenises strings; map names to given tokens (as tests/test_transformer_lens_parity.py does).
    model.to_tokens = lambda seq, **_: torch.from_numpy(sequences[seq if isinstance(seq, str) else seq[0]][None, :])
    try:
        options = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, error_measure=error_measure)
        theirs = tl_detect_head(model, "repeated", kind, **options)
        ours = detect_head(weights, jnp.asarray(sequences["repeated"][None, :]), kind, **options)
        np.testing.assert_allclose(ours, tl_tensor(theirs), rtol=0, atol=ATOL)
        # Sequences of different lengths: TransformerLens averages per-sequence scores.
        theirs = tl_detect_head(model, ["repeated", "random"], kind, **options)
        ours = np.mean(
            [np.asarray(detect_head(weights, jnp.asarray(sequences[n][None, :]), kind, **options)) for n in sequences],
            axis=0,
        )
        np.testing.assert_allclose(ours, tl_tensor(theirs), rtol=0, atol=ATOL)
    finally:
        del model.to_tokens


def _positivity(eigs: np.ndarray) -> np.ndarray:
    return eigs.real.sum(-1) / np.abs(eigs).sum(-1)


def test_ov_eigenvalues_match_transformer_lens(models):
    weights, model = models
    processed = process_weights(weights)
    spec = weights.spec
    # TransformerLens's full OV circuit W_E W_V W_O W_U as a FactoredMatrix, per head.
    full_ov = model.W_E @ model.OV @ model.W_U
    their_eigs = full_ov.eigenvalues.detach().numpy().astype(np.complex128)  # [layer, head, d_head]
    assert their_eigs.shape == (spec.n_layers, spec.n_heads, spec.d_head)
    theirs = _positivity(their_eigs)
    ours = np.array(
        [
            [
                float(ov_copying(processed.W_E, processed.W_V[layer, head], processed.W_O[layer, head], processed.W_U))
                for head in range(spec.n_heads)
            ]
            for layer in range(spec.n_layers)
        ]
    )
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    assert np.ptp(theirs) > 0.05  # heads differ: not a constant
    # The spectra themselves agree (sorted by real then imaginary part), relative to their scale.
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            mine = np.linalg.eigvals(
                np.asarray(processed.W_O[layer, head] @ processed.W_U @ processed.W_E @ processed.W_V[layer, head],
                           dtype=np.float64)
            )  # fmt: skip
            scale = np.abs(their_eigs[layer, head]).max()
            np.testing.assert_allclose(
                np.sort_complex(mine) / scale, np.sort_complex(their_eigs[layer, head]) / scale, rtol=0, atol=ATOL
            )
