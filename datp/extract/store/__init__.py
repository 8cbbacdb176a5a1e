"""The feature store: the contract between stage one and stage two (schema 1).

One HDF5 file (docs/architecture.md shows it with an example):
- file attrs: `datp_schema` = 1, `datp_kind` = "features", `layout` ("fixed" | "ragged"),
  `num_segments` (fixed) or `stride` (ragged), `new_length` (JSON {stream: L}), `backbone`,
  `weights` (file name or "random"), `weights_sha256`, `input_size`, `crop`, `flow` (JSON:
  algorithm, preset, bound, source), `class_names` (JSON list, may be empty), `datp_version`,
  `created`, `settings` (JSON of the whole FeatureConfig).
- `videos/id` (V,) utf-8, `videos/label` (V,) int64 (-1 unknown), `videos/split` (V,) utf-8,
  `videos/num_frames` (V,) int64, `videos/fps` (V,) float32; optional `videos/labels` (V, C) uint8
  multi-hot labels of multi-label videos (`datp import-features`; without it `FeatureStore.multi_hot`
  reads one-hot of `videos/label`).
- fixed layout: `segments/t` (V, N) float32 segment centre times in [0, 1], `segments/frame`
  (V, N) int64 first frame of each segment; `<stream>/conv` (V, N, Cf, h, w) float16, one video
  per chunk, or (V, N, D) feature vectors; `<stream>/logits` (V, N, C) float32; streams are `rgb`
  and/or `flow`.
- ragged layout (stride mode, a variable number of segments per video): `segments/offset` (V,)
  and `segments/length` (V,) int64 index flat arrays `segments/t` (S,), `segments/frame` (S,),
  `<stream>/conv` (S, Cf, h, w), `<stream>/logits` (S, C); video v owns rows
  offset[v] : offset[v] + length[v].
- `done` (V,) bool: the row is complete (rows of failed videos stay False and hold zeros).

Writing is crash-safe like the flow store (`datp.io.atomic`): each video goes to a part file
`<out>.parts/<safe id>.h5`; `build_store` assembles the store from the parts: during a run as
an index of virtual datasets over the parts (no copy), at the end as one self-contained file.
A rerun over a finished store (to add videos, retry failed ones, or with another list) first
moves it aside to `<out>.parts/_store_base.hdf5`; with `union=True` (extract-features) every row
of it is kept (linked into the index during the run, copied at the end), so the store is the
union of all its runs and keeps opening. Parts carry fletcher32 checksums and are checked when
reused (`check_part`, `verified_parts`); `FeatureStore` refuses unfinished or inconsistent stores.
"""

from datp.extract.store.build import (
    build_store,
    check_part,
    done_ids,
    finished_attrs,
    verified_parts,
    write_features,
    write_part,
)
from datp.extract.store.merge import merge_feature_stores
from datp.extract.store.reader import Batch, FeatureStore
from datp.extract.store.schema import (
    BASE_NAME,
    KIND,
    SCHEMA,
    STREAMS,
    StoreError,
    VideoFeatures,
    VideoRow,
    base_attrs,
    is_final,
    stored_attrs,
)

__all__ = ["BASE_NAME", "KIND", "SCHEMA", "STREAMS", "Batch", "FeatureStore", "StoreError",
           "VideoFeatures", "VideoRow", "base_attrs", "build_store", "check_part", "done_ids", "finished_attrs",
           "is_final",
           "merge_feature_stores", "stored_attrs", "verified_parts", "write_features", "write_part"]
