"""Axis names used throughout jaxinduct.

Declared once here and used verbatim in jaxtyping annotations and, later, in
PartitionSpecs and mesh axes. Einsum strings need single letters; they use
s (seq), k (kv_seq), h (head), d (d_model), e (d_head), m (d_mlp), v (d_vocab).

=========  ==========================================================
ckpt       checkpoints of a trajectory, stacked on a leading axis
layer      transformer blocks
head       attention heads of one layer
batch      independent examples fed to the forward pass
seq        query positions of a sequence
kv_seq     key positions of a sequence (attention patterns are [seq, kv_seq])
d_model    residual stream width
d_head     width of one head's query/key/value space
d_mlp      hidden width of an MLP block
d_vocab    vocabulary size
n_ctx      maximum context length (rows of the positional embedding)
=========  ==========================================================
"""
