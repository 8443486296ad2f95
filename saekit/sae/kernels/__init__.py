"""The SAE compute kernels, kept apart from the architectures that use them.

- `sparse`: sparse encode/decode autograd functions for top-k style SAEs, their dense references,
  `rowwise_topk` and `serial` (short ops on one thread);
- `mp`: matching-pursuit atom selection, differentiable coefficients and the eager oracle;
- `native`: optional C kernels (`native.c`), compiled on first use; torch fallbacks otherwise;
- `triton_sparse`, `triton_topk`: optional CUDA kernels (Triton): the sparse half of a top-k step and the
  fused top-k encoder (product + selection, no dense `[B, d_sae]`); the torch path otherwise.
"""
