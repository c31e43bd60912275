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
    """The first launch goes through Triton; on a GPU the later ones call the compiled kernel directly."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    x = torch.arange(40, dtype=torch.float32, device=dev)
    launch = PreparedLaunch(_scale, (3,), [None, None, 40, 2.0], {"BLOCK": 16}, {}, (0, 1), dev)
    for i in range(3):
        out = torch.full_like(x, float("nan"))
        launch.launch(x + i, out)
        assert torch.equal(out, (x + i) * 2)
        assert launch.direct == (dev.type == "cuda"), launch.why_not_direct
    with pytest.raises(ValueError, match="takes 2 tensors"):
        launch.launch(x)


def test_a_launch_refuses_constexprs_that_do_not_match_the_kernel():
    with pytest.raises(ValueError, match="constexprs must be exactly"):
        PreparedLaunch(_scale, (1,), [None, None, 40, 2.0], {}, {}, (0, 1), torch.device("cpu"))
    with pytest.raises(ValueError, match="constexprs must be exactly"):
        PreparedLaunch(_scale, (1,), [None, None, 40], {"BLOCK": 16, "factor": 2.0}, {}, (0, 1), torch.device("cpu"))
