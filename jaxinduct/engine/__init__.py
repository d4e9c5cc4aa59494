"""The scan engine: a trajectory's checkpoints restored in batches, scored on the mesh, written to the store (scan, loader, watch)."""
