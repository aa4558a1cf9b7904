"""SPHINX-X on sphinx_kernels: frozen timm encoders with any-resolution tiles and skip tokens, the fused
projector, Llama / InternLM2 / Mixtral decoders on packed variable-length batches, checkpoints, the
one-stage trainer and generation.

    import sphinx_model as sm
    cfg = sm.preset("tiny")            # a SphinxConfig; sm.PRESETS lists the names
    llm = sm.load_hf_llm(path)         # the decoder (sm.LLM) from a Hugging Face directory
    logits = llm(input_ids, cu_seqlens)  # packed int64 [T], int32 [B + 1] -> [T, vocab]
    model = sm.SphinxX(cfg)            # the multimodal model; model(batch) on a sm.PackedBatch
    tiled = sm.tile_image(image, cfg.vision)  # a PIL image's views (data loader side)
    tok = sm.load_tokenizer(path)      # SentencePiece tokenizer.model or tokenizer.json
    data = sm.SphinxData.from_config(sm.DataConfig(path="mix.yaml"), cfg, tok)
    for step in data.loader(steps=100): ...   # StepBatch: micro-batches, stats, data position
    new = sm.generate(llm, [[1, 415, 2936]], max_new_tokens=32)  # new token ids per prompt
"""
from sphinx_model.accessory_sphinx import load_accessory_sphinx
from sphinx_model.batch import PackedBatch
from sphinx_model.checkpoints import load_hf_llm, save_hf_llm
from sphinx_model.config import (
    PRESETS,
    LLMConfig,
    ProjectorConfig,
    SphinxConfig,
    VisionConfig,
    preset,
)
from sphinx_model.conversation import (
    SPHINX_TEMPLATE,
    ChatTemplate,
    Conversation,
    Turn,
    encode_conversation,
    encode_prompt,
    parse_conversation,
)
from sphinx_model.data import (
    DataConfig,
    DataPosition,
    SphinxData,
    StepBatch,
    StepStats,
    pack_samples,
)
from sphinx_model.datasets import SKIP_CAUSES, Mixture, load_mixture
from sphinx_model.generate import ChatPrompt, generate, stream_generate
from sphinx_model.llm import LLM, KVCache, MoELosses, SimpleKVCache
from sphinx_model.sphinx import SphinxOutput, SphinxX
from sphinx_model.tiling import TiledImage, tile_geometry, tile_image
from sphinx_model.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from sphinx_model.vision import VisionTower

__all__ = ["LLM", "PRESETS", "SKIP_CAUSES", "SPHINX_TEMPLATE", "ChatPrompt", "ChatTemplate",
           "Conversation", "DataConfig", "DataPosition", "KVCache", "LLMConfig", "Mixture",
           "MoELosses", "PackedBatch", "ProjectorConfig", "SimpleKVCache", "SphinxConfig",
           "SphinxData", "SphinxOutput", "SphinxX", "StepBatch", "StepStats", "StreamDecoder",
           "TiledImage", "Tokenizer", "Turn", "VisionConfig", "VisionTower",
           "encode_conversation", "encode_prompt", "generate", "load_accessory_sphinx",
           "load_hf_llm", "load_mixture", "load_tokenizer", "pack_samples", "parse_conversation",
           "preset", "save_hf_llm", "stream_generate", "tile_geometry", "tile_image"]
