import numpy as np
import pytest

from datp_testing import moving_texture, shared_data, write_video
from datp.io.decode import DecodeError, output_size, read_video


def test_lossless_clip_decodes_to_its_source_frames(tmp_path):
    frames = moving_texture(7, 30, 41)  # odd size
    video = write_video(tmp_path / "clip.mkv", frames, fps=12)
    decoded, info = read_video(video)
    assert decoded.shape == frames.shape and info.num_frames == 7 and info.fps == 12
    np.testing.assert_array_equal(decoded, frames)
    assert info.timestamps == pytest.approx([i / 12 for i in range(7)], abs=1e-3)  # mkv: ms


def test_resize_keeps_aspect_and_rounds():
    assert output_size(240, 320, short_side=256) == (256, 341)
    assert output_size(320, 240, short_side=128) == (171, 128)
    assert output_size(240, 320, size=(340, 256)) == (256, 340)
    with pytest.raises(ValueError):
        output_size(10, 10, short_side=8, size=(4, 4))


@pytest.mark.parametrize("angle", [0, 90, 180, 270])
def test_rotation_metadata_applied(angle):
    import cv2

    video = shared_data("stress", f"video_{angle}.mov")
    frames, info = read_video(video)
    assert info.rotation == angle
    # OpenCV applies the orientation on its own (CAP_PROP_ORIENTATION_AUTO): an independent check
    capture = cv2.VideoCapture(str(video))
    ok, first = capture.read()
    assert ok and capture.get(cv2.CAP_PROP_ORIENTATION_META) == angle
    expected = first[..., ::-1]  # BGR -> RGB
    assert frames[0].shape == expected.shape == ((320, 568, 3) if angle in (0, 180) else (568, 320, 3))
    diff = np.abs(frames[0].astype(int) - expected)
    assert diff.mean() < 1, diff.max()


@pytest.mark.parametrize("name, frames", [("av1_video.mkv", 125), ("h264_10bits.mp4", 30),
                                          ("no_duration.webm", 74), ("fire2.mp4", 25),
                                          ("test_video.mp4", 5), ("chaplin.mp4", 241)])
def test_hard_files_decode_every_frame(name, frames):
    decoded, info = read_video(shared_data("stress", name), short_side=32)
    assert info.num_frames == frames == len(decoded) and not info.errors
    assert decoded.dtype == np.uint8 and min(decoded.shape[1:3]) == 32


def test_container_frame_count_is_not_trusted():
    # the container claims 73 frames; 72 decode
    _, info = read_video(shared_data("clips", "torchvision", "RATRACE_wave_f_nm_np1_fr_goo_37.avi"),
                         short_side=32)
    assert info.num_frames == 72


def test_broken_files_raise_or_report():
    with pytest.raises(DecodeError, match="empty file"):
        read_video(shared_data("stress", "result.webm"))
    _, info = read_video(shared_data("stress", "corrupted.mp4"), short_side=32)
    assert info.errors and info.num_frames == 49
    with pytest.raises(DecodeError, match="no such file"):
        read_video("/nonexistent/video.mp4")


def test_non_utf8_metadata_does_not_abort():
    frames, info = read_video(shared_data(
        "clips", "torchvision", "hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"),
        short_side=32)
    assert info.num_frames == 83
