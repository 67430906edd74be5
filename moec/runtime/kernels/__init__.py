"""Hand-written Triton kernels (the grouped GEMM), the per-architecture launch
table every kernel reads, and the loader of generated kernel modules."""
