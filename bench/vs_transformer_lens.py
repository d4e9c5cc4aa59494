"""jaxinduct against a TransformerLens loop, side by side in one run, on the same checkpoints.

Writes N Hugging Face GPT-NeoX revisions of random weights at a Pythia shape (DESIGN.md
"Scale"; default Pythia-70M: 6 layers x 8 heads, d_model 512, vocabulary 50304) into a
directory of ``stepN`` revisions, then times, per checkpoint:

- what a TransformerLens 3.x user writes: load the HF model, convert and process it
  (fold_ln, centring, fold_value_biases), Q/K/V composition of every head pair, the
  eigenvalues of all heads' full OV circuits, and ``run_with_cache`` attention patterns on
  the repeated-token probe ([BOS] + 25 x 4 random tokens, ``--examples`` sequences);
- ``jaxinduct scan`` of the same revisions with (a) TransformerLens's work
  (q/k/v_composition, ov_copying, prefix_matching), (b) the weights-only scores, (c) every
  score (the default), each into a fresh store, one checkpoint per batch so that the
  compile is reported apart from the steady state; and what each selection's compiled
  program does per checkpoint (matmul FLOPs, counted from the program: `jaxinduct.engine.cost`)
  against this machine's measured float32 matmul peak.

Usage: python bench/vs_transformer_lens.py [--shape pythia-70m] [--checkpoints 8]
       [--examples 64] [--dir DIR (keep the revisions)]
Needs the test extras (torch, transformers, transformer-lens).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

import jax  # noqa: E402

from jaxinduct.engine.bench import matmul_peak, pythia_config  # noqa: E402
from jaxinduct.engine.cost import ProgramCost, compiled_cost  # noqa: E402
from jaxinduct.engine.scan import ScanConfig, scan  # noqa: E402
from jaxinduct.model.weights import init_random_weights, stack_weights  # noqa: E402
from jaxinduct.scores.batched import compile_score_all  # noqa: E402
from jaxinduct.scores.probes import ProbeConfig, default_token_pool, make_probes, repeated_random_tokens  # noqa: E402
from jaxinduct.checkpoints.hf_weights import read_hf_config, spec_from_hf_config  # noqa: E402
from jaxinduct.model.weights import ModelSpec  # noqa: E402

SHAPES = ("pythia-70m", "pythia-160m", "pythia-410m")
SELECTIONS = {
    "(a) TransformerLens's work": ("q_composition", "k_composition", "v_composition", "ov_copying", "prefix_matching"),
    "(b) weights-only scores": ("q_composition", "k_composition", "v_composition", "ov_copying"),
    "(c) every score (default scan)": None,
}


def write_revisions(directory: Path, shape: str, n: int) -> list[Path]:
    """N revisions step0, step1000, ... of a randomly initialised GPT-NeoX (HF's own init)."""
    fields = {k: v for k, v in pythia_config(shape).items() if k not in ("model_type", "architectures")}
    config = GPTNeoXConfig(**fields)
    revisions = []
    for i in range(n):
        path = directory / f"step{1000 * i}"
        if not (path / "config.json").is_file():
            torch.manual_seed(i)
            GPTNeoXForCausalLM(config).save_pretrained(path, safe_serialization=True)
        revisions.append(path)
    return revisions


@dataclasses.dataclass
class Parts:
    load: float = 0.0
    process: float = 0.0
    composition: float = 0.0
    ov_eigenvalues: float = 0.0
    patterns: float = 0.0

    @property
    def total(self) -> float:
        return self.load + self.process + self.composition + self.ov_eigenvalues + self.patterns


def transformer_lens_loop(revisions: list[Path], spec: ModelSpec, tokens: np.ndarray) -> Parts:
    """TransformerLens's loop over the revisions; seconds per part, summed."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

    parts = Parts()
    probe = torch.from_numpy(tokens.astype(np.int64))
    for path in revisions:
        start = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        parts.load += time.perf_counter() - start

        start = time.perf_counter()
        # The architecture as jaxinduct reads it from config.json (transformers 5 renamed the rotary keys).
        cfg = HookedTransformerConfig(
            n_layers=spec.n_layers, d_model=spec.d_model, n_heads=spec.n_heads, d_head=spec.d_head, d_mlp=spec.d_mlp,
            d_vocab=spec.d_vocab, n_ctx=spec.n_ctx, act_fn=spec.activation.value, normalization_type="LN",
            positional_embedding_type="rotary", rotary_dim=spec.rotary_dim, rotary_base=int(spec.rotary_base),
            parallel_attn_mlp=True, eps=spec.norm_eps, original_architecture="GPTNeoXForCausalLM", device="cpu",
            dtype=torch.float32,
        )  # fmt: skip
        model = HookedTransformer(cfg)
        with torch.no_grad():
            state_dict = {k: v.detach().clone() for k, v in convert_neox_weights(hf, cfg).items()}
        model.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True,
                                          fold_value_biases=True)  # fmt: skip
        model.eval()
        parts.process += time.perf_counter() - start

        with torch.no_grad():
            start = time.perf_counter()
            for mode in ("Q", "K", "V"):
                model.all_composition_scores(mode)
            parts.composition += time.perf_counter() - start

            start = time.perf_counter()
            eigenvalues = (model.W_E @ model.OV @ model.W_U).eigenvalues  # [layer, head, d_head]
            (eigenvalues.real.sum(-1) / eigenvalues.abs().sum(-1)).numpy()
            parts.ov_eigenvalues += time.perf_counter() - start

            start = time.perf_counter()
            _, cache = model.run_with_cache(probe, names_filter=lambda name: name.endswith("hook_pattern"))
            _prefix_matching(cache, probe, cfg.n_layers)
            parts.patterns += time.perf_counter() - start
    return parts


def _prefix_matching(cache, tokens: torch.Tensor, n_layers: int) -> np.ndarray:
    """Attention from each repeated token to the successor of its earlier copies, per head."""
    same = tokens[:, :, None] == tokens[:, None, :]
    earlier = torch.tril(torch.ones(same.shape[-2:], dtype=torch.bool), diagonal=-1)
    match = same & earlier
    successor = torch.nn.functional.pad(match[..., :-1], (1, 0))
    is_query = match.any(-1)
    scores = []
    for layer in range(n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, seq, kv_seq]
        per_query = (pattern * successor[:, None]).sum(-1)
        scores.append(((per_query * is_query[:, None]).sum(-1) / is_query.sum(-1).clamp(min=1)[:, None]).mean(0))
    return torch.stack(scores).numpy()


def jaxinduct_scans(directory: Path, work: Path, probe: ProbeConfig, n: int) -> dict[str, tuple[float, float]]:
    """Per selection: (compile seconds, steady seconds per checkpoint: batches after the first)."""
    out = {}
    for label, scores in SELECTIONS.items():
        store = work / f"{label[1]}.sqlite"
        summary = scan(ScanConfig(source=str(directory), store=str(store), scores=scores, batch=1, probe=probe,
                                  progress=False))  # fmt: skip
        assert summary.scanned == n and summary.failed == 0, summary.describe()
        steady = summary.batch_seconds[1:]
        out[label] = (summary.compile_seconds, sum(steady) / len(steady))
    return out


def program_costs(spec: ModelSpec, probe: ProbeConfig) -> dict[str, ProgramCost]:
    """Per selection: what one checkpoint's compiled scan program does (FLOPs, bytes, eigenproblems)."""
    weights = stack_weights([init_random_weights(spec, 0)])
    probes = make_probes(spec, probe)
    out = {}
    for label, scores in SELECTIONS.items():
        program = compile_score_all(weights, probes, checkpoints_per_pass=1, scores=scores)
        out[label] = compiled_cost(program.compiled)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="pythia-70m")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64, help="sequences of the repeated-token probe")
    parser.add_argument("--dir", help="keep the revisions here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / "revisions"
        start = time.perf_counter()
        revisions = write_revisions(directory, args.shape, args.checkpoints)
        print(f"{args.checkpoints} random {args.shape} revisions in {directory} ({time.perf_counter() - start:.0f} s)")
        spec = spec_from_hf_config(read_hf_config(revisions[0]))
        probe = ProbeConfig(n_examples=args.examples)
        tokens = repeated_random_tokens(default_token_pool(spec), n_examples=args.examples, block_len=probe.block_len,
                                        n_repeats=probe.n_repeats, bos_token_id=spec.bos_token_id)  # fmt: skip
        torch.set_num_threads(os.cpu_count() or 1)
        tl = transformer_lens_loop(revisions, spec, tokens)
        ours = jaxinduct_scans(directory, Path(tmp), probe, args.checkpoints)
        costs = program_costs(spec, probe)
        peak = matmul_peak(jax.devices()[0])
    n = args.checkpoints
    print(f"\nper checkpoint, {n} checkpoints, probe {args.examples} x ([BOS] + {probe.block_len} x {probe.n_repeats}), "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    print(f"TransformerLens loop: {tl.total / n:.2f} s = load {tl.load / n:.2f} + process {tl.process / n:.2f} + "
          f"composition {tl.composition / n:.2f} + OV eigenvalues {tl.ov_eigenvalues / n:.2f} + patterns {tl.patterns / n:.2f}")  # fmt: skip
    tl_weights = (tl.load + tl.process + tl.composition + tl.ov_eigenvalues) / n
    references = {"(a)": tl.total / n, "(b)": tl_weights, "(c)": tl.total / n}
    print(f"{'jaxinduct scan':32s} {'steady s/ckpt':>13s} {'compile s':>9s} {'vs TransformerLens':>18s} "
          f"{'GFLOP/ckpt':>10s} {'of peak':>8s} {'eig/ckpt':>8s}")  # fmt: skip
    for label, (compile_seconds, steady) in ours.items():
        ratio = references[label[:3]] / steady if steady > 0 else float("nan")
        cost = costs[label]
        print(f"{label:32s} {steady:13.2f} {compile_seconds:9.1f} {ratio:17.2f}x {cost.flops / 1e9:10.1f} "
              f"{cost.flops / steady / peak:8.0%} {cost.eigenproblems:8.0f}")  # fmt: skip
    print("(b) is compared with TransformerLens's load + process + composition + OV eigenvalues; (a), (c) with its whole loop.")
    print(f"GFLOP: matrix products of the compiled scan program per checkpoint (jaxinduct.engine.cost); of peak: "
          f"against a {peak / 1e9:.0f} GFLOP/s float32 matmul measured here. Steady s/ckpt includes loading.")


if __name__ == "__main__":
    main()
