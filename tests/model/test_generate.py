"""sphinx_model.generate: cached decoding equals recomputing every prefix, greedy tokens equal
transformers' generate on its own Llama and Mixtral, sampling is reproducible and top-p near 0 is
greedy, sequences leave the batch at EOS or a stop string, a SphinxX runs its vision tower once,
arguments are checked, decode steps allocate no cache memory and read their indices back once."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sphinx_model as sm
from sphinx_model.generate import _CachedDecoder
from sphinx_model.kv_cache import PreallocatedKVCache
from sphinx_model.sampling import Sampler
from tests.model.common import TINY_DENSE, TINY_MOE

# Model logic, not kernels (tested on their own): the ops' pure-PyTorch backends, which are also
# what the CPU runs for attention and rotary outside the Triton interpreter.
pytestmark = pytest.mark.usefixtures("reference_kernels", "single_thread")

HF_SIZES = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "initializer_range": 0.2}  # logits far apart: greedy ties cannot flip on rounding


def random_prompts(lengths, vocab, seed=0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["moe", "dense"])
def tiny_llm(request):
    torch.manual_seed(0)
    return sm.LLM(TINY_MOE if request.param == "moe" else TINY_DENSE)


def test_cached_greedy_equals_recomputing_the_prefix(tiny_llm):
    prompts = random_prompts((1, 7, 50), tiny_llm.config.vocab_size)
    cached = sm.generate(tiny_llm, prompts, 12)
    recomputed = sm.generate(tiny_llm, prompts, 12, use_cache=False)
    assert cached == recomputed
    assert [len(t) for t in cached] == [12, 12, 12]
    # Each prompt alone gives its tokens in the batch: nothing leaks between packed sequences.
    assert sm.generate(tiny_llm, prompts[1:2], 12) == cached[1:2]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{kind: (transformers model, our LLM loaded from its save_pretrained directory)}."""
    out = {}
    for kind in ("llama", "mixtral"):
        torch.manual_seed(0)
        if kind == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SIZES))
        else:
            model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
                **HF_SIZES, num_local_experts=4, num_experts_per_tok=2))
        model.generation_config.eos_token_id = None  # generate every token, as ours below
        path = tmp_path_factory.mktemp("hf") / kind
        model.eval().save_pretrained(path)
        out[kind] = (model, sm.load_hf_llm(path))
    return out


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_greedy_tokens_equal_transformers_generate(kind, hf_models):
    model, llm = hf_models[kind]
    prompts = random_prompts((1, 7, 50, 4), HF_SIZES["vocab_size"])
    ours = sm.generate(llm, prompts, 16)
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=16, pad_token_id=0)
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids),
                                    generation_config=config)
        assert tokens == theirs[0, len(prompt):].tolist()


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy(tiny_llm):
    prompts = random_prompts((3, 9), tiny_llm.config.vocab_size, seed=1)
    sample = {"do_sample": True, "temperature": 1.5, "top_p": 0.9}
    first = sm.generate(tiny_llm, prompts, 10, seed=7, **sample)
    assert sm.generate(tiny_llm, prompts, 10, seed=7, **sample) == first
    assert sm.generate(tiny_llm, prompts, 10, seed=8, **sample) != first
    greedy = sm.generate(tiny_llm, prompts, 10)
    assert first != greedy
    assert sm.generate(tiny_llm, prompts, 10, do_sample=True, top_p=1e-6, seed=3) == greedy


def test_top_p_samples_only_from_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.5 < 0.75 <= 0.8).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = Sampler(True, 1.0, 0.75)(logits, generator)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0
    assert torch.equal(Sampler(True, 1.0, 1e-9)(logits[:5], generator), torch.zeros(5).long())


def test_eos_ends_a_sequence_which_leaves_the_batch(tiny_llm):
    prompts = random_prompts((5, 1, 30), tiny_llm.config.vocab_size, seed=2)
    free = sm.generate(tiny_llm, prompts, 12)
    eos = free[0][3]
    stopped = sm.generate(tiny_llm, prompts, 12, eos_token_id=eos)
    for tokens, full in zip(stopped, free):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert tokens == expected
    assert len(stopped[0]) <= 4
    # A stop string ends a sequence too, its tokens kept.
    tokenizer = _IdTokenizer()
    text = tokenizer.decode(free[2][4:6])
    stopped = sm.generate(tiny_llm, prompts[2:], 12, stop_strings=[text], tokenizer=tokenizer)
    assert tokenizer.decode(stopped[0]).endswith(text) and len(stopped[0]) <= 6


class _IdTokenizer(sm.Tokenizer):
    """Decodes each id as ``<id>``: enough for stop strings."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def _photo(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_sphinx_prompts_with_images_run_the_vision_tower_once():
    torch.manual_seed(0)
    model = sm.SphinxX(sm.preset("tiny"))
    calls = []
    model.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    prompts = [sm.ChatPrompt([1, 5, 6, 7], [_photo(96, 30, 1)]),
               sm.ChatPrompt([1, 8, 9]),
               sm.ChatPrompt([1, 10], [_photo(40, 70, 2), _photo(50, 50, 3)])]
    cached = sm.generate(model, prompts, 6)
    assert len(calls) == 1
    recomputed = sm.generate(model, prompts, 6, use_cache=False)
    assert len(calls) == 2 and calls[0] == calls[1]  # once per call, every view at prefill
    assert cached == recomputed
    # The image matters: the same text without it generates something else.
    assert sm.generate(model, [sm.ChatPrompt([1, 5, 6, 7])], 6)[0] != cached[0]


def test_arguments_are_checked_by_name(tiny_llm):
    bad = [
        ({"prompts": []}, ValueError, "prompts"),
        ({"prompts": [[]]}, ValueError, r"prompts\[0\]"),
        ({"prompts": [[1, 99999]]}, ValueError, r"prompts\[0\].*vocab_size"),
        ({"prompts": [[1.5]]}, TypeError, r"prompts\[0\]"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 5000}, ValueError, "max_position_embeddings"),
        ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
        ({"do_sample": True, "top_p": 0.0}, ValueError, "top_p"),
        ({"eos_token_id": -3}, ValueError, "eos_token_id"),
        ({"seed": "x"}, TypeError, "seed"),
        ({"stop_strings": ["###"]}, ValueError, "tokenizer"),
        ({"prompts": [sm.ChatPrompt([1], [_photo(8, 8, 0)])]}, ValueError, "SphinxX"),
    ]
    for change, error, match in bad:
        kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **change}
        with pytest.raises(error, match=match):
            sm.generate(tiny_llm, **kwargs)
    with pytest.raises(TypeError, match="llm_or_model"):
        sm.generate(torch.nn.Linear(2, 2), [[1]])


class _CountAllocations(TorchDispatchMode):
    """Counts the tensors every aten op returns in fresh storage (not a view of, nor written into,
    one of its inputs)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and \
                    t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_decode_steps_allocate_no_cache_memory(tiny_llm):
    """Every decode step's cache work (begin_forward, each layer's update) allocates nothing: the
    new rows are written in place and the layers attend over views of the preallocated slots. The
    re-packing cache would allocate the whole cache again at every layer of every step."""
    prompts = random_prompts((4, 20, 9), tiny_llm.config.vocab_size)
    tokens = torch.tensor([5, 6, 7])
    with torch.inference_mode():
        decoder = _CachedDecoder(None, tiny_llm, [sm.ChatPrompt(p) for p in prompts], 8)
        decoder.prefill()
        cache: PreallocatedKVCache = decoder.cache
        storage = cache.keys.untyped_storage().data_ptr()
        counter = _CountAllocations()
        original_update, original_begin = cache.update, cache.begin_forward

        def counted(method):
            def run(*args, **kwargs):
                with counter:
                    return method(*args, **kwargs)
            return run

        cache.update, cache.begin_forward = counted(original_update), counted(original_begin)
        for step in range(6):
            live = [0, 1, 2] if step < 3 else [0, 2]  # sequence 1 leaves the batch
            decoder.step(live, tokens[live])
        assert counter.bytes == 0
        assert cache.keys.untyped_storage().data_ptr() == storage
        assert cache.lengths() == [4 + 6, 20 + 3, 9 + 6]

        # The same count catches a cache that re-packs: SimpleKVCache allocates every step.
        simple, simple_counter = sm.SimpleKVCache(), _CountAllocations()
        ids, cu = torch.tensor(prompts[1]), torch.tensor([0, 20], dtype=torch.int32)
        tiny_llm(ids, cu, kv_cache=simple)
        update = simple.update

        def simple_update(*args):
            with simple_counter:
                return update(*args)
        simple.update = simple_update
        tiny_llm(tokens[:1], torch.tensor([0, 1], dtype=torch.int32), kv_cache=simple)
        assert simple_counter.bytes > 0


@pytest.mark.parametrize("config", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_a_decode_step_reads_its_indices_back_once_whatever_the_depth(config, index_reads):
    """The kernels' value checks read a decode step's index tensors (cu_seqlens, positions, the
    routing plans) back to the host once per step, not once per layer or per op: as many reads per
    step at 4 layers as at 2 (sphinx_kernels._validation.values_checked)."""
    per_step = []
    for layers in (2, 4):
        torch.manual_seed(0)
        llm = sm.LLM(dataclasses.replace(config, num_layers=layers))
        prompts = random_prompts((3, 11, 6), config.vocab_size)
        for token_index, _ in enumerate(sm.stream_generate(llm, prompts, 5)):
            if token_index == len(prompts) - 1:  # the prefill's tokens are out
                before = index_reads()
        per_step.append((index_reads() - before) / 4)
    assert per_step[0] == per_step[1] > 0


@pytest.mark.gpu
def test_decode_step_memory_does_not_grow_with_the_context(monkeypatch):
    """On a GPU with the default backends: after the prefill, decode steps allocate no new memory
    and their peak does not grow as the cache fills."""
    monkeypatch.delenv("SPHINX_KERNELS_BACKEND")  # the reference attention's masks grow
    torch.manual_seed(0)
    device = torch.device("cuda")
    llm = sm.LLM(sm.preset("tiny-dense").llm).to(device)
    prompts = [sm.ChatPrompt(p) for p in random_prompts((30, 200, 7), llm.config.vocab_size)]
    tokens = torch.tensor([5, 6, 7], device=device)
    with torch.inference_mode():
        decoder = _CachedDecoder(None, llm, prompts, 256)
        decoder.prefill()
        decoder.step([0, 1, 2], tokens)  # warm the caching allocator
        torch.cuda.synchronize()
        peaks = []
        for _ in range(200):
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            decoder.step([0, 1, 2], tokens)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        assert torch.cuda.memory_allocated() <= before + 2**20  # the last logits only
    assert max(peaks[-10:]) <= max(peaks[:10]) * 1.05
