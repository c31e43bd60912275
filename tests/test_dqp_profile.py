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


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def test_a_record_whose_format_and_v_granularity_disagree_is_refused():
    p = DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D)
    record = json.loads(p.encode())
    record["format"], record["v_granularity"] = 2, "head"
    with pytest.raises(DQPError, match="does not go with v_granularity 'head'"):
        DQPProfile.decode(_encode(record))
    record["format"], record["v_granularity"] = 3, "channel"
    with pytest.raises(DQPError, match="does not go with"):
        DQPProfile.decode(_encode(record))
    with pytest.raises(DQPError, match="v_granularity"):
        DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D, v_granularity="row")
    with pytest.raises(DQPError, match="k_granularity"):
        DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D, k_granularity="token")


def test_per_token_v_is_format_3_with_no_v_exponents():
    p = DQPProfile.calibrate(_samples(), name="m", num_layers=L, num_kv_heads=H, head_dim=D, v_granularity="token")
    record = json.loads(p.encode())
    assert record["format"] == 3 and record["v_granularity"] == "token" and record["v_exp"] == []
    back = DQPProfile.decode(p.encode())
    assert back.digest == p.digest and back.per_row(1, "V") and not back.per_row(1, "K")
    assert back.fixed(0, "V") is None and back.fixed(0, "K").shape == (H, D)
    with pytest.raises(DQPError, match="no fixed exponents"):
        p.exponents(0, "V")
    with pytest.raises(DQPError, match="outside"):
        p.per_row(L, "V")
    record["v_exp"] = [[0] * H] * L  # a per-token profile that smuggles V exponents in
    with pytest.raises(DQPError, match="v_exp"):
        DQPProfile.decode(_encode(record))
