"""sphinx_kernels.nn.PatchProjector: nn.Linear and nn.LayerNorm checkpoints load unchanged, and the
module computes the reference projection of its parameters; the op itself is tested in
test_patch_projection.py."""
import re

import pytest
import torch

from sphinx_kernels.nn import PatchProjector
from sphinx_kernels.ops.patch_projection import patch_projection_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_matches_the_reference_of_its_linear_and_norm():
    module = PatchProjector(in_channels=(6, 4), out_features=16, grid=(2, 2)).to(DEVICE)
    assert sorted(module.state_dict()) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
    # nn.Linear / nn.LayerNorm checkpoints load unchanged.
    linear, norm = torch.nn.Linear(10, 16), torch.nn.LayerNorm(16)
    module.load_state_dict({**{f"proj.{k}": v for k, v in linear.state_dict().items()},
                            **{f"norm.{k}": v for k, v in norm.state_dict().items()}})
    features = [torch.randn(3, 17, 6, device=DEVICE), torch.randn(3, 4, 4, 4, device=DEVICE)]
    expected = patch_projection_reference(features, linear.weight.to(DEVICE),
                                          linear.bias.to(DEVICE), grid=2,
                                          norm_weight=norm.weight.to(DEVICE),
                                          norm_bias=norm.bias.to(DEVICE))
    torch.testing.assert_close(module(features), expected)
    plain = PatchProjector(in_channels=(6, 4), out_features=16, grid=2, norm=False)
    assert plain.norm is None
    message = "features[1] has 5 channels, in_channels[1] is 4"
    with pytest.raises(ValueError, match=re.escape(message)):
        module([features[0], torch.randn(3, 5, 4, 4, device=DEVICE)])
