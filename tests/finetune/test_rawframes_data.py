"""finetune reads rawframe datasets: RGB from the folders' img_*.jpg, flow from another tool's jpgs
(mmaction2's x_/y_ beside them), the list's labels and offset kept."""

import cv2
import numpy as np
import torch

from datp_testing import assert_close, shared_data
from datp.extract.sampling import frame_indices, segment_indices
from datp.extract.transforms import flow_to_tensor, rgb_to_tensor
from datp.finetune.data import ClipDataset, flow_counts
from datp.io.datasets import load_dataset


def mm(*parts):
    return shared_data("clips", "mmaction2", "tests_data", *parts)


def _records(tmp_path, line):
    (tmp_path / "train_list.txt").write_text(line + "\n")
    return load_dataset(tmp_path / "train_list.txt", root=mm()).records


def _images(prefix, numbers, flags=cv2.IMREAD_COLOR):
    return [cv2.imread(str(mm("imgs", f"{prefix}{n:05d}.jpg")), flags) for n in numbers]


def test_rgb_clips_are_the_listed_images(tmp_path):
    # multi-label, the first label trains; a 3-field line rules out the offset form (finetune has
    # no --list-format, so a list whose lines all have 4+ fields is refused as ambiguous)
    records = _records(tmp_path, "imgs 6 3 5\nimgs 5 2")[:1]
    assert records[0].labels == (3, 5) and records[0].split == "train"
    clips = ClipDataset(records, stream="rgb", train=False, num_segments=3, resize=64, input_size=56)
    item = clips[(0, 0)]
    starts = segment_indices(6, 3, 1, "test")
    frames = np.stack([im[..., ::-1] for im in _images("img_", starts + 1)])
    assert_close(item["x"], rgb_to_tensor(frames, resize=64, crop=56)[:, 0], what="rgb")
    assert item["label"] == 3
    train = ClipDataset(records, stream="rgb", train=True, num_segments=3, resize=64, input_size=56)
    assert train[(0, 0)]["x"].shape == (3, 3, 56, 56)


def test_flow_clips_read_mmaction2_flow_jpgs_from_the_offset(tmp_path):
    (tmp_path / "list.txt").write_text("imgs 1 4 7\n")
    records = load_dataset(tmp_path / "list.txt", root=mm(), list_format="rawframes-offset").records
    counts = flow_counts(records, str(mm()))  # --flows: the folder holding imgs/
    assert counts == {"imgs": 5 - 1}  # x_00002 .. x_00005 from the offset on
    clips = ClipDataset(records, stream="flow", train=False, num_segments=2, new_length=2,
                        flows=str(mm()), flow_pairs=counts, resize=64, input_size=56)
    item = clips[(0, 0)]
    pairs = frame_indices(segment_indices(4, 2, 2, "test"), 2, 4)  # (N, L) pair indices
    stacks = np.stack([[np.stack([_images(c, [1 + 1 + j], cv2.IMREAD_GRAYSCALE)[0] for c in ("x_", "y_")], -1)
                        for j in row] for row in pairs])
    assert_close(item["x"], flow_to_tensor(torch.from_numpy(stacks), resize=64, crop=56)[:, 0], what="flow")


def test_finetune_reads_offset_lists_with_list_format(tmp_path):
    """mmaction2's with_offset list (every line 4 fields) is ambiguous without --list-format; with
    `list_format="rawframes-offset"` finetune's data step reads offsets and labels as extract-features."""
    import pytest

    from datp.finetune.config import FinetuneConfig
    from datp.finetune.train import _data
    from datp.io.datasets import DatasetError

    listing = tmp_path / "train_list.txt"
    listing.write_text((mm("annotations", "rawframe_test_list_with_offset.txt")).read_text())
    common = dict(sources=(str(listing),), out=str(tmp_path / "run"), root=str(mm()), train_split="train",
                  test_split="none", val_fraction=0.0)
    with pytest.raises(DatasetError, match="list-format"):
        _data(FinetuneConfig(**common))
    splits, _, _ = _data(FinetuneConfig(list_format="rawframes-offset", **common))
    records = splits.train
    assert [(r.offset, r.total_frames, r.label) for r in records] == [(2, 5, 127), (2, 5, 127)]
