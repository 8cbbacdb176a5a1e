"""`datp extract-flow`: stage one's optical flow (`datp.flows.extract.extract_flow`)."""

from __future__ import annotations

from pathlib import Path

import click

from datp.cli.common import SOURCE_HELP, defaults, finish, size, user_errors
from datp.flows.extract import FlowConfig

D = defaults(FlowConfig)


@click.command("extract-flow", epilog=SOURCE_HELP + " Exit codes: 0 all videos done; "
               "3 some videos failed (listed in OUT.failures.csv); 2 bad input, another process writing OUT, "
               "or a failed write such as a full disk (one line; finished videos are kept); "
               "130 interrupted. Rerunning with another list adds to OUT, never replaces it.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="HDF5 flow store (--format h5) or output folder (--format jpg).")
@click.option("--format", "fmt", type=click.Choice(["h5", "jpg"]), default=D["format"], show_default=True,
              help="h5: one compressed store; jpg: TSN/denseflow flow_x_00001.jpg folders + lists.")
@click.option("--algorithm", type=click.Choice(["tvl1", "dis", "farneback"]), default=D["algorithm"],
              show_default=True)
@click.option("--preset", default=D["preset"], help="Parameter preset of the algorithm (tvl1: tuned "
              "[default: 2.1x less CPU time than opencv at 340x256; end-point error 4x lower on the "
              "4 Middlebury pairs it was tuned on, all from one (Urban2), equal on FlyingChairs, "
              "not tuned on], fast, opencv [OpenCV's defaults, as TSN/mmaction2 features]; dis: "
              "ultrafast, fast, medium [default]); measured with bench/tvl1_agreement.py and "
              "bench/flow_gpu.py on a 2-core Xeon, see docs/flow-presets.md.")
@click.option("--backend", type=click.Choice(["opencv", "torch"]), default=D["backend"], show_default=True,
              help="TV-L1 implementation: OpenCV's, or datp's PyTorch port of it (batched, CPU or "
              "GPU; same flow up to float rounding). OpenCV is faster on the CPU (measured), "
              "hence the default; docs/flow-presets.md.")
@click.option("--device", default=D["device"], show_default=True,
              help="Device of --backend torch: auto, cpu, cuda or cuda:K (opencv: CPU only).")
@click.option("--short-side", type=int, default=D["short_side"], show_default=True,
              help="Resize so the short side has S pixels before flow (0: keep the source size).")
@click.option("--size", "frame_size", default=None, help="Resize to WxH instead (TSN: 340x256).")
@click.option("--bound", type=float, default=D["bound"], show_default=True,
              help="Clip flow to +-B pixels before quantizing to uint8 (128 = zero).")
@click.option("--rgb", is_flag=True, default=D["rgb"], help="With --format jpg, also write img_00001.jpg frames.")
@click.option("--workers", type=int, default=D["workers"], show_default=True,
              help="Worker processes (one OpenCV thread each); use the number of cores.")
@click.option("--shard", default=None, help="Do shard i/n of the dataset (default: torchrun's "
              "RANK/WORLD_SIZE when set); join shard stores with datp merge.")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Folder the videos of list files and split folders are relative to.")
@click.option("--split", type=int, default=1, show_default=True,
              help="Official split number for UCF101/HMDB51 split folders.")
@click.option("--skip-missing", is_flag=True, help="Record missing videos as failures and go on.")
@click.option("--allow-decode-errors", is_flag=True, default=D["allow_decode_errors"],
              help="Keep videos whose stream has corrupt packets (default: record as failed).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def extract_flow_cmd(sources, out, fmt, algorithm, preset, backend, device, short_side, frame_size, bound, rgb, workers,
                     shard, root, split, skip_missing, allow_decode_errors, quiet):
    """Compute optical flow (TV-L1 by default) for every video of SOURCES.

    Resumable: rerunning skips finished videos; a kill at any moment leaves a store that opens.
    One failing video is recorded and the run goes on.
    """
    from datp.flows.extract import extract_flow, shard_out
    from datp.io.datasets import open_dataset, parse_shard

    cfg = FlowConfig(out=str(out), format=fmt, algorithm=algorithm, preset=preset,
                     backend=backend, device=device, short_side=short_side, size=size(frame_size), bound=bound, rgb=rgb,
                     workers=workers, shard=parse_shard(shard),
                     allow_decode_errors=allow_decode_errors)
    dataset, missing = open_dataset(list(sources), root=root, split=split, skip_missing=skip_missing)
    summary = extract_flow(dataset, cfg, progress=not quiet, missing=missing)
    finish(summary, Path(f"{shard_out(cfg.out, cfg.shard, cfg.format)}.failures.csv"), "extract-flow")
