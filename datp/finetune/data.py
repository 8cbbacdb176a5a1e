"""Training data for finetune: the train/validation/test split, TSN clips, and the epoch order.

Determinism: everything random about a training sample (segment offsets, crop, flip) is drawn from
generators seeded by `(seed, epoch, video index)`, and the order of an epoch from `(seed, epoch)`.
So a sample does not depend on which worker process or rank loads it, nor on what came before, and
a run resumed at an epoch boundary sees exactly the samples of an uninterrupted run.

Sampling (TSN): N segments; training draws one random start in each of N equal parts
(`segment_indices(..., "train")`), validation and test take the centres ("test"), as
extract-features does. RGB reads one frame per segment, flow a stack of L consecutive pairs sampled
in the space of T - 1 pairs (a flow store's or jpg folder's count).

Flow without a flow store (`flows` None, `on_the_fly` settings): the video is decoded at the flow's
size, the pairs its segments read are sampled as above (T from the decoder) and only their flow is
computed (`datp.flows.compute.sampled_flow`), quantized like stored flow, then augmented: the same
input as a store that `datp extract-flow` made with those settings would give. With the "opencv"
backend the decoding workers compute it; with "torch" they return the sampled gray frames and the
training process computes the pairs of the whole batch on its device (`ClipDataset.on_device`),
re-creating each sample's augmentation generator from `(seed, epoch, index)`.

Rawframe datasets (a rawframe list, `datp.io.rawframes`): RGB is read from each folder's
`img_*.jpg` at their stored size (`short_side` does not apply); flow from `--flows DIR` where
`DIR/<id>` holds another tool's flow jpgs (denseflow, dense_flow, mmaction2; prefixes and first
number detected per folder, `datp.flows.jpg.detect_layout`), or datp's own jpg folder. The list's
offset applies to both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datp.extract.sampling import frame_indices, segment_indices, segment_times
from datp.extract.transforms import flow_to_tensor, flow_train, rgb_to_tensor, rgb_train
from datp.io.datasets import Dataset, Record, class_names_or_numbers
from datp.io.splits import carve_validation


@dataclass
class Splits:
    """Records to train on, to pick the best epoch with, and to report at the end."""

    train: list[Record]
    val: list[Record]
    test: list[Record]


def hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded, class-stratified share of `records` for validation.

    The rule is train-head's, `datp.io.splits.carve_validation` over the records' labels
    (scikit-learn's stratified split of `ceil(fraction * n)` videos, unstratified when a class
    is too small). Order within each part is the input order.

    Returns:
        (train, val), a partition of `records`.
    """
    train, val = carve_validation([r.label for r in records], fraction, seed)
    return [records[i] for i in train], [records[i] for i in val]


def split_dataset(dataset: Dataset, *, train_split: str = "train", test_split: str = "test",
                  val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Train on `train_split`; validate on split "val" records, else on a share carved from train.

    The test split is never used for validation or model choice.

    Raises:
        ValueError: no labelled training videos, or unlabelled ones.
    """
    by_split: dict[str, list[Record]] = {}
    for record in dataset.records:
        by_split.setdefault(record.split, []).append(record)
    train = by_split.get(train_split, [])
    if not train:
        found = ", ".join(f"{k} ({len(v)})" for k, v in sorted(by_split.items()))
        raise ValueError(f"no videos of split {train_split!r} to train on (the dataset has: {found}); "
                         "give a train list / split folder, or pass --train-split")
    unlabelled = [r for r in train if r.label < 0]
    if unlabelled:
        raise ValueError(f"{unlabelled[0].origin}: video {unlabelled[0].id!r} has no label; finetune "
                         "needs labelled videos (a folder tree, list file, split folder or manifest)")
    if train_split != "val" and by_split.get("val"):
        val = by_split["val"]
    else:
        train, val = hold_out(train, val_fraction, seed)
    test = by_split.get(test_split, []) if test_split != train_split else []
    return Splits(train, val, [r for r in test if r.label >= 0])


def class_names(dataset: Dataset, splits: Splits) -> list[str]:
    """The dataset's class names, else "0", "1", ... up to the largest label."""
    return class_names_or_numbers(dataset.class_names, [r.label for part in (splits.train, splits.val, splits.test)
                                                        for r in part])


def epoch_order(num_items: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The training order of one epoch for one rank (DistributedSampler's rule, seeded by epoch).

    A permutation seeded by `(seed, epoch)` is padded by repeating its start to a multiple of
    `world_size`, and rank r takes every world_size-th item from r. Every rank gets the same count,
    so all ranks take the same number of steps; with one rank it is the permutation itself.

    Returns:
        (ceil(num_items / world_size),) int64 item indices.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    total = -(-num_items // world_size) * world_size
    order = np.resize(order, total)  # np.resize repeats the array to fill the new length
    return order[rank::world_size].astype(np.int64)


class EpochSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` keys of `epoch_order`; call `set_epoch` before each epoch."""

    def __init__(self, num_items: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size)

    def __iter__(self):
        order = epoch_order(self.num_items, seed=self.seed, epoch=self.epoch, rank=self.rank,
                            world_size=self.world_size)
        return iter([(self.epoch, int(i)) for i in order])


def sample_generators(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent generators for segment offsets (numpy) and augmentation (torch) of one sample."""
    torch_seed = int(np.random.default_rng([seed, epoch, index, 1]).integers(2**62))
    return np.random.default_rng([seed, epoch, index, 0]), torch.Generator().manual_seed(torch_seed)


def flow_counts(records: list[Record], flows: str) -> dict[str, int]:
    """Flow pairs (T - 1) of every record in a flow store or jpg folder, checking all are there.

    Raises:
        ValueError: a video without flow (naming it and the fix).
    """
    counts = {}
    if Path(flows).is_dir():
        from datp.flows.jpg import video_dir

        for r in records:
            folder = video_dir(Path(flows), r)
            if not folder.is_dir():
                raise ValueError(f"{folder}: no flow for video {r.id!r}; run datp extract-flow "
                                 f"--format jpg --out {flows} on this dataset first")
            counts[r.id] = _jpg_layout(folder, r)[1]
    else:
        from datp.flows.store import FlowStore

        with FlowStore(flows) as store:
            for r in records:
                if r.id not in store:
                    raise ValueError(f"{flows} has no flow for video {r.id!r}; run datp extract-flow "
                                     "on this dataset first")
                counts[r.id] = int(store.meta(r.id)["num_frames"]) - 1
    empty = [i for i, n in counts.items() if n < 1]
    if empty:
        raise ValueError(f"video {empty[0]!r} has no flow pairs (fewer than 2 frames); remove it from the dataset")
    return counts


def _jpg_layout(folder: Path, record: Record):
    """(layout, flow pairs) of a video's jpg folder: datp's own, or another tool's (detected), from
    a rawframe record's offset on."""
    from datp.flows.jpg import FlowLayout, detect_layout

    layout, pairs = detect_layout(folder)
    return FlowLayout(layout.x, layout.y, layout.start + record.offset), pairs - record.offset


class ClipDataset(torch.utils.data.Dataset):
    """One TSN sample per video: N segments, preprocessed for the backbone.

    Keys are `(epoch, index)` pairs (see `EpochSampler`); in eval mode the epoch is ignored.

    Args:
        records: the videos.
        stream: "rgb" or "flow".
        train: random offsets and augmentation, else centred segments and a centre crop.
        num_segments, new_length: N and L (L is 1 for rgb).
        flows: flow store or jpg folder (flow stream), and `flow_pairs` its counts by id.
        on_the_fly: with `flows` None, the flow settings {"algorithm", "preset", "backend",
            "bound", "short_side", "size"} (`FinetuneConfig`'s flow_* fields).
        short_side, resize, input_size, multi_scale: decoding size and crops (see FinetuneConfig).
        mean, std: RGB normalisation.
        seed: the run's seed.

    Items: {"x": (N, C, S, S) float32, "t": (N,) segment times, "label": int, "index": int};
    with the torch flow backend "x" is missing and "flow_pairs", "flow_index", "flow_gray"
    (sampled pairs, frame numbers, (K, H, W) gray frames) and "epoch" come instead, for `on_device`.
    """

    def __init__(self, records: list[Record], *, stream: str, train: bool, num_segments: int,
                 new_length: int = 1, flows: str | None = None, flow_pairs: dict[str, int] | None = None,
                 short_side: int = 256, resize: int = 256, input_size: int = 224, multi_scale: bool = True,
                 mean=None, std=None, seed: int = 0, on_the_fly: dict | None = None):
        self.records, self.stream, self.train = records, stream, train
        self.num_segments, self.new_length = num_segments, new_length if stream == "flow" else 1
        self.flows, self.flow_pairs = flows, flow_pairs or {}
        self.short_side, self.resize, self.input_size = short_side, resize, input_size
        self.multi_scale, self.seed = multi_scale, seed
        self.norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        self.on_the_fly = on_the_fly if stream == "flow" and flows is None else None
        if stream == "flow" and flows is None and on_the_fly is None:
            raise ValueError("the flow stream needs a flow store, a jpg folder or on-the-fly flow settings")
        self._store = None  # FlowStore, opened in the process that reads it
        self._computer = None  # the opencv backend's FlowComputer, made in the worker that uses it

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        record = self.records[index]
        rng, gen = sample_generators(self.seed, epoch, index)
        mode = "train" if self.train else "test"
        L = self.new_length
        if self.stream == "flow" and self.on_the_fly is not None:
            starts, P, video = self._sampled_gray(record, mode, rng)
            t = torch.from_numpy(segment_times(starts, L, P))
            if self.on_the_fly["backend"] == "torch":  # computed by the training process: `on_device`
                pairs, frames, gray = video
                return {"flow_pairs": pairs, "flow_index": frames, "flow_gray": gray, "t": t,
                        "label": record.label, "index": index, "epoch": epoch}
            from datp.flows.compute import FlowComputer, sampled_flow

            if self._computer is None:
                self._computer = FlowComputer(algorithm=self.on_the_fly["algorithm"],
                                              preset=self.on_the_fly["preset"])
            x = self._flow_input(sampled_flow(self._computer, [video], self.on_the_fly["bound"])[0], gen)
            return {"x": x, "t": t, "label": record.label, "index": index}
        if self.stream == "flow":
            P = self.flow_pairs[record.id]
            starts = segment_indices(P, self.num_segments, L, mode, rng)
            stacks = self._flow_stacks(record, frame_indices(starts, L, P))  # (N, L, H, W, 2) uint8
            t = segment_times(starts, L, P)
            x = self._flow_input(stacks, gen)
        else:
            frames, starts, T = self._rgb_frames(record, mode, rng)
            t = segment_times(starts, 1, T)
            if self.train:
                x = rgb_train(frames, resize=self.resize, size=self.input_size,
                              multi_scale=self.multi_scale, generator=gen, **self.norm)
            else:
                x = rgb_to_tensor(frames, resize=self.resize, crop=self.input_size, **self.norm)[:, 0]
        return {"x": x, "t": torch.from_numpy(t), "label": record.label, "index": index}

    def _flow_input(self, stacks: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """(N, L, H, W, 2) uint8 stacks -> (N, 2L, S, S): TSN augmentation in training, else the
        centre crop."""
        if self.train:
            return flow_train(stacks, resize=self.resize, size=self.input_size,
                              multi_scale=self.multi_scale, generator=gen)
        return flow_to_tensor(stacks, resize=self.resize, crop=self.input_size)[:, 0]

    def _sampled_gray(self, record: Record, mode: str, rng) -> tuple[np.ndarray, int, tuple]:
        """Decode `record` at the flow's size and sample its segments in its T - 1 pairs.

        Returns:
            (segment starts, P = T - 1, (pairs (N, L), frame numbers (K,), gray frames (K, H, W)))
            where the frames are both ends of every sampled pair (`to_gray`, as extract-flow).
        """
        from datp.flows.compute import gray_pairs
        from datp.io.decode import DecodeError, read_picked

        if record.is_rawframes:
            raise ValueError(f"{record.path} is a rawframe folder: give --flows (its flow jpgs or a "
                             "flow store); on-the-fly flow decodes videos")
        fly, L, sampled = self.on_the_fly, self.new_length, {}

        def pick(T: int) -> np.ndarray:  # called once, with the decoded frame count
            if T < 2:
                return np.zeros(0, np.int64)
            sampled["starts"] = segment_indices(T - 1, self.num_segments, L, mode, rng)
            pairs = frame_indices(sampled["starts"], L, T - 1).ravel()
            return np.concatenate([pairs, pairs + 1])

        size = {"size": tuple(fly["size"])} if fly["size"] else {"short_side": fly["short_side"] or None}
        frames, info = read_picked(record.path, {"flow": (pick, size)})
        if info.errors:
            raise DecodeError(f"{record.path}: corrupt stream ({info.errors[0]}); remove the video "
                              "from the dataset or re-encode it")
        if "starts" not in sampled:
            raise DecodeError(f"{record.path}: {info.num_frames} frame decoded; flow needs at least 2")
        P = info.num_frames - 1
        return sampled["starts"], P, gray_pairs(frames["flow"], frame_indices(sampled["starts"], L, P))

    def on_device(self, batch: dict, computer) -> torch.Tensor:
        """The flow input (B, N, 2L, S, S) of a batch of the torch backend's items (`collate`):
        TV-L1 of every sampled pair of the batch on `computer` (a torch `FlowComputer`, one batch
        per frame size), then each sample's augmentation from its own generator, so the input is
        the one the opencv path's worker would make from the same flow."""
        from datp.flows.compute import sampled_flow

        videos = list(zip(batch.pop("flow_pairs"), batch.pop("flow_index"), batch.pop("flow_gray")))
        stacks = sampled_flow(computer, videos, self.on_the_fly["bound"])
        inputs = [self._flow_input(s, sample_generators(self.seed, int(epoch), int(index))[1])
                  for s, epoch, index in zip(stacks, batch.pop("epoch").tolist(), batch["index"].tolist())]
        return torch.stack(inputs)

    def _rgb_frames(self, record: Record, mode: str, rng) -> tuple[np.ndarray, np.ndarray, int]:
        """(N, H, W, 3) frames, their indices and T. Decoding stops at the last needed frame when
        T is known (from the flow counts); otherwise the video is decoded whole, then picked.
        A rawframe folder's frames are read from its `img_*.jpg`."""
        from datp.io.decode import DecodeError, VideoInfo, iter_frames

        if record.is_rawframes:
            from datp.io.rawframes import image_index, read_images

            index, _, T = image_index(record.path, offset=record.offset, total_frames=record.total_frames)
            starts = segment_indices(T, self.num_segments, 1, mode, rng)
            picked = read_images(record.path, index, starts)
            return np.stack([picked[int(j)] for j in starts]), starts, T

        info = VideoInfo(path=str(record.path))
        frames = iter_frames(record.path, info, short_side=self.short_side or None)
        known = self.flow_pairs.get(record.id)
        try:
            if known is None:
                decoded = list(frames)
                T = len(decoded)
                starts = segment_indices(T, self.num_segments, 1, mode, rng)
                picked = {int(j): decoded[j] for j in np.unique(starts)}
            else:
                T = known + 1
                starts = segment_indices(T, self.num_segments, 1, mode, rng)
                wanted, last, picked = set(starts.tolist()), int(starts.max()), {}
                for j, frame in enumerate(frames):
                    if j in wanted:
                        picked[j] = frame
                    if j == last:
                        break
                if len(picked) < len(wanted):
                    raise DecodeError(f"{record.path} decodes to fewer frames than the {T} its flow has; "
                                      "re-extract its flow")
        finally:
            frames.close()  # stops the decoder and closes the file
        if info.errors:
            raise DecodeError(f"{record.path}: corrupt stream ({info.errors[0]}); remove the video "
                              "from the dataset or re-encode it")
        return np.stack([picked[int(j)] for j in starts]), starts, T

    def _flow_stacks(self, record: Record, pairs: np.ndarray) -> np.ndarray:
        needed = np.unique(pairs)
        if Path(self.flows).is_dir():
            from datp.flows.jpg import read_flow_pairs, video_dir

            folder = video_dir(Path(self.flows), record)
            table = read_flow_pairs(folder, needed, _jpg_layout(folder, record)[0])
        else:
            if self._store is None:
                from datp.flows.store import FlowStore

                self._store = FlowStore(self.flows)
            table = dict(zip(needed.tolist(), self._store.flow(record.id, needed)))
        return np.stack([[table[j] for j in row] for row in pairs.tolist()])

    def __getstate__(self) -> dict:  # workers are spawned: send everything but the open store
        return {**self.__dict__, "_store": None, "_computer": None}


GRAY_KEYS = ("flow_pairs", "flow_index", "flow_gray")


def collate(items: list[dict]) -> dict:
    """`default_collate`, except that the torch flow backend's gray frames (one size per video)
    stay lists."""
    from torch.utils.data import default_collate

    if "flow_gray" not in items[0]:
        return default_collate(items)
    kept = {k: [item[k] for item in items] for k in GRAY_KEYS}
    return {**default_collate([{k: v for k, v in item.items() if k not in GRAY_KEYS} for item in items]), **kept}


def worker_init(_worker_id: int) -> None:
    """One torch thread per decoding worker, so workers and the training step share the cores."""
    torch.set_num_threads(1)
