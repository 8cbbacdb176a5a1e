"""The torch TV-L1 solver: known motion, batches, the per-pair stop, the backend wiring."""

import numpy as np
import pytest
import torch
from datp_testing import assert_close
from flows.test_compute import shifted_texture

from datp.flows import tvl1_torch
from datp.flows.compute import FLOW_PRESETS, FlowComputer, compute_flow
from datp.flows.tvl1_torch import tvl1_flow

TUNED = FLOW_PRESETS["tvl1"]["tuned"]


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dx, dy", [(3, 0), (0, -2)])
def test_known_shift_gives_median_flow(dx, dy):
    prev, nxt = shifted_texture(dx, dy, size=64)
    flow = tvl1_flow(prev, nxt, TUNED)[0].numpy()
    median = np.median(flow[12:-12, 12:-12].reshape(-1, 2), axis=0)
    assert np.abs(median - [dx, dy]).max() < 0.1, f"median flow {median}, expected ({dx}, {dy})"


def test_batch_equals_one_by_one_and_pairs_stop_on_their_own(monkeypatch):
    pairs = [shifted_texture(3, 0, size=48), shifted_texture(0, 0, size=48), shifted_texture(-1, 2, size=48)]
    prevs, nexts = np.stack([p for p, _ in pairs]), np.stack([n for _, n in pairs])
    params = {**TUNED, "scalesNumber": 2}
    iterations = []
    real = tvl1_torch._iteration

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        iterations.append(args[4].shape[0])
        return out

    monkeypatch.setattr(tvl1_torch, "_iteration", counting)
    together = tvl1_flow(prevs, nexts, params)
    in_batch = len(iterations)
    alone = []
    for prev, nxt in pairs:
        iterations.clear()
        alone.append((tvl1_flow(prev, nxt, params)[0], len(iterations)))
    for i, (flow, _) in enumerate(alone):
        assert_close(together[i], flow, atol=1e-5, what=f"pair {i} in a batch vs alone")
    counts = [n for _, n in alone]
    # identical frames converge at once, moving ones take longer: the batch runs as long as the
    # slowest pair, and the others were frozen, not iterated further (else they would differ)
    assert len(set(counts)) > 1 and in_batch == max(counts), f"alone {counts}, batch {in_batch}"


def test_identical_frames_give_zero_flow():
    prev, _ = shifted_texture(0, 0, size=32)
    assert float(tvl1_flow(prev, prev, TUNED).abs().max()) == 0.0


def test_rejects_what_it_does_not_implement():
    prev, nxt = shifted_texture(1, 0, size=32)
    with pytest.raises(ValueError, match="gamma 0.5: the torch TV-L1 implements gamma = 0 only"):
        tvl1_flow(prev, nxt, {**TUNED, "gamma": 0.5})
    with pytest.raises(ValueError, match="frames differ in size"):
        tvl1_flow(prev, nxt[:-1], TUNED)


def test_flow_computer_torch_backend():
    prev, nxt = shifted_texture(3, 0, size=48)
    computer = FlowComputer(preset="tuned", backend="torch", device="cpu")
    flow = computer(prev, nxt)
    assert flow.shape == (48, 48, 2) and flow.dtype == np.float32
    assert_close(flow, tvl1_flow(prev, nxt, TUNED)[0], what="FlowComputer vs tvl1_flow")
    assert_close(compute_flow(prev, nxt, preset="tuned", backend="torch"), flow, what="compute_flow")
    two = computer.pairs([(prev, nxt), (nxt, prev)])
    assert_close(two[0], flow, atol=1e-5, what="pairs()[0] vs one call")


def test_backend_rules():
    with pytest.raises(ValueError, match="backend 'torch' computes tvl1 only, not 'dis'"):
        FlowComputer(algorithm="dis", backend="torch")
    with pytest.raises(ValueError, match=r"unknown flow backend 'cuda'; choose from \['opencv', 'torch'\]"):
        FlowComputer(backend="cuda")
    with pytest.raises(ValueError, match="the opencv backend runs on the CPU"):
        FlowComputer(backend="opencv", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_equals_cpu():
    prev, nxt = shifted_texture(3, 1, size=64)
    cpu = tvl1_flow(prev, nxt, TUNED)
    gpu = tvl1_flow(prev, nxt, TUNED, device="cuda").cpu()
    assert float((cpu - gpu).norm(dim=-1).median()) < 0.01
