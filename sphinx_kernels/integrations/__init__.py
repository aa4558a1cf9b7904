"""The kernels inside other libraries' models, through those libraries' own extension points.

    sphinx_kernels.integrations.transformers   Hugging Face transformers (>= 5): the
        ``attn_implementation="sphinx_varlen"`` attention for padding-free (packed) batches, and
        Mixtral's sparse-MoE blocks served by ``sphinx_kernels.nn.MoEMLP``.

Nothing here is imported by ``sphinx_kernels`` itself, and importing an integration module does not
import the library it integrates with: that happens when one of its functions is called, so the
kernel package never depends on it.
"""
