"""The SAE compute kernels, kept apart from the architectures that use them.

- `sparse`: sparse encode/decode autograd functions for top-k style SAEs, their dense references,
  `rowwise_topk` and `serial` (short ops on one thread);
- `mp`: matching-pursuit atom selection, differentiable coefficients and the eager oracle;
- `native`: optional C kernels (`native.c`), compiled on first use; torch fallbacks otherwise;
- `native_filter`: the exact float32 top-k encoder on CPUs with bf16 instructions (`native_filter.c`): a bf16
  product nominates candidates under a rigorous error bound, float32 recomputes them (`SAEKIT_BF16_FILTER=0`: off);
- `triton_sparse`, `triton_topk`: optional CUDA kernels (Triton): the sparse half of a top-k step and the
  fused top-k encoder (product + selection, no dense `[B, d_sae]`); the torch path otherwise.
"""
