import json

import numpy as np
import pytest
import torch

from fieldprint.dqp_profile import DQPProfile
from fieldprint.errors import DQPError

L, H, D = 2, 2, 8


def _samples(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # channels of very different ranges: per-channel scales must follow them
    span = torch.logspace(-2, 1, D)
    return [{(l, kind): torch.randn(32, H, D, generator=g) * span for l in range(L) for kind in ("K", "V")}]


def test_per_head_v_keeps_format_1_bytes_and_digest():
    p = DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D)
    record = json.loads(p.encode())
    assert record["format"] == 1 and "v_granularity" not in record
    assert np.array(record["v_exp"]).shape == (L, H)
    assert DQPProfile.decode(p.encode()).digest == p.digest


def test_per_channel_v_is_format_2_and_follows_each_channel():
    p = DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D, v_granularity="channel")
    record = json.loads(p.encode())
    assert record["format"] == 2 and record["v_granularity"] == "channel"
    back = DQPProfile.decode(p.encode())
    assert back.digest == p.digest and back.v_granularity == "channel"
    e = p.exponents(0, "V")
    assert e.shape == (H, D) and e[:, -1].min() > e[:, 0].max()  # the wide channels get larger scales
    per_head = DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D)
    assert (per_head.exponents(0, "V") >= e).all() and per_head.digest != p.digest


def test_a_format_2_record_claiming_per_head_v_is_not_canonical():
    p = DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D)
    record = json.loads(p.encode())
    record["format"], record["v_granularity"] = 2, "head"
    with pytest.raises(DQPError, match="canonical"):
        DQPProfile.decode(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(DQPError, match="v_granularity"):
        DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D, v_granularity="token")
