"""Generation over packed prompts: one prefill of the whole batch, then one decode step per token.

    import sphinx_model as sm
    new = sm.generate(llm, [[1, 415, 2936], [1, 22557]], max_new_tokens=32)   # an LLM: token ids
    new = sm.generate(model, [sm.ChatPrompt(ids, [image])], eos_token_id=tok.eos_id)  # a SphinxX

The prefill runs every prompt at once as one packed batch (no padding; for a
:class:`~sphinx_model.SphinxX` its images go through the vision tower here, once, by
``SphinxX.embed``) and fills a :class:`~sphinx_model.kv_cache.PreallocatedKVCache`. Each decode step
then runs one query row per live sequence against its cached keys: ``varlen_attention`` with the
cache's ``cu_seqlens_k`` (queries aligned to the end of their keys), through the same layer code as
training. A sequence that stops (EOS, a stop string, ``max_new_tokens``) leaves the batch: later
steps compute nothing for it. ``use_cache=False`` recomputes every live sequence's whole prefix at
each step instead (the prompts' input embeddings, images included, are still computed once): the
reference the cached path is tested against.

:func:`stream_generate` yields the tokens as they are chosen (the chat CLI prints them);
:func:`generate` collects them.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from sphinx_model.data import image_block_rows, pack_samples
from sphinx_model.kv_cache import PreallocatedKVCache
from sphinx_model.llm import LLM
from sphinx_model.sampling import Sampler
from sphinx_model.sphinx import SphinxX
from sphinx_model.tiling import TiledImage, tile_image
from sphinx_model.tokenizer import Tokenizer

__all__ = ["ChatPrompt", "generate", "stream_generate"]


@dataclass
class ChatPrompt:
    """One prompt of a :class:`~sphinx_model.SphinxX`: a chat sample and its images.

    Attributes:
        ids: token ids, BOS first, e.g. ``sm.encode_prompt(tokenizer, turns)`` (the dialogue so far,
            ending where the assistant answers).
        images: the sample's images, Pillow images (tiled here with ``tile_image``) or already
            tiled :class:`~sphinx_model.TiledImage` s; their blocks go right after BOS, as in
            training. Empty: a text-only prompt.
    """

    ids: Sequence[int]
    images: Sequence[Image.Image | TiledImage] = field(default_factory=list)


def generate(llm_or_model: LLM | SphinxX, prompts: Sequence, max_new_tokens: int = 64, *,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, use_cache: bool = True,
             seed: int | None = None, stop_strings: Sequence[str] = (),
             tokenizer: Tokenizer | None = None) -> list[list[int]]:
    """Generates up to ``max_new_tokens`` tokens after each prompt; returns the new tokens only, a
    list per prompt.

    Args:
        llm_or_model: an :class:`~sphinx_model.LLM` or a :class:`~sphinx_model.SphinxX` (in the
            dtype and on the device to run in).
        prompts: for an LLM, lists of token ids (or 1-D integer tensors), each non-empty; for a
            SphinxX, :class:`ChatPrompt` s (a plain id list is a text-only prompt).
        max_new_tokens: at most this many tokens per prompt (>= 0); a prompt plus them must fit
            ``max_position_embeddings`` (a SphinxX prompt's rows count its image blocks).
        do_sample, temperature, top_p, seed: greedy when ``do_sample`` is False; else sampling at
            ``temperature`` from the top-p nucleus, reproducible for a given ``seed`` (see
            :class:`~sphinx_model.sampling.Sampler`).
        eos_token_id: a token id (or several) that ends a sequence (it is included in its output);
            None: no EOS stop.
        use_cache: decode against the KV cache (else recompute each prefix every step).
        stop_strings: a sequence also ends once its generated text contains one of these (its
            tokens are kept); needs ``tokenizer``.

    Returns:
        ``len(prompts)`` lists of token ids, each ending with an EOS or stop string's last token
        where one ended it.
    """
    stream = stream_generate(
        llm_or_model, prompts, max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_p=top_p, eos_token_id=eos_token_id, use_cache=use_cache, seed=seed,
        stop_strings=stop_strings, tokenizer=tokenizer)  # checks the arguments
    out: list[list[int]] = [[] for _ in prompts]
    for index, token in stream:
        out[index].append(token)
    return out


def stream_generate(llm_or_model: LLM | SphinxX, prompts: Sequence, max_new_tokens: int = 64, *,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    eos_token_id: int | Sequence[int] | None = None, use_cache: bool = True,
                    seed: int | None = None, stop_strings: Sequence[str] = (),
                    tokenizer: Tokenizer | None = None) -> Iterator[tuple[int, int]]:
    """:func:`generate` as an iterator of ``(prompt index, token id)``, each token as soon as it is
    chosen (per step, the live prompts in order). Arguments are validated before anything runs."""
    model, llm = _unwrap(llm_or_model)
    prompts = _check_prompts(prompts, model, llm)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    sampler = Sampler(do_sample, temperature, top_p, seed)
    eos = _eos_ids(eos_token_id, llm.config.vocab_size)
    stop = _StopStrings(stop_strings, tokenizer)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    limit = llm.config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        rows = len(prompt.ids)
        if prompt.images:  # a SphinxX's: each image block's rows too
            per_view = model.config.vision.tokens_per_view
            rows += sum(image_block_rows(t.skipped, per_view) for t in prompt.images)
        if rows + max_new_tokens > limit:
            raise ValueError(f"prompts[{i}] ({rows} rows) plus max_new_tokens ({max_new_tokens}) "
                             f"exceed the model's max_position_embeddings ({limit})")
    return _generate(model, llm, prompts, max_new_tokens, sampler, eos, stop, use_cache)


def _generate(model, llm, prompts, max_new_tokens, sampler, eos, stop, use_cache):
    if max_new_tokens == 0:
        return
    device = llm.embed_tokens.weight.device
    # no_grad, not inference_mode: inference tensors have no version counter, and the kernels' value
    # checks remember a tensor that passed (a step's cu_seqlens, positions, routing plans) only by
    # its version; under inference_mode every layer would read them back again.
    with torch.no_grad():
        decoder_type = _CachedDecoder if use_cache else _RecomputingDecoder
        decoder = decoder_type(model, llm, prompts, max_new_tokens)
        logits = decoder.prefill()
        generator = sampler.generator(device)
    live = list(range(len(prompts)))
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        with torch.no_grad():
            tokens = sampler(logits, generator)
        keep = []
        for j, (index, token) in enumerate(zip(live, tokens.tolist())):
            generated[index].append(token)
            yield index, token
            if token not in eos and not stop.hit(generated[index]):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            return
        with torch.no_grad():
            if len(keep) < len(live):
                live = [live[j] for j in keep]
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            logits = decoder.step(live, tokens)


class _CachedDecoder:
    """Prefill into a :class:`PreallocatedKVCache`, then one row per live sequence per step."""

    def __init__(self, model, llm: LLM, prompts, max_new_tokens: int):
        self.llm = llm
        self.embeds, self.rows, prefix = _prompt_embeddings(model, llm, prompts)
        weight = llm.embed_tokens.weight
        self.cache = PreallocatedKVCache(llm.config, [n + max_new_tokens for n in self.rows],
                                         weight.dtype, weight.device, prefix)

    def prefill(self) -> torch.Tensor:
        cache, rows = self.cache, self.rows
        cu = cache.begin_forward(rows)
        hidden, _ = self.llm.hidden_states(self.embeds, cu, max_seqlen=max(rows),
                                           prefix_lens=cache.prefix_lens(), kv_cache=cache)
        self.embeds = None
        last = torch.tensor(rows).cumsum(0).sub_(1).to(hidden.device)
        return self.llm.logits(hidden[last])

    def step(self, live: list[int], tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if live != cache.live:
            cache.select(live)
        cu = cache.begin_forward()
        hidden, _ = self.llm.hidden_states(self.llm.embed_tokens(tokens), cu, max_seqlen=1,
                                           prefix_lens=cache.prefix_lens(), kv_cache=cache)
        return self.llm.logits(hidden)


class _RecomputingDecoder:
    """No cache: each step runs every live sequence's prompt embeddings and generated tokens."""

    def __init__(self, model, llm: LLM, prompts, max_new_tokens: int):
        self.llm = llm
        embeds, self.rows, self.prefix = _prompt_embeddings(model, llm, prompts)
        self.prompt_embeds = list(embeds.split(self.rows))
        self.generated = [torch.empty(0, dtype=torch.int64, device=embeds.device)
                          for _ in prompts]

    def prefill(self) -> torch.Tensor:
        return self._forward(list(range(len(self.rows))))

    def step(self, live: list[int], tokens: torch.Tensor) -> torch.Tensor:
        for index, token in zip(live, tokens):
            self.generated[index] = torch.cat([self.generated[index], token[None]])
        return self._forward(live)

    def _forward(self, live: list[int]) -> torch.Tensor:
        llm = self.llm
        pieces, lengths = [], []
        for i in live:
            pieces += [self.prompt_embeds[i], llm.embed_tokens(self.generated[i])]
            lengths.append(self.rows[i] + self.generated[i].shape[0])
        bounds = torch.tensor([0] + lengths).cumsum(0)
        cu = bounds.to(torch.int32).to(pieces[0].device)
        prefix = None if self.prefix is None else \
            torch.tensor([self.prefix[i] for i in live], dtype=torch.int32, device=cu.device)
        hidden, _ = llm.hidden_states(torch.cat(pieces), cu, max_seqlen=max(lengths),
                                      prefix_lens=prefix)
        return llm.logits(hidden[(bounds[1:] - 1).to(hidden.device)])


def _prompt_embeddings(model, llm: LLM, prompts) -> tuple[torch.Tensor, list[int], list | None]:
    """``(input embeddings [T, H] of all prompts packed, rows per prompt, prefix rows per prompt or
    None)``: token embeddings for an LLM; for a SphinxX the packed layout of the chat samples with
    their image blocks after BOS, embedded by ``SphinxX.embed`` (the vision tower runs here)."""
    device = llm.embed_tokens.weight.device
    if model is None:
        ids = torch.tensor([t for p in prompts for t in p.ids], dtype=torch.int64, device=device)
        return llm.embed_tokens(ids), [len(p.ids) for p in prompts], None
    vision = model.config.vision
    samples = [(list(p.ids), [False] * len(p.ids), p.images) for p in prompts]
    batch = pack_samples(samples, vision, prefix_lm=llm.config.prefix_lm)
    cu = batch.layout.cu_seqlens.tolist()
    rows = [b - a for a, b in itertools.pairwise(cu)]
    prefix = None if batch.prefix_lens is None else batch.prefix_lens.tolist()
    embeds = model.embed(batch.to(device))
    return embeds[:cu[-1]], rows, prefix


class _StopStrings:
    """Whether a sequence's generated text contains a stop string: decodes the last few tokens
    (enough to hold the longest stop string, as every token holds at least one byte, plus two so
    a tokenizer's trimming of the leading space of the first decoded token cannot hide one)."""

    def __init__(self, strings: Sequence[str], tokenizer: Tokenizer | None):
        if isinstance(strings, str):
            strings = (strings,)
        self.strings = tuple(strings)
        if not all(isinstance(s, str) and s for s in self.strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.strings!r}")
        if self.strings and tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= (to decode the generated tokens)")
        self.tokenizer = tokenizer
        self.window = max((len(s.encode("utf-8")) for s in self.strings), default=0) + 2

    def hit(self, ids: list[int]) -> bool:
        if not self.strings:
            return False
        text = self.tokenizer.decode(ids[-self.window:])
        return any(s in text for s in self.strings)


def _unwrap(llm_or_model) -> tuple[SphinxX | None, LLM]:
    if isinstance(llm_or_model, SphinxX):
        return llm_or_model, llm_or_model.llm
    if isinstance(llm_or_model, LLM):
        return None, llm_or_model
    raise TypeError(f"llm_or_model must be a sphinx_model.LLM or SphinxX, got "
                    f"{type(llm_or_model).__name__}")


def _check_prompts(prompts, model: SphinxX | None, llm: LLM) -> list[ChatPrompt]:
    """The prompts as :class:`ChatPrompt` s with their images tiled, each checked (non-empty ids in
    the vocabulary, images only for a SphinxX)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list (of token id lists, or ChatPrompts for "
                         f"a SphinxX), got {type(prompts).__name__}")
    vocab = llm.config.vocab_size
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, ChatPrompt):
            if model is None and len(prompt.images):
                raise ValueError(f"prompts[{i}] has images but an LLM takes text only (pass a "
                                 "SphinxX)")
            for k, image in enumerate(prompt.images):
                if not isinstance(image, (Image.Image, TiledImage)):
                    raise TypeError(f"prompts[{i}].images[{k}] must be a PIL image or a "
                                    f"TiledImage, got {type(image).__name__}")
            ids = prompt.ids
        else:
            ids = prompt
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"prompts[{i}] must be a 1-D integer tensor, got {ids.dtype} "
                                 f"{tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"prompts[{i}] must be a list of token ids (ints), got "
                            f"{type(ids).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty (a prompt needs at least one token, e.g. BOS)")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompts[{i}] holds token id {bad}, outside "
                             f"[0, vocab_size = {vocab})")
        images = prompt.images if isinstance(prompt, ChatPrompt) else []
        out.append(ChatPrompt(list(ids), [image if isinstance(image, TiledImage) else
                                          tile_image(image, model.config.vision)
                                          for image in images]))
    return out


def _eos_ids(eos_token_id, vocab: int) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, set, frozenset)) or \
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                    for t in ids):
        raise ValueError(f"eos_token_id must be None, a token id or a list of them in [0, "
                         f"{vocab}), got {eos_token_id!r}")
    return frozenset(ids)
