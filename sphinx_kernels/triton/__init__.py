"""Triton kernels, one module per op (``sphinx_kernels.triton.<op>``, its launchers named as the
backend table of ``sphinx_kernels.ops.<op>`` calls them) and ``common`` (what they share). Imported
on first use, after ``TRITON_INTERPRET`` is set: never by ``import sphinx_kernels``."""
