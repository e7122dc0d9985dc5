"""FrozenGemm (engine/frozen_gemm.py): the base GEMMs on oneDNN-packed weights equal F.linear, follow every
write to the weights (merging writes through fused members' views, which only `weights_changed` reveals),
and the setting turns them off. Greedy parity with packing on is shown by every engine parity test (it is
the CPU default); tests/test_merge.py failed with stale packs before merges called weights_changed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.engine.config import EngineConfig
from loraplex.engine.frozen_gemm import FrozenGemm, can_pack, weights_changed

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch")


def _enabled() -> FrozenGemm:
    gemm = FrozenGemm()
    gemm.enabled = True
    return gemm


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_equals_linear(rows):
    torch.manual_seed(rows)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(rows, 64)
    gemm = _enabled()
    torch.testing.assert_close(gemm(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gemm(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_a_write_through_a_view_is_seen_after_weights_changed():
    fused = torch.randn(96, 64)
    member = torch.nn.Parameter(fused.data[:32], requires_grad=False)  # as FusedProjection builds it
    x, gemm = torch.randn(4, 64), _enabled()
    before = gemm(x, fused, None)
    with torch.inference_mode():
        member.copy_(torch.zeros_like(member))  # fused's own version counter does not move
    weights_changed()
    after = gemm(x, fused, None)
    assert torch.count_nonzero(after[:, :32]) == 0 and not torch.equal(before[:, :32], after[:, :32])
    torch.testing.assert_close(after, F.linear(x, fused), atol=1e-4, rtol=1e-5)


def test_an_in_place_write_to_the_weight_itself_is_seen():
    w, x, gemm = torch.randn(48, 64), torch.randn(3, 64), _enabled()
    gemm(x, w, None)
    w.mul_(2.0)
    torch.testing.assert_close(gemm(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_the_setting_decides():
    on = EngineConfig(model="m", device="cpu", dtype="float32")
    off = EngineConfig(model="m", device="cpu", dtype="float32", pack_weights="off")
    assert on.packed_gemms and not off.packed_gemms
    assert not can_pack(torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="pack_weights"):
        EngineConfig(model="m", pack_weights="yes")
