"""``python -m sphinx_kernels.info``: what is built, and which backend serves what on this
machine."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

import sphinx_kernels
from sphinx_kernels.backends import OpBackends
from sphinx_kernels.ops.apply_rotary import APPLY_ROTARY_BACKENDS
from sphinx_kernels.ops.find_padding_tiles import FIND_PADDING_TILES_BACKENDS
from sphinx_kernels.ops.gather_rows import GATHER_ROWS_BACKENDS
from sphinx_kernels.ops.moe_expert_mlp import MOE_EXPERT_MLP_BACKENDS
from sphinx_kernels.ops.moe_permute import MOE_PERMUTE_BACKENDS
from sphinx_kernels.ops.moe_routing import MOE_ROUTING_BACKENDS
from sphinx_kernels.ops.moe_unpermute import MOE_UNPERMUTE_BACKENDS
from sphinx_kernels.ops.pack_by_token_budget import PACK_BY_TOKEN_BUDGET_BACKENDS
from sphinx_kernels.ops.patch_projection import PATCH_PROJECTION_BACKENDS
from sphinx_kernels.ops.plan_layout import PLAN_LAYOUT_BACKENDS
from sphinx_kernels.ops.topk_gating import TOPK_GATING_BACKENDS
from sphinx_kernels.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS
from sphinx_kernels.platforms import native_extension, triton_interpreted

# Every public op's backends, with the dtype each is probed with (its main input's); the other
# features of a request take their type's defaults (a typical training call).
OPS: tuple[tuple[OpBackends, torch.dtype], ...] = (
    # family 1: packed sequences
    (GATHER_ROWS_BACKENDS, torch.float32),
    (FIND_PADDING_TILES_BACKENDS, torch.float32),
    (VARLEN_ATTENTION_BACKENDS, torch.bfloat16),
    (APPLY_ROTARY_BACKENDS, torch.float32),
    (PLAN_LAYOUT_BACKENDS, torch.int64),
    (PACK_BY_TOKEN_BUDGET_BACKENDS, torch.int64),
    # family 2: patch projection
    (PATCH_PROJECTION_BACKENDS, torch.float32),
    # family 3: mixture of experts
    (TOPK_GATING_BACKENDS, torch.float32),
    (MOE_ROUTING_BACKENDS, torch.int32),
    (MOE_PERMUTE_BACKENDS, torch.float32),
    (MOE_UNPERMUTE_BACKENDS, torch.float32),
    (MOE_EXPERT_MLP_BACKENDS, torch.float32),
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"sphinx_kernels {sphinx_kernels.__version__} ({_version('sphinx-kernels')} installed)",
        f"python         {platform.python_version()}",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton         {_version('triton')}"
        + (" (interpreter: TRITON_INTERPRET=1)" if triton_interpreted() else ""),
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"gpu {i}          {torch.cuda.get_device_name(i)} "
                         f"(compute capability {cap[0]}.{cap[1]})")
        devices.append(torch.device("cuda"))
    else:
        lines.append("gpu            none")
    ext = native_extension()
    if ext is None:
        lines.append("_C             not built (Triton and reference backends only)")
    else:
        cuda = f"CUDA kernels for sm {ext.cuda_archs}" if ext.with_cuda else "no CUDA kernels"
        lines.append(f"_C             C++ CPU kernels, {cuda}")
    lines.append("")
    lines.append("op / device: backend status, in priority order")
    for op, dtype in OPS:
        for device in devices:
            reasons = op.reasons(op.request(device, dtype))
            status = ", ".join(f"{name} {'ok' if not why else '(' + '; '.join(why) + ')'}"
                               for name, why in reasons.items())
            lines.append(f"  {op.op} / {device.type}: {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
