"""Every name that other code imported from the kernel library before it took one module per op
(issue 14) still imports from the same module; and every op module names itself in ``__all__``."""
import importlib
import pkgutil

import pytest

import sphinx_kernels.ops

# Module -> the public names it held (its functions, classes, constants and __all__), listed by hand
# from the tree before the reshape.
PUBLIC_NAMES = {
    "sphinx_kernels": [
        "BackendUnavailableError", "Gating", "IGNORE_INDEX", "ImageSpec", "LayoutInputs",
        "PackedLayout", "Packing", "RoutingPlan", "SOURCE_IMAGE_BEGIN", "SOURCE_IMAGE_END",
        "SOURCE_PADDING", "SOURCE_SKIP", "SOURCE_TEXT", "SOURCE_VISUAL", "SampleSpec",
        "__version__", "apply_rotary", "find_padding_tiles", "gather_rows", "layout_inputs",
        "moe_expert_mlp", "moe_permute", "moe_routing", "moe_unpermute", "nn",
        "pack_by_token_budget", "patch_projection", "plan_layout", "topk_gating",
        "varlen_attention"],
    "sphinx_kernels.nn": [
        "MoEAux", "MoEMLP", "PatchProjector", "VarlenSelfAttention", "moe_mlp_from_mixtral",
        "moe_mlp_to_mixtral", "rotary_tables"],
    "sphinx_kernels.backends": [
        "Backend", "BackendUnavailableError", "CPP", "CUDA", "ENV_BACKEND", "FLOAT_DTYPES",
        "OpBackends", "Platform", "REFERENCE", "Request", "TRITON", "forced_backend",
        "native_extension", "native_ops", "triton_interpreted"],
    "sphinx_kernels.varlen": [
        "ATTENTION_DTYPES", "FIND_PADDING_TILES_BACKENDS", "FLASH_ATTN", "FLASH_DTYPES",
        "GATHER_ROWS_BACKENDS", "IMAGE_DTYPES", "MAX_ATTENTION_HEAD_DIM", "MAX_GATHER_SOURCES",
        "TORCH_FLASH", "VARLEN_ATTENTION_BACKENDS", "find_padding_tiles",
        "find_padding_tiles_reference", "gather_rows", "gather_rows_reference", "varlen_attention",
        "varlen_attention_reference"],
    "sphinx_kernels.layout": [
        "IGNORE_INDEX", "ImageSpec", "LayoutInputs", "PACK_BY_TOKEN_BUDGET_BACKENDS",
        "PLAN_LAYOUT_BACKENDS", "PackedLayout", "Packing", "SOURCE_IMAGE_BEGIN", "SOURCE_IMAGE_END",
        "SOURCE_PADDING", "SOURCE_SKIP", "SOURCE_TEXT", "SOURCE_VISUAL", "SampleSpec",
        "layout_inputs", "pack_by_token_budget", "pack_by_token_budget_reference", "plan_layout",
        "plan_layout_reference"],
    "sphinx_kernels.rotary": [
        "APPLY_ROTARY_BACKENDS", "ROTARY_DTYPES", "apply_rotary", "apply_rotary_reference"],
    "sphinx_kernels.projection": [
        "FeatureLayout", "KERNEL_DTYPES", "PATCH_PROJECTION_BACKENDS", "feature_layouts",
        "patch_projection", "patch_projection_reference"],
    "sphinx_kernels.moe": [
        "GATING_DTYPES", "Gating", "MAX_NATIVE_ROUTING_EXPERTS", "MLP_DTYPES",
        "MOE_EXPERT_MLP_BACKENDS", "MOE_PERMUTE_BACKENDS", "MOE_ROUTING_BACKENDS",
        "MOE_UNPERMUTE_BACKENDS", "RoutingPlan", "TOPK_GATING_BACKENDS", "moe_expert_mlp",
        "moe_expert_mlp_reference", "moe_permute", "moe_permute_reference", "moe_routing",
        "moe_routing_reference", "moe_unpermute", "moe_unpermute_reference", "padded_rows_bound",
        "topk_gating", "topk_gating_reference"],
    "sphinx_kernels.info": ["OPS", "report"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in PUBLIC_NAMES.items()
                                         for n in names])
def test_name_still_imports(module, name):
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name} fails"


def test_the_family_modules_re_export_the_op_modules_objects():
    """The old paths name the very objects of the op modules, not copies."""
    from sphinx_kernels import moe, varlen
    from sphinx_kernels.ops import gather_rows, moe_routing
    assert varlen.GATHER_ROWS_BACKENDS is gather_rows.GATHER_ROWS_BACKENDS
    assert moe.RoutingPlan is moe_routing.RoutingPlan


def test_every_op_module_declares_its_public_names():
    for info in pkgutil.iter_modules(sphinx_kernels.ops.__path__):
        module = importlib.import_module(f"sphinx_kernels.ops.{info.name}")
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{info.name}.__all__ names what it lacks: {missing}"
