"""TV-L1 optical flow in PyTorch: OpenCV's CPU DualTVL1 retraced step by step, batched, any device.

`tvl1_flow(prev, next, params, device=...)` takes a batch of grayscale pairs (B, H, W) and the
parameters of a `datp.flows.compute.FLOW_PRESETS["tvl1"]` preset (OpenCV's names), and returns
(B, H, W, 2) float32 flow, as `cv2.optflow.DualTVL1OpticalFlow.calc` would for each pair. The
steps (opencv_contrib `modules/optflow/src/tvl1flow.cpp`, `calc` and `procOneScale`):

1. Frames as float32 0..255; a pyramid of `scalesNumber` levels made with `cv::resize`
   INTER_LINEAR by `scaleStep`, stopped under 16 px (`tvl1_ops.pyramid_sizes`).
2. From the coarsest level (flow 0) to the finest; between levels the flow is resized (INTER_LINEAR,
   to the finer size) and multiplied by 1 / scaleStep.
3. Per level: the centred gradient of I1; the dual variables p set to 0; then `warpingsNumber`
   times: warp I1 and its gradient by the flow (bicubic, 0 outside), form |grad|^2 and the constant
   part of the residual rho, and run up to `outerIterations` blocks, each a median filter of the
   flow (`medianFiltering`, replicated borders) then up to `innerIterations` iterations of:
   thresholding (lambda * theta), u = v + theta * div p, the error sum |u - u_old|^2, the dual
   step p = (p + tau / theta * grad u) / (1 + tau / theta * |grad u|).
4. The epsilon rule: a warp's iterations end once the error of an iteration is at most
   epsilon^2 * H * W (the dual step of that iteration still runs). Each pair of the batch stops on
   its own error: a stopped pair is frozen while the others go on, so every pair gets exactly
   the iterations OpenCV would give it alone.

What still differs from OpenCV (docs/flow-presets.md, tests/flows/test_tvl1_agreement.py): float
rounding (OpenCV sums the error in one float32 running sum, this sums exactly in float64, so an
iteration whose error is within rounding of the threshold can stop in one and not the other;
SIMD orders of operations), and `gamma` (0 in every preset) is not implemented.
"""

from __future__ import annotations

import numpy as np
import torch

from datp.flows.tvl1_ops import (
    centered_gradient,
    divergence,
    forward_gradient,
    median_blur,
    pyramid_sizes,
    remap_cubic,
    resize_linear,
)

FLT_EPSILON = float(np.finfo(np.float32).eps)  # std::numeric_limits<float>::epsilon()


def _as_batch(frames, device: torch.device) -> torch.Tensor:
    """uint8 or float (B, H, W) / (H, W) arrays or tensors -> (B, H, W) float32 0..255 on device."""
    t = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"frames must be (B, H, W) or (H, W) grayscale, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _check_params(params: dict) -> None:
    if float(params.get("gamma", 0.0)) != 0.0:
        raise ValueError(f"gamma {params['gamma']}: the torch TV-L1 implements gamma = 0 only "
                         "(every datp preset); use backend 'opencv'")
    if params.get("useInitialFlow", False):
        raise ValueError("useInitialFlow is not supported by the torch TV-L1")


def tvl1_flow(prev, next, params: dict, *, device: str | torch.device = "cpu",
              remap_tab_size: int | None = None) -> torch.Tensor:
    """Dual TV-L1 flow of a batch of grayscale pairs, as OpenCV's CPU `DualTVL1OpticalFlow`.

    Args:
        prev, next: (B, H, W) or (H, W) grayscale frames (uint8 0..255, or float on that scale),
            numpy arrays or tensors; H, W >= 3.
        params: OpenCV's parameter names and values (a `FLOW_PRESETS["tvl1"]` preset).
        device: where to compute ("cpu", "cuda", "cuda:1", a torch.device).
        remap_tab_size: None: bicubic warping at exact positions (OpenCV 5.0); 32: positions
            rounded to 1/32 px (OpenCV 4.x); see `tvl1_ops.remap_cubic`.

    Returns:
        (B, H, W, 2) float32 flow on `device`: prev(y, x) ~ next(y + flow[..., 1], x + flow[..., 0]).
    """
    _check_params(params)
    device = torch.device(device)
    with torch.inference_mode():
        I0, I1 = _as_batch(prev, device), _as_batch(next, device)
        if I0.shape != I1.shape:
            raise ValueError(f"frames differ in size: prev {tuple(I0.shape)}, next {tuple(I1.shape)}")
        B, H, W = I0.shape
        if H < 3 or W < 3:
            raise ValueError(f"frames of {H}x{W} px: TV-L1 needs at least 3x3")
        step = float(params["scaleStep"])
        sizes = pyramid_sizes(H, W, step, int(params["scalesNumber"]))
        I0s, I1s = [I0], [I1]
        for size in sizes[1:]:
            I0s.append(resize_linear(I0s[-1], size, factor=step))
            I1s.append(resize_linear(I1s[-1], size, factor=step))
        u1 = torch.zeros((B, *sizes[-1]), dtype=torch.float32, device=device)
        u2 = torch.zeros_like(u1)
        for s in range(len(sizes) - 1, -1, -1):
            u1, u2 = _one_scale(I0s[s], I1s[s], u1, u2, params, remap_tab_size)
            if s > 0:  # to the next finer level, in pixels of that level
                u1 = resize_linear(u1, sizes[s - 1]) * np.float32(1.0 / step)
                u2 = resize_linear(u2, sizes[s - 1]) * np.float32(1.0 / step)
        return torch.stack([u1, u2], dim=-1)


def _one_scale(I0, I1, u1, u2, params: dict, remap_tab_size):
    """procOneScale: every warp of one pyramid level for the whole batch; returns (u1, u2)."""
    B, H, W = I0.shape
    theta = np.float32(params["theta"])
    l_t = np.float32(params["lambda"] * params["theta"])
    taut = np.float32(params["tau"] / params["theta"])
    median = int(params["medianFiltering"])
    eps = float(np.float32(params["epsilon"] ** 2 * H * W))  # OpenCV keeps it as a float
    I1x, I1y = centered_gradient(I1)
    images = torch.stack([I1, I1x, I1y], dim=1)  # (B, 3, H, W): warped together
    xs = torch.arange(W, device=I0.device, dtype=torch.float32)
    ys = torch.arange(H, device=I0.device, dtype=torch.float32)[:, None]
    p11, p12, p21, p22 = (torch.zeros_like(I0) for _ in range(4))
    for _ in range(int(params["warpingsNumber"])):
        warped = remap_cubic(images, xs + u1, ys + u2, tab_size=remap_tab_size)
        I1w, I1wx, I1wy = warped.unbind(1)
        grad = I1wx * I1wx + I1wy * I1wy
        rho_c = I1w - I1wx * u1 - I1wy * u2 - I0
        fixed = (I1wx, I1wy, grad, rho_c)
        state = [u1, u2, p11, p12, p21, p22]
        # The pairs still iterating (error > epsilon so far) are worked on as a smaller batch:
        # `work` holds their state; when one stops, its state goes back and the batch shrinks.
        idx = torch.arange(B, device=I0.device)
        work, work_fixed = list(state), fixed
        for _ in range(int(params["outerIterations"])):
            if median > 1:
                work[0], work[1] = median_blur(work[0], median), median_blur(work[1], median)
            for _ in range(int(params["innerIterations"])):
                *work, error = _iteration(*work_fixed, *work, l_t=l_t, theta=theta, taut=taut)
                going = error > eps  # (b,) of the working pairs
                if not bool(going.all()):
                    _put(state, idx, work)
                    idx, keep = idx[going], going.nonzero()[:, 0]
                    work = [t[keep] for t in work]
                    work_fixed = tuple(t[idx] for t in fixed)
                if len(idx) == 0:
                    break
            if len(idx) == 0:
                break
        _put(state, idx, work)
        u1, u2, p11, p12, p21, p22 = state
    return u1, u2


def _put(state: list, idx: torch.Tensor, work: list) -> None:
    """Writes the working pairs' tensors back into the whole batch's (`state[k][idx] = work[k]`)."""
    for k, t in enumerate(work):
        if len(idx) == 0 or t is state[k]:
            continue
        if len(idx) == state[k].shape[0]:
            state[k] = t
        else:
            state[k] = state[k].index_copy(0, idx, t)


def _iteration(I1wx, I1wy, grad, rho_c, u1, u2, p11, p12, p21, p22, *, l_t, theta, taut):
    """One inner iteration (estimateV, divergence, estimateU, forwardGradient,
    estimateDualVariables); returns (u1, u2, p11, p12, p21, p22, error per pair (B,) float64)."""
    rho = rho_c + (I1wx * u1 + I1wy * u2)
    lg = l_t * grad
    fi = torch.where(grad > FLT_EPSILON, -rho / grad, torch.zeros_like(rho))
    fi = torch.where(rho < -lg, l_t, torch.where(rho > lg, -l_t, fi))  # thresholding step
    v1 = u1 + fi * I1wx
    v2 = u2 + fi * I1wy
    n1 = v1 + theta * divergence(p11, p12)
    n2 = v2 + theta * divergence(p21, p22)
    d1, d2 = n1 - u1, n2 - u2
    error = (d1 * d1 + d2 * d2).sum(dim=(1, 2), dtype=torch.float64)  # (B,)
    u1x, u1y = forward_gradient(n1)
    u2x, u2y = forward_gradient(n2)
    ng1 = 1.0 + taut * torch.hypot(u1x, u1y)
    ng2 = 1.0 + taut * torch.hypot(u2x, u2y)
    return (n1, n2, (p11 + taut * u1x) / ng1, (p12 + taut * u1y) / ng1,
            (p21 + taut * u2x) / ng2, (p22 + taut * u2y) / ng2, error)
