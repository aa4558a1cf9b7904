"""Import of a released SPHINX model, whole, from its LLaMA2-Accessory checkpoint into
:class:`SphinxX`.

The shards are merged by ``sphinx_model.accessory.load_accessory_shards`` (``weights_only=True``;
a pickle carrying code is refused), the LLM half is mapped by
``sphinx_model.accessory.accessory_llm_state_dict``, and the multimodal half (key names from
``accessory/model/LLM/llama_ens5_light.py``, under the ``llma.`` prefix) as follows:

    visual_proj.0.weight  [H, 3072 + 1536]  -> projector.proj.weight: the reference concatenates
                                               ConvNeXt's channels first, ours DINOv2's, so the
                                               column blocks are swapped
    visual_proj.0.bias, visual_proj.1.*     -> projector.proj.bias, projector.norm.*
    start_img, end_img    [1, 1, H]         -> image_begin, image_end  [H]
    openclip_convnext_xxl.*                 -> vision.convnext (timm's ConvNeXt filter)
    dinov2_vitg14.*                         -> vision.dinov2 (the original DINOv2 layout through
                                               timm's filter, the 37x37 position grid resampled
                                               as DINOv2 does at 224 px)

The reference has no skip token (it never skips a tile): ``skip_token`` keeps its initialisation
(uniform [0, 1), as the reference's image markers) and needs training. Any other key is an error
naming it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sphinx_model.accessory import (
    ACCESSORY_PREFIX,
    accessory_llm_config,
    accessory_llm_keys,
    accessory_llm_state_dict,
    load_accessory_shards,
)
from sphinx_model.config import SphinxConfig
from sphinx_model.sphinx import SphinxX
from sphinx_model.vision import check_state_keys, convnext_state_dict, dinov2_state_dict

__all__ = ["accessory_sphinx_state_dict", "load_accessory_sphinx"]

_CONVNEXT = "openclip_convnext_xxl."
_DINOV2 = "dinov2_vitg14."


def accessory_sphinx_state_dict(merged: Mapping[str, torch.Tensor], model: SphinxX,
                                prefix: str = ACCESSORY_PREFIX) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` but ``skip_token``, under its :class:`SphinxX` name, from a merged
    Accessory state dict (:func:`~sphinx_model.accessory.load_accessory_shards`). ``model`` (built
    on the meta device is enough) gives the config and the timm modules the filters need.
    Missing or unexpected keys and wrong shapes are ``ValueError`` naming them."""
    cfg = model.config

    def take(key: str) -> torch.Tensor:
        if prefix + key not in merged:
            raise ValueError(f"accessory checkpoint: missing key {prefix + key!r}")
        used.add(prefix + key)
        return merged[prefix + key]

    used = set(accessory_llm_keys(cfg.llm, prefix))
    state = {"llm." + k: v for k, v in accessory_llm_state_dict(merged, cfg.llm, prefix).items()}
    weight = take("visual_proj.0.weight")
    split = cfg.vision.convnext_channels
    state["projector.proj.weight"] = torch.cat([weight[:, split:], weight[:, :split]], dim=1)
    state["projector.proj.bias"] = take("visual_proj.0.bias")
    state["projector.norm.weight"] = take("visual_proj.1.weight")
    state["projector.norm.bias"] = take("visual_proj.1.bias")
    state["image_begin"] = take("start_img").reshape(-1)
    state["image_end"] = take("end_img").reshape(-1)
    for name, source, convert, module in (
            ("dinov2", _DINOV2, dinov2_state_dict, model.vision.dinov2),
            ("convnext", _CONVNEXT, convnext_state_dict, model.vision.convnext)):
        encoder = {k[len(prefix + source):]: v for k, v in merged.items()
                   if k.startswith(prefix + source)}
        used.update(prefix + source + k for k in encoder)
        converted = convert(encoder, module)
        check_state_keys(module.state_dict(), converted, f"accessory checkpoint {prefix}{source}*")
        state.update((f"vision.{name}.{k}", v) for k, v in converted.items())
    unexpected = sorted(set(merged) - used)
    if unexpected:
        raise ValueError(f"accessory checkpoint: unexpected keys {', '.join(unexpected)}")
    expected = {k: v for k, v in model.checkpoint_state().items() if k != "skip_token"}
    check_state_keys(expected, state, "accessory checkpoint")
    return state


def load_accessory_sphinx(path: str | Path, cfg: SphinxConfig | None = None, *,
                          params: Mapping[str, Any] | None = None,
                          dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None,
                          prefix: str = ACCESSORY_PREFIX) -> SphinxX:
    """A :class:`SphinxX` from a LLaMA2-Accessory SPHINX checkpoint directory
    (``consolidated.NN-of-MM.model.pth``).

    Args:
        path: the directory.
        cfg: the model's config; None: the real encoders (``VisionConfig()``, as the released
            SPHINX models: ConvNeXt-XXL at 512 px and DINOv2-g/14 at 224 px per view, 2x2 tiles)
            and the LLM config read from the tensors and ``params``.
        params: Accessory's ``ModelArgs`` (``n_heads``, ``norm_eps``, ``rope_theta``,
            ``max_seq_len``); None: the directory's ``config.json`` (needed only without ``cfg``).
        dtype: of every floating tensor; None: that of the checkpoint's token embedding.
        device: where the model is built (default the CPU); built on the meta device and every
            tensor assigned once.
    """
    merged = load_accessory_shards(path, prefix)
    if cfg is None:
        if params is None:
            config_file = Path(path) / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file}: no config.json; pass params (n_heads, "
                                        "...) or cfg")
            params = json.loads(config_file.read_text())
        cfg = SphinxConfig(llm=accessory_llm_config(merged, params, prefix))
    with torch.device("meta"):
        model = SphinxX(cfg)
    state = accessory_sphinx_state_dict(merged, model, prefix)
    dtype = dtype or state["llm.embed_tokens.weight"].dtype
    device = torch.device(device or "cpu")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    skip = torch.empty(cfg.llm.hidden_size, dtype=dtype, device=device)
    state["skip_token"] = torch.nn.init.uniform_(skip, 0.0, 1.0)  # absent from the reference
    model.assign_state(state, device)
    return model
