"""One SPHINX-X-style training step on a packed batch, with every kernel family of sphinx_kernels.

Two samples: a wide image on a 2x2 tile canvas (its lower row of tiles is pure padding: found from
the pixels, never encoded, one skip token each) with a question and answer, and a text-only sample.
They are packed back to back with no padding row; the loss trains on answer tokens only and no label
crosses the boundary between the samples.
"""
import torch
import torch.nn.functional as F

import sphinx_kernels
from sphinx_kernels import nn as sk_nn

WIDTH, VOCAB, GRID, TILE = 64, 1000, 2, 28  # LLM width, vocabulary, token grid per view, tile px
CHANNELS = (24, 40)                          # stand-in encoders' widths (DINOv2-, ConvNeXt-like)
torch.manual_seed(0)

# 1. Which tiles are padding, from pixels: the image fills the upper row of its 2x2 canvas.
canvas = torch.zeros(1, 3, 2 * TILE, 2 * TILE)
canvas[:, :, :TILE] = torch.rand(1, 3, TILE, 2 * TILE)
skipped = sphinx_kernels.find_padding_tiles(canvas, TILE, 0.0).flatten().tolist()

# 2. The packed layout, planned on the CPU (a data loader's job).
question, answer = torch.randint(VOCAB, (6,)).tolist(), torch.randint(VOCAB, (4,)).tolist()
samples = [
    sphinx_kernels.SampleSpec(text=question + answer, answer=[False] * 6 + [True] * 4,
                              images=[sphinx_kernels.ImageSpec(2, 2, skipped)]),
    sphinx_kernels.SampleSpec(text=torch.randint(VOCAB, (9,)).tolist(), answer=[True] * 9),
]
tokens_per_view = 1 + GRID * GRID
layout = sphinx_kernels.plan_layout(sphinx_kernels.layout_inputs(samples), tokens_per_view)
views = layout.num_kept_views                          # the global view and the kept tiles only
print(f"tiles skipped from pixels: {skipped}; {views} views encoded; cu_seqlens "
      f"{layout.cu_seqlens.tolist()} (no padding row)")

# 3. Stand-in encoder outputs of the kept views: tokens with a CLS, and a channels-first map.
dino = torch.randn(views, 1 + (2 * GRID) ** 2, CHANNELS[0])     # pooled 2x2 to the grid
convnext = torch.randn(views, CHANNELS[1], GRID, GRID)

# 4. The trained parts: projector, embeddings, special vectors, one decoder layer, the LM head.
projector = sk_nn.PatchProjector(CHANNELS, WIDTH, GRID)
embedding = torch.nn.Embedding(VOCAB, WIDTH)
special = torch.nn.Parameter(torch.randn(3, WIDTH) * 0.02)     # skip, begin, end
attention = sk_nn.VarlenSelfAttention(WIDTH, num_heads=4, num_kv_heads=2)
moe = sk_nn.MoEMLP(WIDTH, 2 * WIDTH, num_experts=4, top_k=2)
head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

visual = projector([dino, convnext])                            # one fused op, no concat copy
skip, begin, end = special.split(1)
x = sphinx_kernels.gather_rows([embedding.weight, visual, skip, begin, end],
                               layout.source_ids, layout.row_ids)  # the packed sequence, one pass
x = x + attention(x, layout.cu_seqlens, layout.position_ids)
y, aux = moe(x)
logits = head(x + y)
loss = F.cross_entropy(logits, layout.labels, ignore_index=sphinx_kernels.IGNORE_INDEX)
(loss + 0.01 * aux.load_balancing_loss).backward()

trained = int((layout.labels != sphinx_kernels.IGNORE_INDEX).sum())
print(f"loss {loss.item():.3f} on {trained} answer tokens; tokens per expert "
      f"{aux.tokens_per_expert.tolist()}; load-balancing loss {aux.load_balancing_loss.item():.3f}")
print(f"gradients reach the skip / begin / end vectors: "
      f"{[bool(g.abs().sum() > 0) for g in special.grad]}, the projector: "
      f"{bool(projector.proj.weight.grad.abs().sum() > 0)}, the experts: "
      f"{bool(moe.w1.grad.abs().sum() > 0)}")
