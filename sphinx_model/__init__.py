"""SPHINX-X on sphinx_kernels: frozen timm encoders with any-resolution tiles and skip tokens, the fused
projector, Llama / InternLM2 / Mixtral decoders on packed variable-length batches, checkpoints, the
one-stage trainer and generation.

    import sphinx_model as sm
    cfg = sm.preset("tiny")            # a SphinxConfig; sm.PRESETS lists the names
    llm = sm.load_hf_llm(path)         # the decoder (sm.LLM) from a Hugging Face directory
    logits = llm(input_ids, cu_seqlens)  # packed int64 [T], int32 [B + 1] -> [T, vocab]
    model = sm.SphinxX(cfg)            # the multimodal model; model(batch) on a sm.PackedBatch
    tiled = sm.tile_image(image, cfg.vision)  # a PIL image's views (data loader side)
"""
from sphinx_model.accessory_sphinx import load_accessory_sphinx
from sphinx_model.batch import PackedBatch
from sphinx_model.checkpoints import load_hf_llm, save_hf_llm
from sphinx_model.config import (LLMConfig, PRESETS, ProjectorConfig, SphinxConfig, VisionConfig,
                                 preset)
from sphinx_model.llm import LLM, KVCache, MoELosses, SimpleKVCache
from sphinx_model.sphinx import SphinxOutput, SphinxX
from sphinx_model.tiling import TiledImage, tile_geometry, tile_image
from sphinx_model.vision import VisionTower

__all__ = ["PRESETS", "preset", "SphinxConfig", "VisionConfig", "ProjectorConfig", "LLMConfig",
           "PackedBatch", "LLM", "MoELosses", "KVCache", "SimpleKVCache", "load_hf_llm",
           "save_hf_llm", "SphinxX", "SphinxOutput", "VisionTower", "TiledImage", "tile_image",
           "tile_geometry", "load_accessory_sphinx"]
