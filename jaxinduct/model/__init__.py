"""The model: canonical Weights and ModelSpec, the pure forward pass, weight processing, and the Flax NNX reference model."""
