"""Ahead-of-time launchability of the Triton kernels, checked without a GPU.

``python -m sphinx_kernels.aot`` records every Triton launch the public ops make at SPHINX-X sizes
(:mod:`~sphinx_kernels.aot.workloads`) on fake CUDA tensors (:mod:`~sphinx_kernels.aot.record`),
compiles each distinct specialisation for sm_90 and sm_80 as Triton's launcher would
(:mod:`~sphinx_kernels.aot.compile`), compiles the CUDA sources with nvcc
(:mod:`~sphinx_kernels.aot.cuda_sources`), judges everything by :mod:`~sphinx_kernels.aot.policy`
(shared memory, spills, tensor cores, grid; the exemptions) and writes the tables of
``docs/launchability.md`` (:mod:`~sphinx_kernels.aot.report`). Run it with ``TRITON_INTERPRET``
unset: it needs Triton's compiler, not its interpreter.
"""
