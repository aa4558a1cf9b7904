"""What every Triton launcher shares: the per-program tile budget, block rounding, the dot precision
rule, the accumulation type, the GPU capability that per-target configurations read, the log
constants of the exp2 / log2 softmaxes, and the preparation of the 1-D tensors that kernels index as
``ptr + i``."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Elements one program holds in registers per tile: rows per program fill a tile of about this many.
TILE_ELEMENTS = 4096

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(math.log(2.0))        # log(x) = log2(x) * LN2


def block_of(size: int) -> int:
    """The power of two at or above ``size`` (at least 1): a block that covers ``size`` elements."""
    return triton.next_power_of_2(max(size, 1))


def rows_per_program(width_block: int) -> int:
    """Rows of ``width_block`` elements that fill one tile."""
    return max(1, TILE_ELEMENTS // width_block)


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Tensors that kernels index as contiguous (``ptr + i`` for the 1-D offsets, index lists and
    per-channel parameters) as contiguous tensors: any strides are valid input, strided and expanded
    (stride-0) views included. A copy only of such a view (of a few bytes per entry for 1-D
    metadata); None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: float32 operands get IEEE products,
    as torch's matmul gives by default (TF32 would be ten times its error); 16-bit operands are
    exact in either mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def accumulate_type(dtype: torch.dtype):
    """The Triton type sums over ``dtype`` values are carried in (``sphinx_kernels.dtypes.
    accumulate_dtype``): float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def gpu_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of ``device``, ``(0, 0)`` off the GPU: launchers whose best tiles
    differ between GPU generations (shared memory, registers, wgmma's tile shapes) choose by it."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


# ----------------------------------------------------------------------------------------------
# Row kernels (gathers, permutations): a tile of whole rows per program, rows of at most
# MAX_ROW_BLOCK elements per step.

MAX_ROW_BLOCK = 512


def row_block(width: int) -> int:
    """Elements of one row a row kernel moves per step."""
    return min(block_of(width), MAX_ROW_BLOCK)


def row_grid(num_rows: int, width: int) -> tuple[int, int, int]:
    """``(rows per program, row block, row blocks)`` of a row kernel over ``[num_rows, width]``."""
    block = row_block(width)
    return min(rows_per_program(block), block_of(num_rows)), block, triton.cdiv(width, block)


@triton.jit
def row_tile(num_rows, width, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's tile of a ``[num_rows, width]`` row-major grid: row and column indices and
    their in-bounds masks."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return r, d, r < num_rows, d < width


@triton.jit
def store_tile(out_ptr, values, r, d, r_in, d_in, width):
    """Stores a ``[BLOCK_R, BLOCK_H]`` tile into a contiguous ``[num_rows, width]`` output."""
    tl.store(out_ptr + r[:, None].to(tl.int64) * width + d[None, :],
             values.to(out_ptr.dtype.element_ty), mask=r_in[:, None] & d_in[None, :])


@triton.jit
def swizzled_tile(num_rows, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """First row and column of this program's output tile of a ``[num_rows, width]`` GEMM output, in
    groups of GROUP_M row tiles that share each weight column tile while it is in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(width, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N
