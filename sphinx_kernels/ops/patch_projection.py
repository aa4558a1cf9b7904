"""``patch_projection``: the tokens of several vision encoders (ViT tokens ``[V, G + h*w, C]``, conv
maps ``[V, C, H, W]``), each resampled to one token grid, concatenated along channels, projected by
one Linear, optionally LayerNorm-ed, written as new rows or into rows of a packed sequence. No
resampled, transposed or concatenated copy of the features is made.

Backends: ``triton`` (``sphinx_kernels/triton/patch_projection.py``), ``reference``
(:func:`patch_projection_reference`; its backward is the vector-Jacobian product of the same code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sphinx_kernels._validation import (
    INDEX_DTYPES,
    INT32_MAX,
    dtype_name,
    require_device,
    require_float,
    require_index_range,
    require_tensor,
    should_check_values,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import FLOAT_DTYPES, KERNEL_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import REFERENCE, TRITON, triton_launcher

__all__ = ["patch_projection", "patch_projection_reference", "resample_reference",
           "feature_layouts", "FeatureLayout", "PATCH_PROJECTION_BACKENDS"]


@dataclass(frozen=True)
class FeatureLayout:
    """How one encoder's features map onto the common ``(gh, gw)`` grid.

    ``tokens``: token layout ``[V, G + h*w, C]`` (else a map ``[V, C, H, W]``); ``global_tokens``:
    G, 1 when a CLS token is the view's global row, 0 when the global row is the mean of the grid;
    ``height``, ``width``: the source grid; ``pool_*`` / ``repeat_*``: the integer factors per axis
    (one of each pair is 1): average ``pool_h x pool_w`` windows, or repeat each value
    ``repeat_h x repeat_w`` times.
    """

    tokens: bool
    global_tokens: int
    channels: int
    height: int
    width: int
    pool_h: int
    pool_w: int
    repeat_h: int
    repeat_w: int

    @property
    def factors(self) -> tuple[int, int, int, int]:
        return self.pool_h, self.pool_w, self.repeat_h, self.repeat_w

    def map_view(self, feature: torch.Tensor) -> torch.Tensor:
        """The source grid as a ``[V, C, H, W]`` view of ``feature`` (no copy for either layout)."""
        if not self.tokens:
            return feature
        patches = feature[:, self.global_tokens:, :]
        return patches.unflatten(1, (self.height, self.width)).permute(0, 3, 1, 2)

    def cls_view(self, feature: torch.Tensor) -> torch.Tensor | None:
        """The CLS tokens as a ``[V, C]`` view, or None without one."""
        return feature[:, 0, :] if self.global_tokens else None


def _axis_factors(size: int, target: int) -> tuple[int, int] | None:
    """(pool, repeat) taking ``size`` to ``target`` by an integer factor, or None."""
    if size >= target and size % target == 0:
        return size // target, 1
    if size < target and target % size == 0:
        return 1, target // size
    return None


def _token_grid(num_tokens: int, grid: tuple[int, int]) -> tuple[int, int, int] | None:
    """(G, h, w) of a token layout with ``num_tokens`` tokens: G in (0, 1) (0 first) and the patch
    grid ``(h, w)`` the common grid scaled by one integer factor k or 1/k on both axes."""
    grid_h, grid_w = grid
    cells = grid_h * grid_w
    for global_tokens in (0, 1):
        patches = num_tokens - global_tokens
        if patches <= 0:
            continue
        if patches % cells == 0:
            k = math.isqrt(patches // cells)
            if k * k * cells == patches:
                return global_tokens, k * grid_h, k * grid_w
        elif cells % patches == 0:
            k = math.isqrt(cells // patches)
            if k * k * patches == cells and grid_h % k == 0 and grid_w % k == 0:
                return global_tokens, grid_h // k, grid_w // k
    return None


def feature_layouts(features: Sequence[torch.Tensor], grid: tuple[int, int]) -> list[FeatureLayout]:
    """Each feature's :class:`FeatureLayout` on ``grid``, from shapes alone; ValueError if one
    cannot be resampled to it."""
    layouts = []
    for i, feature in enumerate(features):
        name = f"features[{i}]"
        if feature.dim() == 3:
            _, num_tokens, channels = feature.shape
            found = _token_grid(num_tokens, grid)
            if found is None:
                raise ValueError(
                    f"{name} has {num_tokens} tokens; a token layout [V, G + h*w, C] needs G in "
                    f"(0, 1) and a patch grid (h, w) equal to grid {grid} scaled by one integer "
                    "factor k or 1/k on both axes (e.g. a square ViT grid for a square grid)")
            global_tokens, height, width = found
        else:
            _, channels, height, width = feature.shape
            global_tokens = 0
        axes = _axis_factors(height, grid[0]), _axis_factors(width, grid[1])
        if None in axes:
            raise ValueError(f"{name} has a {height}x{width} grid; each side must be an integer "
                             f"multiple or divisor of grid {grid[0]}x{grid[1]}")
        (pool_h, repeat_h), (pool_w, repeat_w) = axes
        layouts.append(FeatureLayout(feature.dim() == 3, global_tokens, channels, height, width,
                                     pool_h, pool_w, repeat_h, repeat_w))
    return layouts


# ----------------------------------------------------------------------------------------------
# The public op


def patch_projection(features: Sequence[torch.Tensor], weight: torch.Tensor,
                     bias: torch.Tensor | None = None, *, grid: int | tuple[int, int],
                     norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                     eps: float = 1e-5, out: torch.Tensor | None = None,
                     out_rows: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Projects several encoders' features, resampled to one token grid, into the LLM width.

    For view ``v`` the output has ``T = 1 + gh * gw`` rows: the global row, then the grid cells in
    raster order. Row ``t`` of encoder ``i`` is resampled from its own grid, the rows of all
    encoders are concatenated along channels (virtually: never materialised), and
    ``y = concat @ weight.T + bias``, accumulated in float32, then ``LayerNorm(y)`` when
    ``norm_weight`` is given::

        features[0]  [V, 1 + 32*32, Ca]  (DINOv2: CLS + 32x32 patches, pooled 2x2 -> 16x16)
        features[1]  [V, Cb, 16, 16]     (ConvNeXt map; global row = its mean)
                        |  resample to grid (16, 16), concat channels: [V * 257, Ca + Cb] (virtual)
        weight       [D, Ca + Cb]        (nn.Linear layout)
        result       [V * 257, D]        or out with out[out_rows] replaced

    Args:
        features: one tensor per encoder, any strides (read in place, no ``.contiguous()``):
            a token layout ``[V, G + h*w, C_i]`` (3-D) or a map ``[V, C_i, H_i, W_i]`` (4-D); one
            dtype (float16, bfloat16, float32; float64 on the reference backend), one device, one V.
            A token layout's G and (h, w) come from its token count: G = 0 if the count fits, else
            G = 1 (a CLS token), and (h, w) must be the grid scaled by one integer factor k (or 1/k)
            on both axes, e.g. 32x32 or 16x16 or 8x8 patches for a 16x16 grid. Maps may scale each
            axis on its own. A side larger than the grid's is average-pooled by the integer factor,
            a smaller one repeated (nearest). The global row is the CLS token where there is one,
            else the mean of the whole source grid.
        weight: ``[D, sum C_i]``, the features' dtype (``nn.Linear.weight``; columns in encoder
            order).
        bias: ``[D]`` or None.
        grid: ``(gh, gw)`` or one int for a square grid; the ``V * (1 + gh * gw)`` output rows
            are int32 indices in the kernels, so they (and ``1 + gh * gw``) must be below 2^31.
        norm_weight, norm_bias: ``[D]``: LayerNorm over D with this affine transform, applied when
            ``norm_weight`` is given (``norm_bias`` needs it).
        eps: the LayerNorm epsilon, a finite float >= 0.
        out, out_rows: the packed sequence ``[R, D]`` (the features' dtype, contiguous rows not
            required) and ``[V * T]`` int32/int64 distinct rows of it in ``[0, R)``: output row
            ``m`` goes to ``out[out_rows[m]]``. Both or neither.
        backend: force one of ``PATCH_PROJECTION_BACKENDS.names``.

    Returns:
        ``[V * T, D]``, or, with ``out``, a new ``[R, D]`` tensor equal to ``out`` except at
        ``out_rows`` (functional, like ``out.index_copy(0, out_rows, y)``: ``out`` itself is not
        modified, so autograd and ``torch.compile`` see a pure op; the price is one copy of
        ``out``). Rows not listed keep ``out``'s values; views of skipped tiles are simply not
        passed in.

    Autograd: gradients for every feature in its own layout (contiguous, its shape), for ``weight``,
    ``bias``, ``norm_weight``, ``norm_bias`` (float32 accumulation, float64 for the sums over rows
    of the bias and norm gradients, rounded to their dtype) and for ``out`` (the incoming gradient
    with the ``out_rows`` rows zeroed). Features that do not require grad (frozen encoders) cost
    nothing.

    ``out_rows`` values (range, distinct) are validated on the CPU; on a GPU only with
    ``SPHINX_KERNELS_CHECK_INPUTS=1``.
    """
    grid, eps = _check_patch_projection(features, weight, bias, grid, norm_weight, norm_bias, eps,
                                        out, out_rows)
    request = PATCH_PROJECTION_BACKENDS.request(weight.device, weight.dtype)
    chosen = PATCH_PROJECTION_BACKENDS.select(request, backend)
    result, _, _, _ = _patch_projection_op(list(features), weight, bias, norm_weight, norm_bias,
                                           out, out_rows, grid[0], grid[1], eps, chosen.name)
    return result


def resample_reference(feature: torch.Tensor, layout: FeatureLayout,
                       grid: tuple[int, int]) -> torch.Tensor:
    """``[V, 1 + gh*gw, C]``: the global row and the resampled grid of one encoder."""
    grid_map = layout.map_view(feature)
    cls = layout.cls_view(feature)
    global_row = cls if cls is not None else grid_map.mean(dim=(2, 3))
    if layout.pool_h * layout.pool_w > 1:
        grid_map = F.avg_pool2d(grid_map, (layout.pool_h, layout.pool_w))
    grid_map = grid_map.repeat_interleave(layout.repeat_h, 2).repeat_interleave(layout.repeat_w, 3)
    return torch.cat([global_row[:, None, :], grid_map.flatten(2).transpose(1, 2)], dim=1)


def _reference_forward(features, weight, bias, norm_weight, norm_bias, out, out_rows, grid_h,
                       grid_w, eps):
    """(result, pre-norm rows or ``[0, D]``, mean, rstd): the op's outputs, differentiable."""
    grid = (grid_h, grid_w)
    layouts = feature_layouts(features, grid)
    rows = torch.cat([resample_reference(f, layout, grid)
                      for f, layout in zip(features, layouts)], dim=-1)
    y = F.linear(rows.flatten(0, 1), weight, bias)
    stat_dtype = accumulate_dtype(y.dtype)
    if norm_weight is not None:
        result, mean, rstd = torch.native_layer_norm(y, [y.shape[1]], norm_weight, norm_bias, eps)
        pre_norm, mean, rstd = y, mean.reshape(-1).to(stat_dtype), rstd.reshape(-1).to(stat_dtype)
    else:
        result, pre_norm = y, y.new_empty((0, y.shape[1]))
        mean, rstd = (y.new_empty((0,), dtype=stat_dtype) for _ in range(2))
    if out is not None:
        result = out.index_copy(0, out_rows.long(), result)  # index_copy takes int64 indices only
    return result, pre_norm, mean, rstd


def patch_projection_reference(features: Sequence[torch.Tensor], weight: torch.Tensor,
                               bias: torch.Tensor | None = None, *, grid: int | tuple[int, int],
                               norm_weight: torch.Tensor | None = None,
                               norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
                               out: torch.Tensor | None = None,
                               out_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch ``patch_projection`` (pooling, repeat, concatenation, Linear, LayerNorm,
    index_copy), differentiable by autograd: the oracle of the tests (run it in float64)."""
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return _reference_forward(list(features), weight, bias, norm_weight, norm_bias, out, out_rows,
                              grid[0], grid[1], eps)[0]


def _reference_backward(grad, features, weight, bias, norm_weight, norm_bias, out_rows, pre_norm,
                        mean, rstd, grid_h, grid_w, eps, needs):
    """The vector-Jacobian product of the reference forward (torch.func), for the needed inputs."""
    grad_rows = grad if out_rows is None else grad.index_select(0, out_rows)

    inputs = [*features, weight, bias, norm_weight, norm_bias]
    wanted = [i for i, need in enumerate(needs) if need]

    def project(*differentiated):
        args = list(inputs)
        for i, tensor in zip(wanted, differentiated):
            args[i] = tensor
        num = len(features)
        return _reference_forward(args[:num], *args[num:], None, None, grid_h, grid_w, eps)[0]

    _, vjp = torch.func.vjp(project, *(inputs[i] for i in wanted))
    return [g.contiguous() for g in vjp(grad_rows)]


# Impl: forward(features, weight, bias, norm_weight, norm_bias, out, out_rows, grid_h, grid_w, eps)
# -> (result, pre-norm rows, mean, rstd); backward(grad, features, weight, bias, norm_weight,
# norm_bias, out_rows, pre_norm, mean, rstd, grid_h, grid_w, eps, needs) -> the needed gradients.
# Every backend serves every input that passes validation.
PATCH_PROJECTION_BACKENDS = OpBackends("patch_projection", [
    Backend(TRITON, Impl(triton_launcher("patch_projection", "patch_projection_forward"),
                         triton_launcher("patch_projection", "patch_projection_backward")),
            KERNEL_DTYPES),
    Backend(REFERENCE, Impl(_reference_forward, _reference_backward), FLOAT_DTYPES),
])


@kernel_op("sphinx_kernels::patch_projection")
def _patch_projection_op(features: list[torch.Tensor], weight: torch.Tensor,
                         bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                         norm_bias: torch.Tensor | None, out: torch.Tensor | None,
                         out_rows: torch.Tensor | None, grid_h: int, grid_w: int, eps: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """(result, pre-norm rows ``[M, D]`` (``[0, D]`` without a norm), float32 mean and rstd ``[M]``
    (``[0]``)): the last three are saved for the backward."""
    outputs = PATCH_PROJECTION_BACKENDS[backend].impl.forward(
        features=features, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias,
        out=out, out_rows=out_rows, grid_h=grid_h, grid_w=grid_w, eps=eps)
    return tuple(t.contiguous() for t in outputs)


@_patch_projection_op.register_fake
def _(features, weight, bias, norm_weight, norm_bias, out, out_rows, grid_h, grid_w, eps, backend):
    num_rows, width = features[0].shape[0] * (1 + grid_h * grid_w), weight.shape[0]
    result = weight.new_empty(out.shape if out is not None else (num_rows, width))
    saved = num_rows if norm_weight is not None else 0
    stat_dtype = accumulate_dtype(weight.dtype)
    return (result, weight.new_empty((saved, width)), weight.new_empty((saved,), dtype=stat_dtype),
            weight.new_empty((saved,), dtype=stat_dtype))


@kernel_op("sphinx_kernels::patch_projection_backward")
def _patch_projection_backward_op(grad: torch.Tensor, features: list[torch.Tensor],
                                  weight: torch.Tensor, bias: torch.Tensor | None,
                                  norm_weight: torch.Tensor | None,
                                  norm_bias: torch.Tensor | None, out_rows: torch.Tensor | None,
                                  pre_norm: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                  grid_h: int, grid_w: int, eps: float, needs: list[bool],
                                  backend: str) -> list[torch.Tensor]:
    """The gradients of the inputs flagged in ``needs`` (per feature, then weight, bias, norm
    weight, norm bias), in that order."""
    return PATCH_PROJECTION_BACKENDS[backend].impl.backward(
        grad=grad, features=features, weight=weight, bias=bias, norm_weight=norm_weight,
        norm_bias=norm_bias, out_rows=out_rows, pre_norm=pre_norm, mean=mean, rstd=rstd,
        grid_h=grid_h, grid_w=grid_w, eps=eps, needs=needs)


@_patch_projection_backward_op.register_fake
def _(grad, features, weight, bias, norm_weight, norm_bias, out_rows, pre_norm, mean, rstd, grid_h,
      grid_w, eps, needs, backend):
    inputs = [*features, weight, bias, norm_weight, norm_bias]
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t, need in zip(inputs, needs) if need]


def _setup_context(ctx, inputs, output):
    (features, weight, bias, norm_weight, norm_bias, out, out_rows, grid_h, grid_w, eps,
     backend) = inputs
    _, pre_norm, mean, rstd = output
    ctx.save_for_backward(*features, weight, bias, norm_weight, norm_bias, out_rows, pre_norm, mean,
                          rstd)
    ctx.num_features = len(features)
    optional = (bias, norm_weight, norm_bias)
    ctx.needs = ([f.requires_grad for f in features] + [weight.requires_grad]
                 + [t is not None and t.requires_grad for t in optional])
    ctx.out_needs_grad = out is not None and out.requires_grad
    ctx.args = (grid_h, grid_w, eps, backend)
    ctx.mark_non_differentiable(pre_norm, mean, rstd)
    # pre_norm, mean and rstd get None in the backward, not zero-filled gradients.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_pre_norm, _grad_mean, _grad_rstd):
    saved = ctx.saved_tensors
    features = list(saved[:ctx.num_features])
    weight, bias, norm_weight, norm_bias, out_rows, pre_norm, mean, rstd = saved[ctx.num_features:]
    grads = iter(_patch_projection_backward_op(
        grad, features, weight, bias, norm_weight, norm_bias, out_rows, pre_norm, mean, rstd,
        *ctx.args[:3], ctx.needs, ctx.args[3]) if any(ctx.needs) else [])
    feature_grads, weight_grad, bias_grad, norm_weight_grad, norm_bias_grad = (
        [next(grads) if need else None for need in ctx.needs[:ctx.num_features]],
        *(next(grads) if need else None for need in ctx.needs[ctx.num_features:]))
    # The replaced rows of out received nothing of it: their gradient went to the projection.
    out_grad = grad.index_fill(0, out_rows.long(), 0) if ctx.out_needs_grad else None
    return (feature_grads, weight_grad, bias_grad, norm_weight_grad, norm_bias_grad, out_grad,
            None, None, None, None, None)


_patch_projection_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_patch_projection(features, weight, bias, grid, norm_weight, norm_bias, eps, out,
                            out_rows) -> tuple[tuple[int, int], float]:
    """Validates the call before any launch; returns the grid as ``(gh, gw)`` and eps as a
    float."""
    message = f"grid must be a positive int or a pair (gh, gw) of them, got {grid!r}"
    grid = (grid, grid) if isinstance(grid, int) else grid
    if not isinstance(grid, (tuple, list)) or not all(
            isinstance(g, int) and not isinstance(g, bool) for g in grid):
        raise TypeError(message)
    if len(grid) != 2 or not all(g > 0 for g in grid):
        raise ValueError(message)
    grid = tuple(grid)
    # Output rows are int32 indices in the kernels (and sizes of the op's schema).
    tokens_per_view = 1 + grid[0] * grid[1]
    if tokens_per_view > INT32_MAX:
        raise ValueError(f"grid must give 1 + gh * gw < 2^31 rows per view, got {grid}")
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list or tuple of tensors, got "
                        f"{type(features).__name__}")
    if not features:
        raise ValueError("features must hold at least one tensor")
    weight = require_tensor("weight", weight, dims=2, dtypes=FLOAT_DTYPES)
    for i, feature in enumerate(features):
        name = f"features[{i}]"
        require_tensor(name, feature)
        if feature.dim() not in (3, 4):
            raise ValueError(f"{name} must be tokens [V, G + h*w, C] or a map [V, C, H, W], got "
                             f"shape {tuple(feature.shape)}")
        if feature.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(feature.dtype)} but weight has "
                            f"{dtype_name(weight.dtype)}; they must match")
        require_device(name, feature, weight.device, "weight")
        if feature.shape[0] != features[0].shape[0]:
            raise ValueError(f"{name} has V = {feature.shape[0]} views but features[0] has "
                             f"{features[0].shape[0]}; every encoder must see the same views")
    num_rows = features[0].shape[0] * tokens_per_view
    if num_rows > INT32_MAX:
        raise ValueError(f"features hold V = {features[0].shape[0]} views of 1 + gh * gw = "
                         f"{tokens_per_view} rows: {num_rows} rows, more than int32 row indices "
                         "address (2^31 - 1)")
    layouts = feature_layouts(features, grid)
    for i, layout in enumerate(layouts):
        if layout.channels < 1:
            raise ValueError(f"features[{i}] has no channels")
    channels = [layout.channels for layout in layouts]
    if weight.shape[1] != sum(channels):
        raise ValueError(f"weight has in_features {weight.shape[1]} but the features' channels sum "
                         f"to {sum(channels)} ({' + '.join(map(str, channels))})")
    width = weight.shape[0]
    if width < 1:
        raise ValueError(f"weight must have at least one output row, got shape "
                         f"{tuple(weight.shape)}")
    for name, param in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if param is None:
            continue
        require_tensor(name, param, dims=1, dtypes=[weight.dtype])
        require_device(name, param, weight.device, "weight")
        if param.shape[0] != width:
            raise ValueError(f"{name} must be [D] = [{width}] (D from weight), got "
                             f"{tuple(param.shape)}")
    if norm_bias is not None and norm_weight is None:
        raise ValueError("norm_bias needs norm_weight: the LayerNorm is applied when norm_weight "
                         "is given")
    eps = require_float("eps", eps, minimum=0.0)
    if (out is None) != (out_rows is None):
        raise ValueError("out and out_rows go together: pass both (write rows into out) or neither")
    if out is not None:
        require_tensor("out", out, dims=2, dtypes=[weight.dtype])
        require_device("out", out, weight.device, "weight")
        if out.shape[1] != width:
            raise ValueError(f"out must be [R, D] with D = {width} (from weight), got "
                             f"{tuple(out.shape)}")
        require_tensor("out_rows", out_rows, dims=1, dtypes=INDEX_DTYPES)
        require_device("out_rows", out_rows, weight.device, "weight")
        if out_rows.shape[0] != num_rows:
            raise ValueError(f"out_rows must have one entry per output row, V * (1 + gh*gw) = "
                             f"{num_rows}, got {out_rows.shape[0]}")
        require_index_range("out_rows", out_rows, out.shape[0], "R", "R from out")
        if should_check_values(out_rows) and num_rows:
            if torch.unique(out_rows).shape[0] != num_rows:
                raise ValueError("out_rows must be distinct: a repeated row would be written twice")
    return grid, eps
