"""Scores (docs/scores.md): one pure function of one checkpoint per public name, listed in
`registry`, defined in the module of its family (`empirical`, `mechanistic`, `losses`,
`ablation`, `verdicts`) from kernels of one head or head pair, and batched in `batched`."""
