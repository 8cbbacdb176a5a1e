"""The DATP paper's testing schemes P1, P2, P3 (`testing_schemes`, `random_mixture`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datp.pool.metrics import metrics


def random_mixture(num_videos: int, num_gaussians: int, *, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random mixtures for scheme P1, one per video: rho_k = u_k / sum_j u_j with u ~ U(0, 1),
    mu ~ U(0, 1), sigma^2 ~ U(0.01, 0.2) (0.2 is DATP's initial variance).

    Returns:
        rho, mu, sigma, each (num_videos, num_gaussians) float32; a pure function of the seed.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_videos, num_gaussians, generator=g, dtype=torch.float64)
    mu = torch.rand(num_videos, num_gaussians, generator=g, dtype=torch.float64)
    var = 0.01 + 0.19 * torch.rand(num_videos, num_gaussians, generator=g, dtype=torch.float64)
    return (u / u.sum(dim=1, keepdim=True)).float(), mu.float(), var.sqrt().float()


@torch.no_grad()
def testing_schemes(run_dir: str | Path, *, avg_run: str | Path | None = None, features: str | Path | None = None,
                    split: str = "test", seed: int = 0, batch_size: int = 64, device: str = "cpu",
                    max_ram_gb: float = 0.0, keep_logits: bool = False) -> dict:
    """The DATP paper's testing schemes on split `split` of the store.

    - "datp": the run's head as trained.
    - "P2": the same segment classifier (the run's segment scores I_i) with average pooling.
    - "P1": the run's segment scores pooled by DATP's Eq. 1 and 3 with random Gaussians
      (`random_mixture(seed)`) instead of the regressed ones (datp runs with the mog generator).
    - "P3": `avg_run`, a segment classifier trained with average pooling, evaluated with average
      pooling (its own head).
    The paper's claim, P2 > P3 (training with DATP improves the segment classifier itself), is
    checked when both are there; it is only meaningful when both runs train their segment
    classifier (score_source "linear"): on frozen cached scores P2 and P3 are the same numbers.

    Args:
        run_dir: a run of a score-pooling head (datp, or avg/max for P2 alone).
        avg_run: a run of the avg head on the same store and stream, for P3.
        features: the store (default: the one the run was trained on).
        split, seed, batch_size, device, max_ram_gb: what to score; P1's seed; batching; device;
            RAM for the data (0: read per batch).
        keep_logits: also return every scheme's (V, C) logits and the labels, in the store's row
            order of `split` (for late fusion of the schemes' streams, `bench/ablations.py`).

    Returns:
        {"schemes": {name: metrics}, "p2_gt_p3": bool | None, "notes": [str]}, plus "logits"
        {name: (V, C)} and "labels" (V,) with `keep_logits`.

    Raises:
        StoreError: the store lacks the run's stream.
        ValueError: a run that cannot be evaluated this way.
    """
    from datp.extract.store import FeatureStore
    from datp.pool.data import head_input
    from datp.pool.heads.datp import l2_pool_log, mog_log_weights
    from datp.pool.predict import predict, run_data
    from datp.pool.runs import load_run

    run = load_run(run_dir, device=device)
    if not getattr(run.head, "uses_scores", False):
        raise ValueError(f"{run_dir} trained a {run.name} head; the testing schemes need a head that pools segment "
                         "scores (datp)")
    avg = None
    if avg_run is not None:
        avg = load_run(avg_run, device=device)
        if avg.name != "avg":
            raise ValueError(f"--avg-run {avg_run} trained a {avg.name} head; P3 needs an avg run")
        if avg.stream != run.stream:
            raise ValueError(f"--avg-run {avg_run} is a {avg.stream} run but {run_dir} is {run.stream}; use the same stream")
    notes = []
    head = run.head
    mog = run.name == "datp" and head.generator == "mog"
    with FeatureStore(features or run.config["store"]["path"]) as store:
        rows = store.indices(split)
        if not len(rows):
            raise ValueError(f"{store.path.name} has no videos of split {split!r}")
        data = run_data(run, store, rows, max_ram_gb=max_ram_gb)
        # filled in place (see `datp.pool.predict.predict` on why not lists of per-batch arrays)
        V, C = len(rows), len(run.class_names)
        names = [run.name, "P2"] + (["P1"] if mog else [])  # run.name: the head as trained
        logits = {name: np.empty((V, C), np.float32) for name in names}
        labels = np.empty(V, np.int64)
        if mog:
            rho, mu, sigma = (v.to(run.device) for v in random_mixture(V, head.num_gaussians, seed=seed))
        start = 0
        for batch in data.batches(rows, batch_size):
            x = head_input(batch, run.streams, run.device, joint=False)
            mask = x.mask
            part = slice(start, start + len(batch.label))
            scores = head.scores(x, mask)  # (B, N, C) I_i, zero on masked segments
            count = mask.sum(dim=1, keepdim=True).clamp_min(1)
            logits[run.name][part] = head(x).logits.cpu().numpy()
            logits["P2"][part] = (scores.sum(dim=1) / count).cpu().numpy()
            if mog:
                log_w = mog_log_weights(x.t.masked_fill(~mask, 0.0), torch.log(rho[part]), mu[part],
                                        torch.log(sigma[part]))
                pooled = scores if head.pooled_scores == "logits" else torch.softmax(scores, dim=-1)
                logits["P1"][part] = l2_pool_log(pooled, log_w, mask)[0].cpu().numpy()
            labels[part] = batch.label.numpy()
            start = part.stop
        schemes = {k: metrics(v, labels, run.class_names) for k, v in logits.items()}
        if not mog:
            notes.append(f"P1 needs a datp run with the mog generator; {run_dir} is {run.name}"
                         + (f" ({head.generator})" if run.name == "datp" else ""))
        if avg is not None:
            avg_data = run_data(avg, store, rows, max_ram_gb=max_ram_gb)
            p = predict(avg.head, avg_data, rows, batch_size=batch_size, device=avg.device)
            if not np.array_equal(p["labels"], labels):
                raise ValueError(f"--avg-run {avg_run} scored other videos than {run_dir}; use runs of one store")
            schemes["P3"] = metrics(p["logits"], p["labels"], avg.class_names)
            logits["P3"] = p["logits"]
        else:
            notes.append("P3 needs --avg-run (a run of the avg head on the same store and stream)")
    p2_gt_p3 = None
    if "P3" in schemes:
        p2_gt_p3 = schemes["P2"]["top1"] > schemes["P3"]["top1"]
        if run.score_source == "cached" and avg.score_source == "cached":
            notes.append("both runs pool the store's frozen cached scores, so P2 and P3 are the same numbers; "
                         "train both with --score-source linear to test the paper's claim")
    out = {"schemes": schemes, "p2_gt_p3": p2_gt_p3, "notes": notes, "split": split, "videos": int(len(labels))}
    if keep_logits:
        out |= {"logits": logits, "labels": labels}
    return out
