"""Assembles the packed input embeddings of a SPHINX-X batch with one gather_rows call.

Two samples, packed back to back with no padding: each is [image-begin, visual tokens of its kept
sub-images or one skip token per skipped sub-image, image-end, text tokens]. Every row comes from one
of four sources: the token-embedding table, the projected visual rows, or the learnable special
vectors (skip, begin, end). The backward reaches all of them.
"""
import torch

import sphinx_kernels

TEXT, VISUAL, SPECIAL = 0, 1, 2          # source ids
SKIP, BEGIN, END = 0, 1, 2               # rows of the special-vector table
WIDTH, VOCAB, TOKENS_PER_TILE = 64, 1000, 4

torch.manual_seed(0)
embedding = torch.randn(VOCAB, WIDTH, requires_grad=True)
special = torch.randn(3, WIDTH, requires_grad=True)
# Sample 0: an image of 3 tiles, the middle one pure padding (skipped, never encoded); sample 1: one tile.
kept_tiles = [[True, False, True], [True]]
visual = torch.randn(TOKENS_PER_TILE * 3, WIDTH, requires_grad=True)  # the encoded tiles' rows
texts = [torch.randint(VOCAB, (5,)), torch.randint(VOCAB, (3,))]

source_ids, row_ids, cu_seqlens, next_visual = [], [], [0], 0
for tiles, text in zip(kept_tiles, texts):
    rows = [(SPECIAL, BEGIN)]
    for kept in tiles:
        if kept:
            rows += [(VISUAL, next_visual + i) for i in range(TOKENS_PER_TILE)]
            next_visual += TOKENS_PER_TILE
        else:
            rows.append((SPECIAL, SKIP))
    rows += [(SPECIAL, END)] + [(TEXT, int(t)) for t in text]
    source_ids += [s for s, _ in rows]
    row_ids += [r for _, r in rows]
    cu_seqlens.append(cu_seqlens[-1] + len(rows))
source_ids = torch.tensor(source_ids, dtype=torch.int32)
row_ids = torch.tensor(row_ids, dtype=torch.int32)

packed = sphinx_kernels.gather_rows([embedding, visual, special], source_ids, row_ids)
print(f"packed embeddings {tuple(packed.shape)}, cu_seqlens {cu_seqlens}: no padding row")
packed.sum().backward()
print(f"gradient reaches: embedding rows used {int((embedding.grad != 0).any(1).sum())}, "
      f"visual rows {int((visual.grad != 0).any(1).sum())}/{visual.shape[0]}, "
      f"special vectors used [skip, begin, end] = {special.grad[:, 0].tolist()} times")

reference = sphinx_kernels.gather_rows([embedding, visual, special], source_ids, row_ids,
                                       backend="reference")
print("equal to the pure-PyTorch reference:", torch.equal(packed, reference))
