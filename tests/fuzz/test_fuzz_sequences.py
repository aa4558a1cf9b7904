"""Fuzzing the packed-sequence ops (gather_rows, find_padding_tiles, apply_rotary,
varlen_attention) on every backend that runs here: random valid inputs (odd and empty sizes, every
layout of every tensor argument, NaN / inf) against the reference and float64 math, inputs never
modified; every class of invalid input, expecting a TypeError / ValueError naming the argument."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import sphinx_kernels as sk
from sphinx_kernels.ops.apply_rotary import APPLY_ROTARY_BACKENDS, apply_rotary_reference
from sphinx_kernels.ops.find_padding_tiles import FIND_PADDING_TILES_BACKENDS
from sphinx_kernels.ops.gather_rows import GATHER_ROWS_BACKENDS, gather_rows_reference
from sphinx_kernels.ops.varlen_attention import (
    VARLEN_ATTENTION_BACKENDS,
    varlen_attention_reference,
)
from tests.fuzz.harness import (
    ALL_FLOATS,
    BAD_BOOLS,
    BAD_FLOATS,
    DEVICE,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    NOT_TENSORS,
    assert_all_close,
    assert_bits,
    explore,
    explore_invalid,
    generator,
    gradients,
    layouts,
    plain,
    random_floats,
    replacing,
    run_backends,
    seeds,
    with_layout,
)
from tests.kernels.attention_cases import FLASH_PEERS
from tests.numerics import interpreter_rounds_bf16

READ_IN_PLACE = ("contiguous", "offset", "strided", "expanded")  # unit stride along the last dim
META = torch.device("meta")


def available(table, request=None):
    return table.available(request or table.request(DEVICE, torch.float32))


def dtypes_of(backend: str):
    """The float dtypes fuzzed on ``backend``: bf16 arithmetic only off the interpreter."""
    return FLOAT_DTYPES if backend == "triton" else FLOAT_DTYPES + (torch.bfloat16,)


# ----------------------------------------------------------------------------------------------
# gather_rows

GATHER_BACKENDS = available(GATHER_ROWS_BACKENDS)
GATHER_EXAMPLES = {"cuda": 25, "cpp": 60, "triton": 25, "reference": 60}


@st.composite
def gather_cases(draw):
    rows = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    return dict(rows=rows, width=draw(st.integers(0, 9)), num=draw(st.integers(0, 13)),
                dtype=draw(st.sampled_from(ALL_FLOATS)),
                index_dtype=draw(st.sampled_from(INDEX_DTYPES)),
                layouts=[draw(layouts(READ_IN_PLACE)) for _ in rows],
                index_layout=draw(layouts(READ_IN_PLACE)), special=draw(st.sampled_from((0, .3))),
                grad=draw(st.booleans()), seed=draw(seeds))


def gather_inputs(case):
    gen = generator(case["seed"])
    rows, num = case["rows"], case["num"]
    sources = [with_layout(random_floats((n, case["width"]), case["dtype"], gen,
                                         special=case["special"]), layout,
                           requires_grad=case["grad"])
               for n, layout in zip(rows, case["layouts"])]
    readable = [s for s, n in enumerate(rows) if n] or [-1]
    source_ids = torch.tensor(readable)[torch.randint(len(readable), (num,), generator=gen)]
    limit = torch.tensor(rows + [1])[source_ids]  # a padding id (-1) reads the 1 at the end
    row_ids = (torch.rand(num, generator=gen) * limit).long()
    source_ids = torch.where(torch.rand(num, generator=gen) < 0.2, -1, source_ids)
    index = [with_layout(t.to(case["index_dtype"]).to(DEVICE), case["index_layout"])
             for t in (source_ids, row_ids)]
    return sources, *index, random_floats((num, case["width"]), case["dtype"], gen)


def gather_reference(sources, source_ids, row_ids, grad, dtype):
    """The reference's output and its sources' gradients (autograd) in ``dtype``."""
    inputs = [plain(s, dtype, requires_grad=True) for s in sources]
    out = gather_rows_reference(inputs, plain(source_ids), plain(row_ids))
    return [out.detach(), *gradients([out], inputs, [grad.to(dtype)])]


def check_gather_rows(backend, case):
    sources, source_ids, row_ids, grad = gather_inputs(case)
    expected = gather_reference(sources, source_ids, row_ids, grad, case["dtype"])
    exact = gather_reference(sources, source_ids, row_ids, grad, torch.float64)

    def call(b):
        out = sk.gather_rows(sources, source_ids, row_ids, backend=b)
        return [out.detach(), *gradients([out], sources, [grad])]

    def check(b, got):
        assert_bits(got[:1], expected[:1], ["out"], f"gather_rows {b}")
        if case["grad"] and not interpreter_rounds_bf16(b, case["dtype"]):
            names = [f"grad sources[{i}]" for i in range(len(sources))]
            assert_all_close(got[1:], expected[1:], exact[1:], names, f"gather_rows {b}")

    run_backends("gather_rows", [backend], call, (sources, source_ids, row_ids), check)


@pytest.mark.parametrize("backend", GATHER_BACKENDS)
def test_gather_rows_valid(backend):
    explore(gather_cases(), lambda case: check_gather_rows(backend, case),
            GATHER_EXAMPLES[backend])


def gather_call(gen):
    sources = [torch.randn(4, 3, generator=gen), torch.randn(2, 3, generator=gen)]
    return dict(sources=sources, source_ids=torch.tensor([0, 1, -1, 0]),
                row_ids=torch.tensor([3, 1, 0, 0]), backend=None)


def _source(i, make):
    def mutate(args):
        args["sources"] = list(args["sources"])
        args["sources"][i] = make(args["sources"][i])
    return mutate


GATHER_MUTATIONS = [
    *replacing("sources", [(torch.zeros(2, 3), TypeError), (None, TypeError), ([], ValueError),
                           ([torch.zeros(1, 3)] * 17, ValueError)]),
    ("sources[1] not a tensor", _source(1, lambda s: s.tolist()), TypeError, "sources[1]"),
    ("int source", _source(0, lambda s: s.long()), TypeError, "sources[0]"),
    ("mixed dtypes", _source(1, lambda s: s.double()), TypeError, "sources[1]"),
    ("1-D source", _source(1, lambda s: s[0]), ValueError, "sources[1]"),
    ("width mismatch", _source(1, lambda s: s[:, :2]), ValueError, "sources[1]"),
    ("source on meta", _source(1, lambda s: s.to(META)), ValueError, "sources[1]"),
    ("non-unit stride", _source(0, lambda s: s.t().contiguous().t()[:, :3]), ValueError,
     "sources[0]"),
    *replacing("source_ids", NOT_TENSORS),
    *replacing("source_ids", [(lambda a: a["source_ids"].float(), TypeError),
                              (lambda a: a["source_ids"][None], ValueError),
                              (lambda a: a["source_ids"] + 2, ValueError),
                              (lambda a: a["source_ids"].to(META), ValueError)]),
    *replacing("row_ids", NOT_TENSORS),
    *replacing("row_ids", [(lambda a: a["row_ids"].int(), TypeError),
                           (lambda a: a["row_ids"][:3], ValueError),
                           (lambda a: a["row_ids"] + 4, ValueError),
                           (lambda a: a["row_ids"] - 1, ValueError)]),
    *replacing("backend", [(3, TypeError), ("nope", ValueError), (["cpp"], TypeError)]),
]


def test_gather_rows_invalid():
    explore_invalid("gather_rows", gather_call, GATHER_MUTATIONS,
                    lambda a: sk.gather_rows(a["sources"], a["source_ids"], a["row_ids"],
                                             backend=a["backend"]), 10)


# ----------------------------------------------------------------------------------------------
# find_padding_tiles

PADDING_BACKENDS = available(FIND_PADDING_TILES_BACKENDS)
PADDING_EXAMPLES = {"cuda": 15, "triton": 8, "reference": 40}


@st.composite
def padding_cases(draw):
    tile_h = draw(st.integers(1, 3))
    tile_w = tile_h if draw(st.booleans()) else draw(st.integers(1, 3))
    return dict(num=draw(st.integers(0, 2)), channels=draw(st.integers(1, 3)),
                tiles=(draw(st.integers(0, 3)), draw(st.integers(0, 2))), tile=(tile_h, tile_w),
                single=draw(st.booleans()), dtype=draw(st.sampled_from(FLOAT_DTYPES)),
                pad_form=draw(st.sampled_from(("scalar", "sequence", "tensor"))),
                nan_pad=draw(st.booleans()) and draw(st.booleans()),
                layout=draw(layouts()), dim=draw(st.integers(0, 2)),
                pad_layout=draw(layouts(("contiguous", "strided", "expanded"))), seed=draw(seeds))


def padding_inputs(case):
    gen = generator(case["seed"])
    (tiles_h, tiles_w), (tile_h, tile_w) = case["tiles"], case["tile"]
    num = 1 if case["single"] else case["num"]
    channels, dtype = case["channels"], case["dtype"]
    pad = torch.randn(channels, generator=gen, dtype=torch.float64)
    if case["pad_form"] == "scalar":
        pad = pad[:1].expand(channels).clone()
    if case["nan_pad"]:
        pad[0] = float("nan")
    images = pad.to(dtype).view(1, channels, 1, 1).expand(
        num, channels, tiles_h * tile_h, tiles_w * tile_w).clone()
    # Some tiles get one pixel off the pad (a value, NaN or inf): not padding any more.
    for n, i, j in torch.nonzero(torch.rand(num, tiles_h, tiles_w, generator=gen) < 0.5).tolist():
        c, y, x = (int(torch.randint(s, (), generator=gen)) for s in (channels, tile_h, tile_w))
        images[n, c, i * tile_h + y, j * tile_w + x] = random_floats((), dtype, gen, special=0.3)
    images = with_layout(images.to(DEVICE), case["layout"], case["dim"])
    pad_value = {"scalar": float(pad[0]), "sequence": pad.tolist(),
                 "tensor": with_layout(pad.to(DEVICE), case["pad_layout"])}[case["pad_form"]]
    return (images[0] if case["single"] else images), pad_value


def padding_in_float64(images, pad_value, tile):
    """The definition: every pixel of every channel equals the pad rounded to the images' dtype."""
    images = images[None] if images.dim() == 3 else images
    num, channels, height, width = images.shape
    pad = torch.as_tensor(pad_value, dtype=torch.float64).to(images.dtype).double()
    equal = images.double() == pad.to(images.device).expand(channels).view(1, -1, 1, 1)
    tile_h, tile_w = tile
    return equal.view(num, channels, height // tile_h, tile_h, width // tile_w, tile_w).all(
        dim=(1, 3, 5))


def check_find_padding_tiles(backend, case):
    images, pad_value = padding_inputs(case)
    expected = padding_in_float64(images, pad_value, case["tile"])
    if case["single"]:
        expected = expected[0]
    tile = case["tile"][0] if case["tile"][0] == case["tile"][1] else case["tile"]
    run_backends("find_padding_tiles", [backend],
                 lambda b: [sk.find_padding_tiles(images, tile, pad_value, backend=b)],
                 (images, pad_value),
                 lambda b, got: assert_bits(got, [expected], ["flags"], f"find_padding_tiles {b}"))


@pytest.mark.parametrize("backend", PADDING_BACKENDS)
def test_find_padding_tiles_valid(backend):
    explore(padding_cases(), lambda case: check_find_padding_tiles(backend, case),
            PADDING_EXAMPLES[backend])


def padding_call(gen):
    return dict(images=torch.randn(2, 3, 4, 6, generator=gen), tile=2, pad_value=0.0, backend=None)


PADDING_MUTATIONS = [
    *replacing("images", NOT_TENSORS + [(lambda a: a["images"].int(), TypeError),
                                        (lambda a: a["images"].double(), TypeError),
                                        (lambda a: a["images"][0, 0], ValueError),
                                        (lambda a: a["images"][None], ValueError)]),
    *replacing("tile", [(3, ValueError), (0, ValueError), (-2, ValueError), ((2, 2, 2), ValueError),
                        ((2, 0), ValueError), (2**70, ValueError), (True, TypeError),
                        ((True, 2), TypeError), (2.0, TypeError), (None, TypeError),
                        ("2", TypeError)]),
    *replacing("pad_value", [("black", TypeError), ((0.0, 0.0), ValueError),
                             (torch.zeros(2, 3), ValueError),
                             (torch.zeros(3, device=META), ValueError)]),
    *replacing("backend", [(3, TypeError), ("cpp", ValueError)]),
]


def test_find_padding_tiles_invalid():
    explore_invalid("find_padding_tiles", padding_call, PADDING_MUTATIONS,
                    lambda a: sk.find_padding_tiles(a["images"], a["tile"], a["pad_value"],
                                                    backend=a["backend"]), 10)


# ----------------------------------------------------------------------------------------------
# apply_rotary

ROTARY_BACKENDS = available(APPLY_ROTARY_BACKENDS)
ROTARY_EXAMPLES = {"cpp": 50, "triton": 30, "reference": 50}
ROTATED_LAYOUTS = ("contiguous", "offset", "strided", "expanded", "transposed")


@st.composite
def rotary_cases(draw, dtypes):
    pair = draw(st.booleans())
    return dict(tokens=draw(st.integers(0, 9)), q_heads=draw(st.integers(0, 3)),
                k_heads=draw(st.integers(0, 3)) if pair else None, half=draw(st.integers(1, 6)),
                table=draw(st.integers(1, 12)), dtype=draw(st.sampled_from(dtypes)),
                table_dtype=draw(st.sampled_from(dtypes)),
                index_dtype=draw(st.sampled_from(INDEX_DTYPES)),
                layouts=[draw(layouts(ROTATED_LAYOUTS)) for _ in "qk"],
                dims=[draw(st.integers(0, 1)) for _ in "qk"],
                table_layout=draw(layouts(READ_IN_PLACE)), pos_layout=draw(layouts(READ_IN_PLACE)),
                special=draw(st.sampled_from((0, .2))), grad=draw(st.booleans()), seed=draw(seeds))


def rotary_inputs(case):
    gen = generator(case["seed"])
    tokens, dim = case["tokens"], 2 * case["half"]
    heads = [case["q_heads"]] + ([] if case["k_heads"] is None else [case["k_heads"]])
    # Along D the stride stays 1: "transposed" swaps T and H in memory.
    x = [with_layout(random_floats((tokens, h, dim), case["dtype"], gen, special=case["special"]),
                     layout, 0 if layout == "transposed" else d, requires_grad=case["grad"])
         for h, layout, d in zip(heads, case["layouts"], case["dims"])]
    cos, sin = (with_layout(random_floats((case["table"], dim), case["table_dtype"], gen,
                                          special=case["special"] / 4), case["table_layout"])
                for _ in "cs")
    positions = torch.randint(case["table"], (tokens,), generator=gen).to(case["index_dtype"])
    grads = [random_floats(t.shape, case["dtype"], gen) for t in x]
    return x, cos, sin, with_layout(positions.to(DEVICE), case["pos_layout"]), grads


def rotary_reference(x, cos, sin, positions, grads, dtype):
    """The reference's outputs and input gradients (autograd) in ``dtype``."""
    inputs = [plain(t, dtype, requires_grad=True) for t in x]
    pair = inputs + [inputs[0][:, :0]] * (2 - len(inputs))
    outs = apply_rotary_reference(*pair, plain(cos, dtype), plain(sin, dtype), plain(positions))
    outs = list(outs[:len(x)])
    return [o.detach() for o in outs] + gradients(outs, inputs, [g.to(dtype) for g in grads])


def check_apply_rotary(backend, case):
    x, cos, sin, positions, grads = rotary_inputs(case)
    # The tables are read in their own dtype and the sums carried in float32: the reference in
    # x's dtype on x's dtype's tables rounds the same values.
    expected = rotary_reference(x, cos, sin, positions, grads, case["dtype"])
    exact = rotary_reference(x, cos, sin, positions, grads, torch.float64)
    names = ["q", "k"][:len(x)]

    def call(b):
        outs = sk.apply_rotary(x if len(x) == 2 else x[0], cos, sin, positions, backend=b)
        outs = list(outs) if len(x) == 2 else [outs]
        return [o.detach() for o in outs] + gradients(outs, x, grads)

    def check(b, got):
        count = len(x) if case["grad"] else 0
        what = f"apply_rotary {b}"
        assert_all_close(got[:len(x)], expected[:len(x)], exact[:len(x)], names, what)
        assert_all_close(got[len(x):len(x) + count], expected[len(x):len(x) + count],
                         exact[len(x):len(x) + count], [f"grad {n}" for n in names][:count], what)

    run_backends("apply_rotary", [backend], call, (x, cos, sin, positions), check)


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
def test_apply_rotary_valid(backend):
    explore(rotary_cases(dtypes_of(backend)), lambda case: check_apply_rotary(backend, case),
            ROTARY_EXAMPLES[backend])


def rotary_call(gen):
    q = torch.randn(5, 2, 8, generator=gen)
    return dict(x=q, cos=torch.randn(7, 8, generator=gen), sin=torch.randn(7, 8, generator=gen),
                position_ids=torch.randint(7, (5,), generator=gen), backend=None)


ROTARY_MUTATIONS = [
    *replacing("x", NOT_TENSORS[:1] + [(lambda a: a["x"].double(), TypeError),
                                       (lambda a: a["x"][0], ValueError),
                                       (lambda a: a["x"][..., :7], ValueError),
                                       (lambda a: a["x"].transpose(1, 2).contiguous().transpose(
                                           1, 2), ValueError),
                                       (lambda a: (a["x"],) * 3, ValueError)]),
    *replacing("x", [(lambda a: (a["x"], None), TypeError)], "x[1]"),
    *replacing("x", [(lambda a: ("q", a["x"]), TypeError)], "x[0]"),
    *replacing("x", [(lambda a: (a["x"], a["x"].half()), TypeError),
                     (lambda a: (a["x"], a["x"][:4]), ValueError),
                     (lambda a: (a["x"], a["x"].to(META)), ValueError)], "x[1]"),
    *replacing("cos", NOT_TENSORS + [(lambda a: a["cos"][:, :6], ValueError),
                                     (lambda a: a["cos"].long(), TypeError),
                                     (lambda a: a["cos"].clone().requires_grad_(), ValueError),
                                     (lambda a: a["cos"].to(META), ValueError)]),
    *replacing("sin", [(lambda a: a["sin"].half(), ValueError), (lambda a: a["sin"][:6],
                                                                 ValueError)]),
    *replacing("position_ids", NOT_TENSORS + [(lambda a: a["position_ids"].float(), TypeError),
                                              (lambda a: a["position_ids"][:4], ValueError),
                                              (lambda a: a["position_ids"] + 7, ValueError),
                                              (lambda a: a["position_ids"] - 7, ValueError),
                                              (lambda a: a["position_ids"][None], ValueError)]),
    *replacing("backend", [(1.5, TypeError), ("cuda", ValueError)]),
]


def test_apply_rotary_invalid():
    explore_invalid("apply_rotary", rotary_call, ROTARY_MUTATIONS,
                    lambda a: sk.apply_rotary(a["x"], a["cos"], a["sin"], a["position_ids"],
                                              backend=a["backend"]), 10)


# ----------------------------------------------------------------------------------------------
# varlen_attention (the FlashAttention-2 peers, GPU only, have their own tests)

ATTENTION_REQUEST = VARLEN_ATTENTION_BACKENDS.request(DEVICE, torch.float32, head_dim=64)
ATTENTION_BACKENDS = [b for b in available(VARLEN_ATTENTION_BACKENDS, ATTENTION_REQUEST)
                      if b not in FLASH_PEERS]
# Backends that serve decode steps only (max_seqlen_q = 1): fuzzed on decode cases.
DECODE_REQUEST = VARLEN_ATTENTION_BACKENDS.request(DEVICE, torch.float32, head_dim=64, decode=True)
DECODE_BACKENDS = [b for b in available(VARLEN_ATTENTION_BACKENDS, DECODE_REQUEST)
                   if b not in ATTENTION_BACKENDS + list(FLASH_PEERS)]
ATTENTION_EXAMPLES = {"cpp": 40, "triton": 12, "torch_cpu_flash": 20, "reference": 30}
ATTENTION_LAYOUTS = ("contiguous", "offset", "strided", "expanded", "transposed", "fused")
METADATA_LAYOUTS = ("contiguous", "offset", "strided")


@st.composite
def attention_cases(draw):
    num = draw(st.integers(1, 4))
    lens_q = draw(st.lists(st.integers(0, 9), min_size=num, max_size=num))
    separate = draw(st.booleans())
    lens_k = draw(st.lists(st.integers(0, 9), min_size=num, max_size=num)) if separate else lens_q
    mode = draw(st.sampled_from(("causal", "non-causal", "prefix")))
    prefix_layout = draw(layouts(METADATA_LAYOUTS + ("expanded",)))
    prefix = None
    if mode == "prefix":
        prefix = ([min(lens_k)] * num if prefix_layout == "expanded"
                  else [draw(st.integers(0, n)) for n in lens_k])
    layout = draw(layouts(ATTENTION_LAYOUTS if not separate else ATTENTION_LAYOUTS[:-1]))
    return dict(lens_q=lens_q, lens_k=lens_k, separate=separate, mode=mode, prefix=prefix,
                pad=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
                kv_heads=draw(st.integers(1, 2)), group=draw(st.integers(1, 3)),
                head_dim=draw(st.sampled_from((1, 4, 8, 16, 24))),
                dtype=draw(st.sampled_from(FLOAT_DTYPES)), layout=layout,
                dim=draw(st.integers(0, 1)), cu_layout=draw(layouts(METADATA_LAYOUTS)),
                prefix_layout=prefix_layout, bounds=draw(st.sampled_from((None, 0, 3))),
                scale=draw(st.sampled_from((None, 0.3, 1.7))),
                poisoned=draw(st.sampled_from((None, 0, num - 1))), seed=draw(seeds))


@st.composite
def decode_attention_cases(draw):
    """A decode step: at most one query row per sequence, against keys laid out separately."""
    case = draw(attention_cases())
    num = len(case["lens_q"])
    lens_k = draw(st.lists(st.integers(0, 9), min_size=num, max_size=num))
    prefix = case["prefix"]
    if prefix is not None:
        prefix = ([min(lens_k)] * num if case["prefix_layout"] == "expanded"
                  else [draw(st.integers(0, n)) for n in lens_k])
    return dict(case, lens_q=draw(st.lists(st.integers(0, 1), min_size=num, max_size=num)),
                lens_k=lens_k, separate=True, prefix=prefix, decode=True,
                layout="contiguous" if case["layout"] == "fused" else case["layout"])


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)


def attention_inputs(case):
    gen = generator(case["seed"])
    lens_q, lens_k = case["lens_q"], case["lens_k"]
    total_q = sum(lens_q) + case["pad"][0]
    total_k = sum(lens_k) + (case["pad"][1] if case["separate"] else case["pad"][0])
    heads, kv_heads, dim = case["kv_heads"] * case["group"], case["kv_heads"], case["head_dim"]
    q, k, v = (random_floats((total, h, dim), case["dtype"], gen)
               for total, h in ((total_q, heads), (total_k, kv_heads), (total_k, kv_heads)))
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    # Padding rows are never read: NaN there must not show anywhere.
    q[int(cu_q[-1]):], k[int(cu_k[-1]):], v[int(cu_k[-1]):] = (float("nan"),) * 3
    b = case["poisoned"]
    if b is not None:  # one NaN or inf inside sequence b
        for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)):
            if cu[b + 1] > cu[b] and torch.rand((), generator=gen) < 0.5:
                t[int(cu[b]), 0, 0] = float("nan") if torch.rand((), generator=gen) < .5 else 1e30
    if case["layout"] == "fused":
        fused = torch.cat([q, k, v], dim=1).requires_grad_()
        q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)
    else:
        # Along D the stride stays 1 ("transposed" swaps T and H in memory); "expanded" shares one
        # head's values among the heads (expanding tokens would copy one row's values, padding's
        # NaN and the poison included, into every sequence).
        dim = {"transposed": 0, "expanded": 1}.get(case["layout"], case["dim"])
        q, k, v = (with_layout(t, case["layout"], dim, requires_grad=True) for t in (q, k, v))
    metadata = [with_layout(t, case["cu_layout"]) for t in (cu_q, cu_k)]
    if case["prefix"] is not None:
        metadata.append(with_layout(torch.tensor(case["prefix"], dtype=torch.int32).to(DEVICE),
                                    case["prefix_layout"]))
    return q, k, v, metadata, random_floats(q.shape, case["dtype"], gen)


def attention_kwargs(case, metadata):
    causal = case["mode"] != "non-causal"
    kwargs = dict(cu_seqlens_k=metadata[1] if case["separate"] else None, causal=causal,
                  softmax_scale=case["scale"],
                  prefix_lens=metadata[2] if len(metadata) > 2 else None)
    if case.get("decode"):  # the bound that makes the call a decode step
        kwargs.update(max_seqlen_q=1, max_seqlen_k=None if case["bounds"] is None
                      else max(case["lens_k"]) + case["bounds"])
    elif case["bounds"] is not None:
        kwargs.update(max_seqlen_q=max(case["lens_q"]) + case["bounds"],
                      max_seqlen_k=max(case["lens_k"]) + case["bounds"])
    return kwargs


def attention_reference(case, q, k, v, metadata, grad, dtype):
    inputs = [plain(t, dtype, requires_grad=True) for t in (q, k, v)]
    kwargs = attention_kwargs(case, [plain(t) for t in metadata])
    kwargs.pop("max_seqlen_q", None), kwargs.pop("max_seqlen_k", None)
    out, _ = varlen_attention_reference(*inputs, plain(metadata[0]), **kwargs)
    return [out.detach(), *gradients([out], inputs, [grad.to(dtype)])]


def sequence_rows(lengths, total, poisoned):
    """bool ``[total]``: the rows of the sequences other than ``poisoned`` (padding excluded)."""
    keep = torch.zeros(total, dtype=torch.bool, device=DEVICE)
    start = 0
    for b, n in enumerate(lengths):
        keep[start:start + n] = b != poisoned
        start += n
    return keep


def check_varlen_attention(backend, case):
    q, k, v, metadata, grad = attention_inputs(case)
    expected = attention_reference(case, q, k, v, metadata, grad, case["dtype"])
    exact = attention_reference(case, q, k, v, metadata, grad, torch.float64)
    rows_q = sequence_rows(case["lens_q"], q.shape[0], case["poisoned"])
    rows_k = sequence_rows(case["lens_k"], k.shape[0], case["poisoned"])
    padding_q = torch.arange(q.shape[0], device=DEVICE) >= sum(case["lens_q"])
    padding_k = torch.arange(k.shape[0], device=DEVICE) >= sum(case["lens_k"])

    def call(b):
        out = sk.varlen_attention(q, k, v, metadata[0], **attention_kwargs(case, metadata),
                                  backend=b)
        return [out.detach(), *gradients([out], [q, k, v], [grad])]

    def check(b, got):
        what = f"varlen_attention {b}"
        for name, value, pad in zip(("out", "dq", "dk", "dv"), got, (padding_q, padding_q,
                                                                     padding_k, padding_k)):
            assert (value[pad] == 0).all(), f"{what}: {name} not zero on padding rows"
        # A poisoned sequence's rows may all turn NaN (docs/numerics.md); every other row is
        # compared.
        kept = [(got[i][rows], expected[i][rows], exact[i][rows])
                for i, rows in enumerate((rows_q, rows_q, rows_k, rows_k))]
        assert_all_close(*zip(*kept), ["out", "dq", "dk", "dv"], what)

    run_backends("varlen_attention", [backend], call, (q, k, v, metadata), check)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_varlen_attention_valid(backend):
    explore(attention_cases(), lambda case: check_varlen_attention(backend, case),
            ATTENTION_EXAMPLES[backend])


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_varlen_attention_decode_valid(backend):
    explore(decode_attention_cases(), lambda case: check_varlen_attention(backend, case),
            ATTENTION_EXAMPLES[backend])


def attention_call(gen):
    q = torch.randn(9, 4, 8, generator=gen)
    k = torch.randn(9, 2, 8, generator=gen)
    return dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor([0, 3, 3, 9], dtype=torch.int32),
                cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal=True,
                softmax_scale=None, prefix_lens=None, deterministic=False, backend=None)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


ATTENTION_MUTATIONS = [
    *replacing("q", NOT_TENSORS + [(lambda a: a["q"].long(), TypeError),
                                   (lambda a: a["q"][0], ValueError),
                                   (lambda a: a["q"][:, :3], ValueError),
                                   (lambda a: torch.zeros(9, 4, 300), ValueError),
                                   (lambda a: a["q"].transpose(0, 2).contiguous().transpose(0, 2),
                                    ValueError)]),
    *replacing("k", [(lambda a: a["k"].half(), TypeError), (lambda a: a["k"][:8], ValueError),
                     (lambda a: a["k"][..., :4], ValueError), (lambda a: a["k"].to(META),
                                                               ValueError)]),
    *replacing("v", [(None, TypeError), (lambda a: a["v"][:, :1], ValueError)]),
    *replacing("cu_seqlens_q", NOT_TENSORS + [
        (lambda a: a["cu_seqlens_q"].long(), TypeError), (_i32(), ValueError),
        (_i32(1, 3, 9), ValueError), (_i32(0, 5, 3, 9), ValueError), (_i32(0, 5, 10), ValueError),
        (lambda a: a["cu_seqlens_q"][None], ValueError),
        (lambda a: a["cu_seqlens_q"].to(META), ValueError)]),
    *replacing("cu_seqlens_k", [(_i32(0, 9), ValueError), (_i32(0, 2, 4, 99), ValueError),
                                (_i32(0, 2, 1, 9), ValueError), ("cu", TypeError)]),
    *replacing("prefix_lens", [(_i32(1, 0), ValueError), (_i32(4, 0, 0), ValueError),
                               (_i32(0, 0, -1), ValueError), (torch.tensor([0, 0, 0]), TypeError),
                               (3, TypeError)]),
    ("prefix without causal", lambda a: a.update(prefix_lens=_i32(0, 0, 1), causal=False),
     ValueError, "prefix_lens"),
    *replacing("max_seqlen_q", [(2.0, TypeError), (-1, TypeError), (5, ValueError)]),
    *replacing("max_seqlen_k", [(True, TypeError), ("9", TypeError)]),
    *replacing("causal", BAD_BOOLS),
    *replacing("deterministic", BAD_BOOLS),
    *replacing("softmax_scale", [(v, e) for v, e in BAD_FLOATS]),
    *replacing("backend", [(0, TypeError), ("torch_flash", ValueError)]),
]


def test_varlen_attention_invalid():
    def call(a):
        return sk.varlen_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens_q"), **a)
    explore_invalid("varlen_attention", attention_call, ATTENTION_MUTATIONS, call, 8)


@pytest.mark.parametrize("mutations,call", [
    (GATHER_MUTATIONS, gather_call), (PADDING_MUTATIONS, padding_call),
    (ROTARY_MUTATIONS, rotary_call), (ATTENTION_MUTATIONS, attention_call)])
def test_every_argument_has_invalid_cases(mutations, call):
    """A new argument of an op above gets its invalid cases here."""
    named = {name.split("[")[0] for _, _, _, name in mutations}
    assert not set(call(generator(0))) - named
