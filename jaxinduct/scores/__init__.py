"""Score kernels (SCORES.md): one pure function per score, batched in `batched`."""
