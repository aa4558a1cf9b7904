"""Hugging Face transformers (>= 5) models on sphinx_kernels, through transformers' own extension
points (its attention and attention-mask interfaces, and module replacement; nothing is patched)::

    from sphinx_kernels.integrations import transformers as skt
    skt.register()                  # adds attn_implementation="sphinx_varlen"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sphinx_varlen")
    skt.use_sphinx_moe(model)       # Mixtral: every sparse-MoE block served by nn.MoEMLP

``sphinx_varlen`` runs :func:`sphinx_kernels.varlen_attention` on padding-free batches, the ones
``DataCollatorWithFlattening`` makes (all samples concatenated into one row, positions restarting
per sample). It serves, without copying keys and values per query head (GQA):

- packed rows described by ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and ``max_length_q`` /
  ``max_length_k``), as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes them:
  no host synchronisation;
- otherwise, sequences found from ``position_ids`` (which transformers always passes): one starts
  at each row and wherever a position is not the previous one plus 1, so packed rows, unpadded
  rows and a plain single sequence are all served; counting them costs one host synchronisation
  per layer on a GPU;
- new tokens against a KV cache without padding: each row one sequence, its queries aligned to the
  end of its keys.

It refuses, with a ``ValueError`` naming the feature, what it cannot compute exactly: a batch with
padding (the attention mask transformers then hands the layer), attention dropout in training, logit
softcapping, attention sinks, position biases, attention weights (``output_attentions``), and a
sliding window narrower than the longest sequence (a window at least that wide changes nothing and
is served).

transformers is imported when a function here is called, never when this module is imported.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn

from sphinx_kernels import varlen_attention
from sphinx_kernels.nn import MoEMLP

__all__ = ["ATTENTION_NAME", "SphinxMixtralSparseMoe", "register", "sphinx_varlen_attention",
           "undo_sphinx_moe", "use_sphinx_moe"]

ATTENTION_NAME = "sphinx_varlen"
_MIN_TRANSFORMERS = 5


def _require_transformers() -> None:
    """ImportError with what to install, unless transformers >= 5 can be imported."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "sphinx_kernels.integrations.transformers needs Hugging Face transformers >= "
            f"{_MIN_TRANSFORMERS}, which is not installed: pip install "
            f"'transformers>={_MIN_TRANSFORMERS}'") from error
    if int(transformers.__version__.split(".")[0]) < _MIN_TRANSFORMERS:
        raise ImportError(f"sphinx_kernels.integrations.transformers needs transformers >= "
                          f"{_MIN_TRANSFORMERS}, found {transformers.__version__}")


def register() -> None:
    """Adds ``attn_implementation="sphinx_varlen"`` to transformers: :func:`sphinx_varlen_attention`
    in its ``AttentionInterface``, and transformers' FlashAttention mask function in its
    ``AttentionMaskInterface`` under the same name. That mask function hands a layer the 2D padding
    mask only when the batch has padding, so a padded batch reaches the attention function and is
    refused there (without a registered mask function transformers would drop the mask and the
    padding would be attended silently). Calling it again changes nothing."""
    _require_transformers()
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask
    AttentionInterface.register(ATTENTION_NAME, sphinx_varlen_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)


def sphinx_varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            sliding_window: int | None = None, softcap: float | None = None,
                            is_causal: bool | None = None, *,
                            cu_seq_lens_q: torch.Tensor | None = None,
                            cu_seq_lens_k: torch.Tensor | None = None,
                            max_length_q: int | torch.Tensor | None = None,
                            max_length_k: int | torch.Tensor | None = None,
                            position_ids: torch.Tensor | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function over :func:`sphinx_kernels.varlen_attention`.

    Args:
        module: the calling attention layer; its ``is_causal`` (default True) unless ``is_causal``
            is given.
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` with ``Hq`` a multiple of ``Hkv``
            (GQA, read in place); float16, bfloat16 or float32; any strides with unit stride in D.
        attention_mask: must be None. transformers passes one only for a batch with padding (the 2D
            mask, with the mask function :func:`register` installs) or a custom 4D mask.
        dropout: must be 0 (transformers passes the config's attention dropout in training).
        scaling: the softmax scale; None: ``D ** -0.5``.
        sliding_window: the config's window (tokens a query sees, itself included); served only
            when no sequence is longer, which the bound below must show.
        softcap: must be None.
        cu_seq_lens_q, cu_seq_lens_k: int ``[N + 1]`` offsets of packed sequences in the ``B * Sq``
            (``B * Sk``) tokens read row after row; ``cu_seq_lens_k`` defaults to the query's.
        max_length_q, max_length_k: host ints bounding those lengths (optional; a tensor counts
            only on the CPU, reading it from a GPU would synchronise).
        position_ids: ``[B or 1, Sq]``; without ``cu_seq_lens_q`` and with ``Sq == Sk`` a sequence
            starts at each row and wherever a position is not the previous one plus 1.
        kwargs: transformers' other keywords; ``s_aux``, ``position_bias`` and
            ``output_attentions=True`` are refused, the rest (caches' bookkeeping) ignored.

    Without ``cu_seq_lens_q`` or usable ``position_ids`` (``Sq != Sk``: new tokens after a KV
    cache), each row is one sequence, its queries aligned to the end of its keys.

    Returns:
        ``(out, None)``: ``out`` ``[B, Sq, Hq, D]`` in the query's dtype (the layout transformers'
        attention layers reshape to ``[B, Sq, Hq * D]``), and no attention weights.
    """
    batch, heads, len_q, head_dim = query.shape
    len_k = key.shape[2]
    _refuse_unsupported(attention_mask, dropout, softcap, value.shape[-1], head_dim, kwargs)
    cu_q, cu_k, max_q, max_k = _sequences(batch, len_q, len_k, query.device, cu_seq_lens_q,
                                          cu_seq_lens_k, max_length_q, max_length_k, position_ids)
    if sliding_window is not None:
        longest = max_k if max_k is not None else batch * len_k
        if longest > sliding_window:
            raise ValueError(
                f"sphinx_varlen has no sliding-window attention: sequences may be up to {longest} "
                f"keys long, more than the config's sliding_window={sliding_window}. Pass "
                "max_length_k (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) if every "
                "sequence fits the window, or use a config with sliding_window=None")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = varlen_attention(
        query.transpose(1, 2).reshape(batch * len_q, heads, head_dim),
        key.transpose(1, 2).reshape(batch * len_k, key.shape[1], head_dim),
        value.transpose(1, 2).reshape(batch * len_k, value.shape[1], head_dim),
        cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scaling)
    return out.view(batch, len_q, heads, head_dim), None


def _refuse_unsupported(attention_mask, dropout, softcap, value_dim, head_dim, kwargs) -> None:
    if attention_mask is not None:
        raise ValueError(
            "sphinx_varlen serves padding-free batches and got an attention mask "
            f"({tuple(attention_mask.shape)}): the batch has padding (or a custom mask). Pack the "
            "samples instead (transformers' DataCollatorWithFlattening), or use "
            "attn_implementation='sdpa' for padded batches")
    if dropout:
        raise ValueError(f"sphinx_varlen has no attention dropout; the model is in training with "
                         f"attention_dropout={dropout}: set config.attention_dropout = 0.0")
    if softcap is not None:
        raise ValueError(f"sphinx_varlen has no attention logit softcapping (softcap={softcap})")
    if kwargs.get("s_aux") is not None:
        raise ValueError("sphinx_varlen has no attention sinks (s_aux)")
    if kwargs.get("position_bias") is not None:
        raise ValueError("sphinx_varlen has no additive position bias (position_bias)")
    if kwargs.get("output_attentions"):
        raise ValueError("sphinx_varlen never forms the attention weights (output_attentions=True):"
                         " use attn_implementation='eager' to get them")
    if value_dim != head_dim:
        raise ValueError(f"sphinx_varlen needs the value head dim ({value_dim}) to equal the "
                         f"query's ({head_dim})")


def _host_int(bound: int | torch.Tensor | None) -> int | None:
    if isinstance(bound, torch.Tensor):
        return int(bound) if bound.device.type == "cpu" else None
    return bound


def _sequences(batch: int, len_q: int, len_k: int, device: torch.device,
               cu_seq_lens_q: torch.Tensor | None, cu_seq_lens_k: torch.Tensor | None,
               max_length_q, max_length_k, position_ids: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, int | None, int | None]:
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` over the flattened rows."""
    if cu_seq_lens_q is not None:
        cu_q = cu_seq_lens_q.to(device=device, dtype=torch.int32)
        cu_k = cu_q if cu_seq_lens_k is None else cu_seq_lens_k.to(device=device, dtype=torch.int32)
        max_q = _host_int(max_length_q)
        max_k = _host_int(max_length_k) if cu_seq_lens_k is not None else max_q
        return cu_q, cu_k, max_q, max_k
    if cu_seq_lens_k is not None:
        raise ValueError("cu_seq_lens_k was given without cu_seq_lens_q")
    if position_ids is not None and len_q == len_k:
        cu = _starts_from_positions(position_ids, batch, len_q, device)
        return cu, cu, len_q, len_k
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return rows * len_q, rows * len_k, len_q, len_k


def _starts_from_positions(position_ids: torch.Tensor, batch: int, length: int,
                           device: torch.device) -> torch.Tensor:
    """int32 offsets of the sequences in ``batch`` rows of ``length`` tokens: one starts at each row
    and wherever a position is not the previous one plus 1 (transformers' own rule for packed
    position ids). Counting them is the one host synchronisation (on a GPU) of this module."""
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) \
            or position_ids.shape[1] != length:
        raise ValueError(f"position_ids must be [{batch} or 1, {length}], got "
                         f"{tuple(position_ids.shape)}")
    positions = position_ids.to(device).expand(batch, length).reshape(-1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    starts[::length] = True
    offsets = starts.nonzero().flatten()
    return torch.cat([offsets, offsets.new_full((1,), positions.numel())]).to(torch.int32)


class SphinxMixtralSparseMoe(nn.Module):
    """A Mixtral sparse-MoE block (transformers' ``MixtralSparseMoeBlock``) served by
    :class:`sphinx_kernels.nn.MoEMLP`: ``forward(hidden_states [B, S, H]) -> [B, S, H]``.

    The router's semantics are transformers': logits ``x @ gate.T`` in the hidden dtype, softmax in
    float32, the top-k experts, their gates renormalised to sum to 1, and in training the jitter
    noise of ``config.router_jitter_noise`` drawn as transformers draws it. The router module is a
    ``MixtralTopKRouter`` returning its logits (``[B * S, E]``), so transformers records them for
    ``output_router_logits`` and its load-balancing loss (``router_aux_loss_coef``) is unchanged.

    Parameters: ``moe.router.weight`` ``[E, H]``, ``moe.w1`` and ``moe.w3`` ``[E, F, H]``, ``moe.w2``
    ``[E, H, F]``. The state dict is in transformers' layout: ``gate.weight``,
    ``experts.gate_up_proj`` ``[E, 2F, H]`` (the w1 rows, then the w3 rows, a copy) and
    ``experts.down_proj`` ``[E, H, F]``; ``load_state_dict`` takes that layout. So ``save_pretrained``
    writes a standard Mixtral checkpoint, and transformers' checkpoints load into the model.
    """

    def __init__(self, moe: MoEMLP, jitter_noise: float = 0.0):
        super().__init__()
        self.moe = moe
        self.jitter_noise = jitter_noise
        self.register_state_dict_post_hook(_state_dict_to_transformers)
        self.register_load_state_dict_pre_hook(_state_dict_from_transformers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise,
                                                              1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        out, _ = self.moe(hidden_states)
        return out

    def extra_repr(self) -> str:
        return f"jitter_noise={self.jitter_noise}"


_OURS = ("moe.router.weight", "moe.w1", "moe.w3", "moe.w2")
_THEIRS = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")


def _state_dict_to_transformers(module: SphinxMixtralSparseMoe, state_dict: dict, prefix: str,
                                local_metadata) -> None:
    router, w1, w3, w2 = (state_dict.pop(prefix + name) for name in _OURS)
    with torch.no_grad():
        gate_up = torch.cat([w1, w3], dim=1)
    for name, tensor in zip(_THEIRS, (router, gate_up, w2)):
        state_dict[prefix + name] = tensor


def _state_dict_from_transformers(module: SphinxMixtralSparseMoe, state_dict: dict, prefix: str,
                                  *args) -> None:
    if not all(prefix + name in state_dict for name in _THEIRS):
        return  # our own layout, or keys missing: load_state_dict reports them
    router, gate_up, w2 = (state_dict.pop(prefix + name) for name in _THEIRS)
    w1, w3 = gate_up.chunk(2, dim=1)
    for name, tensor in zip(_OURS, (router, w1, w3, w2)):
        state_dict[prefix + name] = tensor


@functools.cache
def _router_logits_class() -> type:
    """``MixtralRouterLogits``, made on first use (it subclasses a transformers class): Mixtral's
    router reduced to its logits, the router ``MoEMLP`` calls. Being a ``MixtralTopKRouter`` keeps
    it where transformers' output recorder looks for router logits."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class MixtralRouterLogits(MixtralTopKRouter):
        """``forward(x [..., H]) -> logits [N, E]`` in x's dtype (``N`` tokens)."""

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)

    MixtralRouterLogits.__module__ = __name__  # pickled by reference through __getattr__ below
    return MixtralRouterLogits


def __getattr__(name: str):
    if name == "MixtralRouterLogits":
        return _router_logits_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_sphinx_moe(model: nn.Module, *, block_size: int = 128,
                   recompute: bool = False) -> nn.Module:
    """Replaces, in place, every Mixtral sparse-MoE block of ``model`` (transformers'
    ``MixtralSparseMoeBlock``: each decoder layer's ``mlp``, ``block_sparse_moe`` in Mixtral
    checkpoints) by a :class:`SphinxMixtralSparseMoe` with the same weights: the router and down
    projections are the same tensors, the fused gate/up projection is split into ``w1`` and ``w3``.

    Args:
        model: a transformers model holding Mixtral blocks (a ``MixtralForCausalLM``, or a model
            built around one); each block's config is its nearest enclosing ``PreTrainedModel``'s.
        block_size: ``MoEMLP``'s rows per expert GEMM block (128 suits the GPU kernels; small values
            suit CPU tests).
        recompute: ``MoEMLP``'s recomputation of the expert activations in the backward.

    Call it before building the optimizer: ``w1`` and ``w3`` are new parameters. Returns ``model``.
    Raises ValueError when ``model`` has no Mixtral block, or a block's activation is not SiLU.
    """
    _require_transformers()
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    found = list(_blocks(model, MixtralSparseMoeBlock))
    if not found:
        raise ValueError(f"use_sphinx_moe: {type(model).__name__} has no Mixtral sparse-MoE block "
                         "(transformers' MixtralSparseMoeBlock)")
    for owner, parent, name, block in found:
        if owner.config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"use_sphinx_moe: the config's hidden_act is "
                             f"{owner.config.hidden_act!r}; MoEMLP's experts are SwiGLU ('silu')")
        experts = block.experts
        with torch.device("meta"):
            moe = MoEMLP(experts.hidden_dim, experts.intermediate_dim, experts.num_experts,
                         block.top_k, block_size=block_size, recompute=recompute)
            moe.router = _router_logits_class()(owner.config)
        trained = [p.requires_grad for p in (block.gate.weight, experts.gate_up_proj,
                                             experts.gate_up_proj, experts.down_proj)]
        w1, w3 = experts.gate_up_proj.detach().chunk(2, dim=1)
        moe.load_state_dict({"router.weight": block.gate.weight, "w1": w1.contiguous(),
                             "w3": w3.contiguous(), "w2": experts.down_proj}, assign=True)
        for param, requires_grad in zip((moe.router.weight, moe.w1, moe.w3, moe.w2), trained):
            param.requires_grad_(requires_grad)  # assign=True made them all trainable
        replacement = SphinxMixtralSparseMoe(moe, block.jitter_noise).train(block.training)
        setattr(parent, name, replacement)
        _record_outputs_of(owner, replacement)
    return model


def undo_sphinx_moe(model: nn.Module) -> nn.Module:
    """The inverse of :func:`use_sphinx_moe`: every :class:`SphinxMixtralSparseMoe` of ``model`` back
    to transformers' ``MixtralSparseMoeBlock`` with the current weights, in place (for
    transformers' own experts implementations; saving needs no undo). Returns ``model``."""
    _require_transformers()
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    for owner, parent, name, ours in list(_blocks(model, SphinxMixtralSparseMoe)):
        with torch.device("meta"):
            block = MixtralSparseMoeBlock(owner.config)
        moe = ours.moe
        trained = [p.requires_grad for p in (moe.router.weight, moe.w1, moe.w2)]
        block.load_state_dict(ours.state_dict(keep_vars=True), assign=True)
        for param, requires_grad in zip((block.gate.weight, block.experts.gate_up_proj,
                                         block.experts.down_proj), trained):
            param.requires_grad_(requires_grad)
        block.train(ours.training)
        setattr(parent, name, block)
        _record_outputs_of(owner, block)
    return model


def _blocks(module: nn.Module, kind: type, owner: nn.Module | None = None
            ) -> Iterator[tuple[nn.Module, nn.Module, str, nn.Module]]:
    """``(owner, parent, name, block)`` for every submodule of type ``kind`` (not looking inside
    one), ``owner`` the nearest enclosing transformers ``PreTrainedModel`` (``module`` included)."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        owner = module
    for name, child in module.named_children():
        if isinstance(child, kind):
            if owner is None:
                raise ValueError(f"{kind.__name__} {name!r} is not inside a transformers "
                                 "PreTrainedModel, whose config it needs")
            yield owner, module, name, child
        else:
            yield from _blocks(child, kind, owner)


def _record_outputs_of(owner: nn.Module, new: nn.Module) -> None:
    """transformers installs its output-recording hooks once per model, on the first forward asking
    for outputs (``output_router_logits``, ...), on the modules it has then. Modules put in after
    that get theirs here, so what they output is still recorded."""
    if not getattr(owner, "_output_capturing_hooks_installed", False):
        return
    from transformers.utils import output_capturing

    for key, specs in (owner._can_record_outputs or {}).items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, output_capturing.OutputRecorder):
                continue
            for module in new.modules():
                if isinstance(module, spec.target_class):
                    output_capturing.install_output_capuring_hook(module, key, spec.index)
