import pytest
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms._presets import ImageClassification

from datp.extract.transforms import (
    FLOW_MEAN,
    FLOW_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    flow_to_float,
    flow_to_tensor,
    flow_train,
    hflip,
    multi_scale_crop,
    random_crop,
    rgb_to_tensor,
    rgb_train,
    crop_views,
)
from datp_testing import assert_close


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _frames(N=2, H=30, W=40):
    return torch.randint(0, 256, (N, H, W, 3), dtype=torch.uint8, generator=_gen(1))


def _stacks(N=2, L=3, H=30, W=40):
    return torch.randint(0, 256, (N, L, H, W, 2), dtype=torch.uint8, generator=_gen(2))


def test_rgb_equals_torchvision_preset():
    frames = _frames()
    got = rgb_to_tensor(frames, resize=32, crop=28)  # (N, 1, 3, 28, 28)
    preset = ImageClassification(crop_size=28, resize_size=32)  # bilinear, antialias, ImageNet mean/std
    want = preset(frames.permute(0, 3, 1, 2).float() / 255)
    assert_close(got[:, 0], want)


def test_normalisation_by_hand():
    q = torch.tensor([0, 128, 255], dtype=torch.uint8)
    frames = q.view(3, 1, 1, 1).expand(3, 4, 4, 3).contiguous()
    got = rgb_to_tensor(frames, resize=None, crop=4)[:, 0, :, 0, 0]  # (3 values, 3 channels)
    want = torch.tensor([[(v / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)] for v in (0, 128, 255)])
    assert_close(got, want, atol=1e-6)
    stacks = q.view(3, 1, 1, 1, 1).expand(3, 1, 4, 4, 2).contiguous()
    got = flow_to_tensor(stacks, resize=None, crop=4)[:, 0, :, 0, 0]
    assert_close(got, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [127 / 128, 127 / 128]]))
    # the [0, 1]-scale mean/std recorded for flow give the same values
    assert_close((q.float() / 255 - FLOW_MEAN) / FLOW_STD, (q.float() - 128) / 128, atol=1e-6)


def test_flow_interleaving():
    stacks = torch.zeros(1, 3, 2, 2, 2, dtype=torch.uint8)
    for i in range(3):
        stacks[0, i, ..., 0] = 10 * i  # x of pair i
        stacks[0, i, ..., 1] = 10 * i + 5  # y of pair i
    got = flow_to_float(stacks)[0, :, 0, 0] * 128 + 128
    assert_close(got, torch.tensor([0.0, 5, 10, 15, 20, 25]))


def test_flow_flip_negates_x_exactly():
    stacks = _stacks()
    x = flow_to_float(stacks)
    before = x.clone()
    flipped = hflip(x, flow=True)
    assert_close(x, before)  # input unchanged
    # by hand: mirror columns, x channels q -> 256 - q (in float, as 256 - 0 does not fit uint8)
    q = stacks.permute(0, 1, 4, 2, 3).reshape(x.shape).float().flip(-1)
    q[:, 0::2] = 256 - q[:, 0::2]
    assert_close(flipped, (q - 128) / 128)
    assert_close(hflip(flipped, flow=True), x)  # an involution
    rgb = torch.rand(2, 3, 4, 5, generator=_gen())
    assert_close(hflip(rgb, flow=False), rgb.flip(-1))
    with pytest.raises(ValueError, match="flow_to_float"):
        hflip(stacks[:, 0, ..., 0], flow=True)


def test_zero_flow_stays_zero_through_resize():
    stacks = torch.full((1, 2, 30, 40, 2), 128, dtype=torch.uint8)
    got = flow_to_tensor(stacks, resize=32, crop=28, num_crops=10)
    assert torch.count_nonzero(got) == 0, f"max |value| {got.abs().max().item()}"


def test_ten_crop_views():
    stacks = _stacks(H=32, W=44)
    views = flow_to_tensor(stacks, resize=None, crop=28, num_crops=10)  # (N, 10, 2L, 28, 28)
    x = flow_to_float(stacks)
    assert views.shape == (2, 10, 6, 28, 28)
    assert_close(views[:, 0], x[..., :28, :28])  # top-left
    assert_close(views[:, 4], x[..., 2:30, 8:36])  # centre
    assert_close(views[:, 5], hflip(x[..., :28, 16:], flow=True))  # mirrored image's top-left
    assert_close(views[:, 9], hflip(x[..., 2:30, 8:36], flow=True))  # mirrored centre
    rgb = rgb_to_tensor(_frames(H=32, W=44), resize=None, crop=28, num_crops=10)
    assert_close(rgb[:, 9], rgb[:, 4].flip(-1))  # RGB is only mirrored


def test_bad_inputs():
    with pytest.raises(ValueError, match="smaller than crop"):
        crop_views(torch.zeros(1, 3, 20, 30), resize=None, crop=28)
    with pytest.raises(ValueError, match="num_crops=5"):
        crop_views(torch.zeros(1, 3, 30, 30), resize=None, crop=28, num_crops=5)
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_tensor(torch.zeros(1, 30, 30, 3))


def test_multi_scale_crop_positions():
    # H = 32, W = 44, S = 28: sides int(32 * s) = 32, 28, 24, 21 (28 is S already); with scales=(1,)
    # the crop is 32 x 32 and its left edge is on TSN's grid, 4 steps of (44 - 32) // 4 = 3.
    x = torch.rand(2, 3, 32, 44, generator=_gen())
    seen = set()
    for seed in range(12):
        got = multi_scale_crop(x, size=28, scales=(1.0,), generator=_gen(seed))
        matches = [left for left in (0, 3, 6, 9, 12) if torch.equal(got, F.resize(x[..., left : left + 32], [28, 28]))]
        assert len(matches) == 1, f"seed {seed}: crop not on the grid"
        seen.add(matches[0])
    assert len(seen) > 1, "12 seeds gave the same crop"
    a = multi_scale_crop(x, size=28, generator=_gen(5))
    assert_close(a, multi_scale_crop(x, size=28, generator=_gen(5)))


def test_train_transforms_seeded_and_shared_across_segments():
    frames = _frames(N=1).expand(3, -1, -1, -1)  # three identical segments
    for seed in range(4):
        for multi_scale in (True, False):
            a = rgb_train(frames, resize=32, size=28, multi_scale=multi_scale, generator=_gen(seed))
            b = rgb_train(frames, resize=32, size=28, multi_scale=multi_scale, generator=_gen(seed))
            assert_close(a, b)
            assert_close(a[1:], a[:1].expand(2, -1, -1, -1))  # one draw for all segments
    stacks = _stacks(N=2)
    a = flow_train(stacks, resize=32, size=28, generator=_gen(3))
    assert a.shape == (2, 6, 28, 28)
    assert_close(a, flow_train(stacks, resize=32, size=28, generator=_gen(3)))
    crop = random_crop(torch.arange(30 * 40.0).view(1, 1, 30, 40), size=28, generator=_gen())
    assert torch.all(crop.diff(dim=-1) == 1) and torch.all(crop.diff(dim=-2) == 40), "not a contiguous crop"
