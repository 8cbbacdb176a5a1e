"""`datp extract-features` (`datp.extract.features.extract_features`), `datp merge` (shard stores),
`datp export-features` and `datp import-features` (`datp.extract.importer.import_features`)."""

from __future__ import annotations

from pathlib import Path

import click

from datp.cli.common import SOURCE_HELP, defaults, finish, user_errors
from datp.extract.features import FeatureConfig
from datp.extract.importer import ImportConfig
from datp.io.rawframes import LIST_FORMATS

D = defaults(FeatureConfig)
I = defaults(ImportConfig)


@click.command("extract-features", epilog=SOURCE_HELP + " Also mmaction2's rawframe lists "
               "'<frame_dir> <total_frames> <label>...' (docs/rawframes.md). Exit codes as extract-flow.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Feature store (HDF5).")
@click.option("--backbone", default=D["backbone"], show_default=True,
              help="Any torchvision ResNet/ResNeXt/wide ResNet name.")
@click.option("--weights", default=D["weights"], show_default=True,
              help="A torchvision ImageNet state_dict file, a datp finetune checkpoint, or "
              "'random' (seeded; for tests and demos). Nothing is downloaded.")
@click.option("--flow-weights", default=D["flow_weights"], help="Weights for the flow stream (default: --weights).")
@click.option("--streams", default=",".join(D["streams"]), show_default=True, help="rgb, flow or rgb,flow.")
@click.option("--segments", type=int, default=D["num_segments"], show_default=True,
              help="Segments per video (TSN test sampling: centres of N equal parts).")
@click.option("--stride", type=int, default=D["stride"],
              help="One segment every S frames instead (untrimmed videos; variable N).")
@click.option("--stride-seconds", type=float, default=D["stride_seconds"],
              help="One segment every S seconds instead (from each video's frame rate).")
@click.option("--protocol", type=click.Choice(["tsn"]), default=D["protocol"],
              help="A named test protocol: tsn = 25 segments x 10 crops (corners, centre and their "
              "mirror images), scores averaged over crops; replaces --segments and --ten-crop.")
@click.option("--new-length", type=int, default=D["new_length"], show_default=True,
              help="Flow pairs stacked per segment (2L input channels).")
@click.option("--flows", type=click.Path(exists=True, path_type=Path), default=None,
              help="Flow store or jpg folder from extract-flow; default: compute on the fly only "
              "the pairs the segments read. Also another tool's flow jpg folders (denseflow, "
              "dense_flow, mmaction2), one per video id.")
@click.option("--flow-prefixes", default=None, help="Another tool's flow jpg prefixes X,Y, e.g. "
              "x_,y_ (default: detected: flow_x_/flow_y_ or x_/y_).")
@click.option("--flow-start", type=int, default=D["flow_start"],
              help="Their first number: 0 (denseflow) or 1 (TSN, mmaction2); default: detected.")
@click.option("--flow-algorithm", type=click.Choice(["tvl1", "dis", "farneback"]), default=D["flow_algorithm"],
              show_default=True, help="On-the-fly flow algorithm.")
@click.option("--flow-backend", type=click.Choice(["opencv", "torch"]), default=D["flow_backend"],
              show_default=True, help="On-the-fly TV-L1: opencv (CPU, in the workers) or torch (on --device "
              "next to the backbone, each video's pairs as one batch: the GPU path; no flow files written).")
@click.option("--flow-preset", default=D["flow_preset"], help="On-the-fly flow preset (see extract-flow).")
@click.option("--flow-short-side", type=int, default=D["flow_short_side"], show_default=True,
              help="On-the-fly flow: resize the short side first (0: source size).")
@click.option("--bound", type=float, default=D["flow_bound"], show_default=True,
              help="On-the-fly flow quantization bound (and the bound recorded for another tool's "
              "flow jpgs).")
@click.option("--short-side", type=int, default=D["short_side"], show_default=True,
              help="Decode RGB at this short side (0: the source size, so --resize is torchvision's "
              "antialiased resize, as the weights' eval transform).")
@click.option("--resize", type=int, default=D["resize"], show_default=True,
              help="Short side before cropping.")
@click.option("--input-size", type=int, default=D["input_size"], show_default=True, help="Crop size.")
@click.option("--ten-crop", is_flag=True, help="Ten-crop test-time augmentation, averaged per "
              "segment.")
@click.option("--batch-size", type=int, default=D["batch_size"], show_default=True,
              help="Images per backbone forward (across videos).")
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default=D["compression"],
              show_default=True, help="Conv maps on disk: none reads fastest in train-head; lzf (0.83x the "
              "size) and gzip level 1 (0.70x) read 7-14x slower (docs/stage-two.md).")
@click.option("--workers", type=int, default=D["workers"], show_default=True,
              help="Decoding/flow worker processes.")
@click.option("--shard", default=None, help="Do shard i/n (default: torchrun's RANK/WORLD_SIZE).")
@click.option("--device", default=D["device"], show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--seed", type=int, default=D["seed"], show_default=True, help="Seed of random weights.")
@click.option("--root", type=click.Path(path_type=Path), default=None)
@click.option("--split", type=int, default=1, show_default=True)
@click.option("--list-format", type=click.Choice(LIST_FORMATS), default="auto", show_default=True,
              help="How list files are read (rawframe lists told from video lists by their fields; "
              "name rawframes-offset for mmaction2's with_offset lists).")
@click.option("--skip-missing", is_flag=True, help="Record missing videos as failures and go on.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@user_errors
def extract_features_cmd(ctx, sources, out, backbone, weights, flow_weights, streams, segments, stride,
                         stride_seconds, protocol, new_length, flows, flow_prefixes, flow_start,
                         flow_algorithm, flow_backend, flow_preset, flow_short_side, bound, short_side, resize,
                         input_size, ten_crop, batch_size, compression, workers, shard, device, seed, root, split,
                         list_format, skip_missing, quiet):
    """Dump each segment's last conv map and class scores (RGB and flow) to a feature store.

    Resumable and crash-safe like extract-flow; every setting is recorded in the store.
    """
    from datp.extract.features import extract_features, shard_out
    from datp.io.datasets import open_dataset, parse_shard

    given = [f"--{n.replace('_', '-')}" for n in ("segments", "ten_crop")
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if protocol and given:
        raise ValueError(f"--protocol {protocol} sets {' and '.join(given)}; drop them or the protocol")
    cfg = FeatureConfig(
        out=str(out), backbone=backbone, weights=weights, flow_weights=flow_weights,
        streams=tuple(s.strip() for s in streams.split(",") if s.strip()), num_segments=segments,
        stride=stride, stride_seconds=stride_seconds, protocol=protocol, new_length=new_length,
        flows=str(flows) if flows else None,
        flow_prefixes=tuple(p.strip() for p in flow_prefixes.split(",")) if flow_prefixes else None,
        flow_start=flow_start, flow_algorithm=flow_algorithm, flow_backend=flow_backend, flow_preset=flow_preset,
        flow_bound=bound, flow_short_side=flow_short_side, short_side=short_side, resize=resize,
        input_size=input_size, num_crops=10 if ten_crop else 1, batch_size=batch_size, compression=compression,
        workers=workers, shard=parse_shard(shard), device=device, seed=seed)
    dataset, missing = open_dataset(list(sources), root=root, split=split, skip_missing=skip_missing,
                                    list_format=list_format)
    summary = extract_features(dataset, cfg, progress=not quiet, missing=missing)
    finish(summary, Path(f"{shard_out(cfg.out, cfg.shard)}.failures.csv"), "extract-features")


@click.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--copy", is_flag=True, help="Copy the data into one self-contained file "
              "(default: link to the inputs, which must then stay in place).")
@user_errors
def merge_cmd(inputs, out, copy):
    """Join the shard stores of one run (flow or feature stores) into one store."""
    from datp.extract.merge import merge_stores

    count = merge_stores(list(inputs), out, copy=copy)
    click.echo(f"merged {count} videos from {len(inputs)} stores into {out}")


@click.command("export-features")
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the arrays and videos.csv.")
@click.option("--format", "fmt", type=click.Choice(["npy"]), default="npy", show_default=True)
@click.option("--streams", default=None, help="rgb, flow or rgb,flow (default: every stream of the store).")
@click.option("--split", default=None, help="Only this split (default: every done video).")
@user_errors
def export_features_cmd(store, out, fmt, streams, split):
    """Write a feature store as one .npy array per video and stream, plus videos.csv (id, label, split,
    fps, segment frames) and settings.json, for tools that read per-video arrays."""
    from datp.extract.export import export_features

    chosen = tuple(s.strip() for s in streams.split(",") if s.strip()) if streams else None
    count = export_features(store, out, fmt=fmt, streams=chosen, split=split)
    click.echo(f"exported {count} videos to {out}")


@click.command("import-features")
@click.argument("features", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--list", "listing", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV (id, labels, split[, fps, frames_per_row, offset, num_frames]) or ActivityNet-style JSON "
              "(BaSNet's gt.json).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Feature store (HDF5) to write.")
@click.option("--layout", type=click.Choice(["auto", "streams", "joint"]), default=I["layout"], show_default=True,
              help="streams: <id>_rgb.npy/<id>_flow.npy or rgb/<id>.npy (video_features, BaSNet); joint: <id>.npy.")
@click.option("--split-at", type=int, default=I["split_at"], show_default=True,
              help="Joint arrays: columns [:K] are rgb, [K:] flow (1024 for I3D rgb|flow); 0: one stream.")
@click.option("--stream", type=click.Choice(["rgb", "flow"]), default=I["stream"], show_default=True,
              help="The stream of an unsplit joint array.")
@click.option("--fps", type=float, default=I["fps"], show_default=True, help="Where the list does not say.")
@click.option("--frames-per-row", type=int, default=I["frames_per_row"], show_default=True,
              help="Frames each feature row covers (I3D: 16), where the list does not say.")
@click.option("--offset", type=int, default=I["offset"], show_default=True,
              help="First frame of row 0, where the list does not say.")
@click.option("--splits", default=I["splits"], show_default=True,
              help="JSON lists: SUBSET=SPLIT,... (THUMOS14: validation=train,test=test).")
@click.option("--skip-missing", is_flag=True, help="Leave out listed videos without arrays.")
@click.option("--quiet", is_flag=True)
@user_errors
def import_features_cmd(features, listing, out, layout, split_at, stream, fps, frames_per_row, offset, splits,
                        skip_missing, quiet):
    """Turn precomputed per-video .npy (T, D) features (I3D rgb/flow) into a ragged feature store."""
    from datp.extract.importer import import_features

    cfg = ImportConfig(features=str(features), out=str(out), list=str(listing), layout=layout, split_at=split_at,
                       stream=stream, fps=fps, frames_per_row=frames_per_row, offset=offset, splits=splits,
                       skip_missing=skip_missing)
    r = import_features(cfg, progress=not quiet)
    click.echo(f"imported {r['videos']} videos ({r['rows']} rows, streams {', '.join(f'{s} {w}' for s, w in r['widths'].items())}, "
               f"{r['classes']} classes, {r['multi_label']} multi-label, {r['background']} without labels; layout "
               f"{r['layout']}) into {out}; {len(r['missing'])} listed videos without arrays left out, "
               f"{r['not_listed']} arrays not in the list ignored")
