"""One module per public op, each holding the op's public function, its pure-PyTorch reference, its
backend table (``<OP>_BACKENDS``), its ``torch.library`` custom op with the fake implementation and
autograd, and its input checks. The Triton kernels of op ``x`` are in ``sphinx_kernels.triton.x``;
the compiled ones in ``csrc/``.

    packed sequences   gather_rows  find_padding_tiles  varlen_attention  apply_rotary
                       plan_layout  pack_by_token_budget
    patch projection   patch_projection
    mixture of experts topk_gating  moe_routing  moe_permute  moe_unpermute  moe_expert_mlp

Glue for peers' kernels serving ``varlen_attention``: ``torch_flash`` (torch's bundled
FlashAttention-2), ``flash_attn`` (flash-attn), and what both share, ``flash_attention_2``.

This package imports none of them itself (a function imported here would hide the module of the same
name): ``import sphinx_kernels`` registers every op.
"""
