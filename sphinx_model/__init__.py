"""SPHINX-X on sphinx_kernels: frozen timm encoders with any-resolution tiles and skip tokens, the
fused projector, Llama / InternLM2 / Mixtral decoders on packed variable-length batches,
checkpoints, the one-stage trainer and generation.

    import sphinx_model as sm
    cfg = sm.preset("tiny")            # a SphinxConfig; sm.PRESETS lists the names
    tok = sm.load_tokenizer(path)      # SentencePiece tokenizer.model or tokenizer.json
    data = sm.SphinxData.from_config(sm.DataConfig(path="mix.yaml"), cfg, tok)
    for step in data.loader(steps=100): ...   # StepBatch: micro-batches, stats, data position
"""
from sphinx_model.batch import PackedBatch
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
from sphinx_model.demo import build_demo
from sphinx_model.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

__all__ = ["PRESETS", "SKIP_CAUSES", "SPHINX_TEMPLATE", "ChatTemplate", "Conversation",
           "DataConfig", "DataPosition", "LLMConfig", "Mixture", "PackedBatch", "ProjectorConfig",
           "SphinxConfig", "SphinxData", "StepBatch", "StepStats", "StreamDecoder", "Tokenizer",
           "Turn", "VisionConfig", "build_demo", "encode_conversation", "encode_prompt",
           "load_mixture", "load_tokenizer", "pack_samples", "parse_conversation", "preset"]
