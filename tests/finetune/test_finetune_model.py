"""datp.finetune.model: TSN consensus, DATP gradients into the backbone, every head, BN freezing,
parameter groups, and the config's options and schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from datp.finetune.config import FinetuneConfig, lr_factor, parse_ints
from datp.finetune.model import build_model, param_groups
from datp.pool.heads import HEADS
from ft_fixtures import tiny
from datp_testing import assert_close, one_thread  # noqa: F401 (one_thread: an autouse fixture)

SMALL_OPTIONS = {"datp": ("input=softmax",), "lstm-attn": ("hidden=16",), "self-attn": ("attn_hidden=8",),
                 "joint-attn": ("attn_hidden=8",)}


def _cfg(tmp_path, **changes):
    return tiny(tmp_path / "run", **changes)


def test_avg_head_is_the_tsn_consensus_of_the_backbone_logits(tmp_path):
    model, kwargs, _ = build_model(_cfg(tmp_path, head="avg"), 3)
    assert kwargs["score_source"] == "cached"
    model.eval()
    x = torch.randn(2, 4, 3, 56, 56)
    with torch.no_grad():
        _, per_image = model.backbone(x.flatten(0, 1))  # (8, 3)
        out = model(x)
    assert_close(out.logits, per_image.view(2, 4, 3).mean(1), atol=1e-6)
    assert_close(out.weights, torch.full((2, 4), 0.25))


def test_datp_gradient_reaches_the_backbone_through_logits_and_through_the_weight_generator(tmp_path):
    """DATP's auxiliary net reads 7x7 conv maps (224 px input); its regression layer is set off zero,
    as after a first step (at initialisation it passes no gradient back to the generator)."""
    cfg = _cfg(tmp_path, head="datp", head_options=("hidden=8",), num_segments=2, input_size=224,
               resize=224, dropout=0.0, bn_freeze="all")
    torch.manual_seed(0)
    x, y = torch.randn(1, 2, 3, 224, 224), torch.tensor([1])

    def layer4_grad(detach_generator_input: bool) -> torch.Tensor:
        model, kwargs, _ = build_model(cfg, 3)
        assert kwargs["input"] == "conv" and kwargs["score_source"] == "cached"
        with torch.no_grad():  # the regression layer starts at zero, passing no gradient back yet:
            model.head.aux.regress.weight.copy_(0.1 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
        model.train()
        if detach_generator_input:  # the generator sees the conv maps, but no gradient flows back
            forward = model.head.forward
            model.head.forward = lambda batch, mask=None: forward(batch._replace(conv=batch.conv.detach()), mask)
        F.cross_entropy(model(x).logits, y).backward()
        assert model.head.aux.spatial.weight.grad.abs().sum().item() > 0, "no gradient into the generator"
        return model.backbone.layer4[1].conv2.weight.grad

    full, logits_only = layer4_grad(False), layer4_grad(True)
    assert logits_only.abs().sum() > 0, "no gradient through the backbone's logits"
    diff = (full - logits_only).abs().max().item()
    assert diff > 1e-6 * full.abs().max().item(), f"the weight generator adds no gradient (max |diff| {diff})"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_trains_end_to_end_and_every_trainable_parameter_gets_a_gradient(tmp_path, name):
    """Also why DDP runs with find_unused_parameters=False."""
    cfg = _cfg(tmp_path, head=name, head_options=SMALL_OPTIONS.get(name, ()), dropout=0.0, bn_freeze="none")
    model, kwargs, _ = build_model(cfg, 2)
    scores = getattr(HEADS[name], "uses_scores", False)
    assert model.backbone.fc.weight.requires_grad == scores  # without score pooling the fc is unused
    model.train()
    out = model(torch.randn(2, 3, 3, 56, 56), torch.tensor([[0.2, 0.5, 0.8]] * 2))
    assert out.logits.shape == (2, 2) and out.weights.shape == (2, 3)
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    # In the graph (grad not None) is what DDP needs; DATP's zero-initialised regression layer
    # passes zeros back to its generator at the first step, so values are checked on the backbone.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:3]} ({len(missing)} in all)"
    zero = [n for n, p in model.backbone.named_parameters() if p.requires_grad and not p.grad.any()]
    assert not zero, f"{name}: zero gradient for backbone {zero[:3]} ({len(zero)} in all)"


def test_partial_bn_keeps_only_the_first_batchnorm_training(tmp_path):
    model, _, _ = build_model(_cfg(tmp_path, bn_freeze="partial", dropout=0.0), 2)
    model.train()
    bb = model.backbone
    assert bb.bn1.training and bb.bn1.weight.requires_grad
    frozen = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d) and m is not bb.bn1]
    assert frozen and not any(m.training or m.weight.requires_grad or m.bias.requires_grad for m in frozen)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=0.0), lr=0.1)
    F.cross_entropy(model(torch.randn(2, 3, 3, 56, 56)).logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    after = bb.state_dict()
    for key in ("layer1.0.bn1.running_mean", "layer4.1.bn2.running_var", "layer2.0.bn1.weight"):
        assert torch.equal(after[key], before[key]), f"{key} of a frozen BatchNorm changed"
    for key in ("bn1.running_mean", "bn1.weight", "conv1.weight"):
        assert not torch.equal(after[key], before[key]), f"{key} did not train"
    assert not model.eval().backbone.bn1.training  # eval mode still switches every BatchNorm


def test_param_groups_decay_only_weights_and_scale_conv1_and_head(tmp_path):
    model, _, _ = build_model(_cfg(tmp_path, head="datp", head_options=("input=softmax",), bn_freeze="partial"), 2)
    groups = param_groups(model, lr=0.1, weight_decay=5e-4, conv1_lr_mult=5.0, head_lr_mult=2.0)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    group_of = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert math.isclose(group_of[id(names["backbone.conv1.weight"])]["lr"], 0.5)
    assert math.isclose(group_of[id(names["head.aux.fc.weight"])]["lr"], 0.2)
    assert group_of[id(names["backbone.layer1.0.conv1.weight"])]["lr"] == 0.1
    for name, p in names.items():
        if p.requires_grad:
            assert group_of[id(p)]["weight_decay"] == (5e-4 if p.ndim > 1 else 0.0), name


def test_lr_schedules_and_config_errors(tmp_path):
    cfg = _cfg(tmp_path, epochs=10, lr_steps=(3, 6), lr_gamma=0.1)
    assert [lr_factor(e, cfg) for e in (0, 2, 3, 5, 6, 9)] == [1.0, 1.0, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2]
    cosine = _cfg(tmp_path, epochs=4, lr_schedule="cosine")
    assert [round(lr_factor(e, cosine), 12) for e in range(5)] == [1.0, round((1 + math.cos(math.pi / 4)) / 2, 12),
                                                                   0.5, round((1 + math.cos(3 * math.pi / 4)) / 2, 12),
                                                                   0.0]
    FinetuneConfig(sources=("a",), out="b", stream="flow")  # no --flows: flow computed on the fly
    with pytest.raises(ValueError, match="unknown tvl1 preset 'nope'"):
        FinetuneConfig(sources=("a",), out="b", stream="flow", flow_preset="nope")
    with pytest.raises(ValueError, match="flow_bound 0 must be > 0"):
        FinetuneConfig(sources=("a",), out="b", stream="flow", flow_bound=0)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        FinetuneConfig(sources=("a",), out="b", head_options=("oops",))
    assert FinetuneConfig(sources=("a",), out="b", head_options=("num_gaussians=3", "input=softmax")
                          ).head_kwargs() == {"num_gaussians": 3, "input": "softmax"}
    assert parse_ints("30, 60") == (30, 60) and parse_ints("") == ()
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ints("30;60")
    with pytest.raises(ValueError, match="lr_steps"):
        FinetuneConfig(sources=("a",), out="b", lr_steps=(60, 30))
    with pytest.raises(ValueError, match="does not accept"):
        build_model(_cfg(tmp_path, head="avg", head_options=("num_gaussians=3",)), 2)


def test_the_model_is_seeded_whatever_the_global_rng(tmp_path):
    """Every process (and a resumed run) must start from the same weights, head included."""
    cfg = _cfg(tmp_path, head="datp", head_options=("input=softmax",))
    torch.manual_seed(1)
    a = build_model(cfg, 2)[0].state_dict()
    torch.manual_seed(2)
    b = build_model(cfg, 2)[0].state_dict()
    c = build_model(_cfg(tmp_path, head="datp", head_options=("input=softmax",), seed=1), 2)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.aux.fc.weight"], c["head.aux.fc.weight"])


@pytest.mark.parametrize("name", ["avg", "datp", "lstm-attn"])
def test_bf16_autocast_and_channels_last_run_every_head_close_to_fp32(tmp_path, name):
    """The GPU path (bf16 autocast, channels_last), exercised with CPU autocast where no GPU is lent."""
    cfg = _cfg(tmp_path, head=name, head_options=SMALL_OPTIONS.get(name, ()), dropout=0.0)
    model, _, _ = build_model(cfg, 2)
    model.eval()
    x, t = torch.randn(2, 3, 3, 56, 56), torch.tensor([[0.2, 0.5, 0.8]] * 2)
    with torch.no_grad():
        fp32 = model(x, t).logits
    model.to(memory_format=torch.channels_last)
    model.memory_format = torch.channels_last
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    F.cross_entropy(out.logits.float(), torch.tensor([0, 1])).backward()
    assert model.backbone.conv1.weight.grad.isfinite().all()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t).logits.float()
    assert_close(low, fp32, atol=0.1 * fp32.abs().max().item())  # bf16: 8 mantissa bits, 20 layers
