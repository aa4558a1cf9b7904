"""SPHINX-X on sphinx_kernels: frozen timm encoders with any-resolution tiles and skip tokens, the fused
projector, Llama / InternLM2 / Mixtral decoders on packed variable-length batches, checkpoints, the
one-stage trainer and generation.

    import sphinx_model as sm
    cfg = sm.preset("tiny")            # a SphinxConfig; sm.PRESETS lists the names
"""
from sphinx_model.batch import PackedBatch
from sphinx_model.config import (LLMConfig, PRESETS, ProjectorConfig, SphinxConfig, VisionConfig,
                                 preset)

__all__ = ["PRESETS", "preset", "SphinxConfig", "VisionConfig", "ProjectorConfig", "LLMConfig",
           "PackedBatch"]
