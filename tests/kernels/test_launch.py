"""PreparedLaunch's own checks (its direct calls are tested on a GPU in test_paged_attention.py)."""

import pytest
import torch
import triton
import triton.language as tl

from fieldprint.kernels.launch import PreparedLaunch


@triton.jit
def _scale(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)


def test_a_launch_fills_its_slots_in_order_and_refuses_a_wrong_count():
    x, out = torch.arange(40, dtype=torch.float32), torch.empty(40)
    launch = PreparedLaunch(_scale, (3,), [None, None, 40, 2.0], {"BLOCK": 16}, {}, (0, 1), x.device)
    launch.launch(x, out)
    assert torch.equal(out, x * 2)
    with pytest.raises(ValueError, match="takes 2 tensors"):
        launch.launch(x)
    assert not launch.direct  # direct calls are for compiled kernels on a GPU


def test_a_launch_refuses_constexprs_that_do_not_match_the_kernel():
    with pytest.raises(ValueError, match="constexprs must be exactly"):
        PreparedLaunch(_scale, (1,), [None, None, 40, 2.0], {}, {}, (0, 1), torch.device("cpu"))
    with pytest.raises(ValueError, match="constexprs must be exactly"):
        PreparedLaunch(_scale, (1,), [None, None, 40], {"BLOCK": 16, "factor": 2.0}, {}, (0, 1), torch.device("cpu"))
