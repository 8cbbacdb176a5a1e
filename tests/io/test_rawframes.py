"""Rawframes in: mmaction2's rawframe annotation lists (plain, with offset, multi-label) read as
its RawframeDataset reads them, Record.labels, frame folders of denseflow / dense_flow / mmaction2
with their prefixes and first number detected (or given, with clear errors)."""

from pathlib import Path

import numpy as np
import pytest

from datp_testing import shared_data
from datp.flows.jpg import FlowLayout, detect_layout, read_flow_pairs
from datp.io.datasets import DatasetError, Record, load_dataset
from datp.io.rawframes import image_index, parse_rawframe_list, read_images


def mm(*parts) -> Path:
    return shared_data("clips", "mmaction2", "tests_data", *parts)


def mmaction2_reading(text: str, *, with_offset: bool, multi_class: bool) -> list[dict]:
    """mmaction2's RawframeDataset.load_annotations (txt branch) written out, as the reference."""
    out = []
    for line in text.splitlines():
        split = line.strip().split()
        info, idx = {"frame_dir": split[0]}, 1
        if with_offset:
            info["offset"], info["total_frames"] = int(split[idx]), int(split[idx + 1])
            idx += 2
        else:
            info["total_frames"] = int(split[idx])
            idx += 1
        label = [int(x) for x in split[idx:]]
        assert label
        info["label"] = label if multi_class else label[0]
        if not multi_class:
            assert len(label) == 1
        out.append(info)
    return out


@pytest.mark.parametrize("name, fmt, with_offset, multi", [
    ("rawframe_test_list.txt", "auto", False, False),
    ("rawframe_test_list_multi_label.txt", "auto", False, True),
    ("rawframe_test_list_with_offset.txt", "rawframes-offset", True, False),
])
def test_mmaction2_lists_read_as_mmaction2_reads_them(name, fmt, with_offset, multi):
    path = mm("annotations", name)
    want = mmaction2_reading(path.read_text(), with_offset=with_offset, multi_class=multi)
    records = load_dataset(path, root=mm(), list_format=fmt).records
    assert len(records) == len(want) == 2
    for r, w in zip(records, want):
        assert r.path == mm(w["frame_dir"]) and r.is_rawframes
        assert r.total_frames == w["total_frames"] and r.offset == w.get("offset", 0)
        labels = tuple(w["label"]) if multi else (w["label"],)
        assert r.labels == labels and r.label == labels[0]
        assert r.split == "test"  # from the file name, as for video lists
    if multi:
        assert [r.labels for r in records] == [(1,), (3, 5)]
    # the same folder listed twice (mmaction2's test lists) keeps unique ids: <dir>#<line>
    assert [r.id for r in records] == ["imgs#1", "imgs#2"]


def test_offset_list_is_ambiguous_without_its_format():
    """`imgs 2 5 127` is offset 2 (mmaction2 with_offset) or labels 5 and 127 (multi_class):
    every line has 4 fields, so auto refuses and names the option; each reading is available."""
    path = mm("annotations", "rawframe_test_list_with_offset.txt")
    with pytest.raises(DatasetError, match="--list-format rawframes-offset or --list-format rawframes"):
        load_dataset(path, root=mm())
    multi = load_dataset(path, root=mm(), list_format="rawframes").records
    assert multi[0].total_frames == 2 and multi[0].labels == (5, 127)


def test_video_lists_stay_video_lists(tmp_path):
    (tmp_path / "list.txt").write_text("a/b.avi 3\nc d.mp4 1\n")
    records = load_dataset(tmp_path / "list.txt").records
    assert [r.is_rawframes for r in records] == [False, False] and [r.label for r in records] == [3, 1]
    assert records[0].labels == (3,)
    (tmp_path / "rf.txt").write_text("v1 10 0\nv2 12 2 4\n")
    assert all(r.is_rawframes for r in load_dataset(tmp_path / "rf.txt").records)
    forced = load_dataset(tmp_path / "rf.txt", list_format="video").records  # '<path> <label>'
    assert [(r.path.name, r.label, r.is_rawframes) for r in forced] == [("v1 10", 0, False),
                                                                        ("v2 12 2", 4, False)]


@pytest.mark.parametrize("text, fmt, message", [
    ("v1 0 3\n", "auto", "list.txt:1: total_frames 0 must be >= 1"),
    ("v1 4 3\nv2 ten 3\n", "rawframes", r"list.txt:2: expected '<dir> <total_frames> <label>...'"),
    ("v1 10\n", "rawframes", r"list.txt:1: expected '<dir> <total_frames> <label>...'"),  # no label
    ("v1 2 10\n", "rawframes-offset", r"expected '<dir> <offset> <total_frames> <label>...'"),
    ("v1 -1 10 3\n", "rawframes-offset", "offset -1 >= 0"),
])
def test_malformed_rawframe_lines(tmp_path, text, fmt, message):
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path, list_format=fmt)


def test_bad_rawframe_line_names_file_and_line(tmp_path):
    lines = [(1, "v1 4 2"), (2, "v2 x 3")]
    with pytest.raises(ValueError, match=r"l.txt:2: expected '<dir> <total_frames> <label>...'"):
        parse_rawframe_list(tmp_path / "l.txt", lines, "rawframes")


def test_record_labels():
    assert Record("a", Path("a")).labels == ()
    assert Record("a", Path("a"), 4).labels == (4,)
    r = Record("a", Path("a"), labels=(3, 5))
    assert r.label == 3 and r.labels == (3, 5)
    with pytest.raises(DatasetError, match="must be the first of labels"):
        Record("a", Path("a"), 5, labels=(3, 5))


def test_labels_checked_against_classes(tmp_path):
    (tmp_path / "list.txt").write_text("v1 4 0 7\n")
    (tmp_path / "v1").mkdir()
    assert load_dataset(tmp_path / "list.txt", list_format="rawframes").records[0].labels == (0, 7)
    (tmp_path / "bad.txt").write_text("v1 4 0 -3\nv2 3 1\n")  # a 3-field line: not the offset form
    with pytest.raises(DatasetError, match="bad.txt:1: label -3 is not a class index"):
        load_dataset(tmp_path / "bad.txt")


def test_image_index_of_mmaction2_frames():
    index, start, T = image_index(mm("imgs"), total_frames=5)
    assert start == 1 and T == 5 and index[0] == "img_00001.jpg" and index[4] == "img_00005.jpg"
    index, _, T = image_index(mm("imgs"), offset=2, total_frames=5)
    assert index[0] == "img_00003.jpg" and index[4] == "img_00007.jpg"
    _, _, T = image_index(mm("imgs"))  # no list: every image
    assert T == 10
    with pytest.raises(FileNotFoundError, match="img_00011.jpg is missing"):
        image_index(mm("imgs"), offset=6, total_frames=5)
    frames = read_images(mm("imgs"), index, [0, 4])
    import cv2

    bgr = cv2.imread(str(mm("imgs", "img_00003.jpg")))
    np.testing.assert_array_equal(frames[0], bgr[..., ::-1])  # RGB
    assert frames[0].shape == (240, 320, 3)


def _write_flow(folder: Path, x: str, y: str, numbers, size=(6, 8), seed=0) -> dict:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for n in numbers:
        fx, fy = (rng.integers(0, 256, size, dtype=np.uint8) for _ in range(2))
        cv2.imwrite(str(folder / f"{x}{n:05d}.png"), fx)  # written losslessly, renamed .jpg below
        cv2.imwrite(str(folder / f"{y}{n:05d}.png"), fy)
        (folder / f"{x}{n:05d}.png").rename(folder / f"{x}{n:05d}.jpg")
        (folder / f"{y}{n:05d}.png").rename(folder / f"{y}{n:05d}.jpg")
        images[n] = np.stack([fx, fy], -1)
    return images


@pytest.mark.parametrize("x, y, first", [("flow_x_", "flow_y_", 0),  # denseflow
                                         ("flow_x_", "flow_y_", 1),  # TSN's dense_flow
                                         ("x_", "y_", 1)])  # mmaction2
def test_detect_layout_and_read_pairs(tmp_path, x, y, first):
    images = _write_flow(tmp_path / "v", x, y, range(first, first + 4))
    (tmp_path / "v" / "img_00001.jpg").write_bytes(b"")  # RGB images beside do not matter
    layout, count = detect_layout(tmp_path / "v")
    assert layout == FlowLayout(x, y, first) and count == 4
    pairs = read_flow_pairs(tmp_path / "v", [0, 3], layout)
    np.testing.assert_array_equal(pairs[0], images[first])  # pair 0 is the first number
    np.testing.assert_array_equal(pairs[3], images[first + 3])
    given, _ = detect_layout(tmp_path / "v", prefixes=(x, y), start=first)
    assert given == layout


def test_detect_layout_on_mmaction2_test_data():
    layout, count = detect_layout(mm("imgs"))
    assert layout == FlowLayout("x_", "y_", 1) and count == 5


def test_detect_layout_errors(tmp_path):
    _write_flow(tmp_path / "both", "flow_x_", "flow_y_", [1, 2])
    _write_flow(tmp_path / "both", "x_", "y_", [1, 2])
    with pytest.raises(ValueError, match="two namings .* pass --flow-prefixes X,Y"):
        detect_layout(tmp_path / "both")
    assert detect_layout(tmp_path / "both", prefixes=("x_", "y_"))[0].x == "x_"
    _write_flow(tmp_path / "gap", "x_", "y_", [1, 2, 4])
    with pytest.raises(ValueError, match="2 consecutive pairs from number 1"):
        detect_layout(tmp_path / "gap")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no flow images"):
        detect_layout(tmp_path / "none")
    _write_flow(tmp_path / "from0", "flow_x_", "flow_y_", [0, 1, 2])
    with pytest.raises(ValueError, match="2 consecutive pairs from number 1"):
        detect_layout(tmp_path / "from0", start=1)  # a wrong start given: named, not guessed
