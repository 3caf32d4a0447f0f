#!/usr/bin/env python3
"""The default Cosilo U-Net training step in PyTorch on a GPU, for `bench/gpu/run.sh`.

The same network, loss and optimiser as `appliance/train` (cosilo-train), imported from
`bench/torch_unet.py` (the definition `bench/train_vs_pytorch.py` uses too): per level two blocks of conv3x3 pad 1 -> GroupNorm(4, eps 1e-5) -> ReLU
with base << level channels, 2x2 max-pool written as reshape + amax, ConvTranspose2d(k2, s2) up,
concatenation [skip, up] on channels, 1x1 head; loss = log-softmax cross-entropy + (1 - mean soft
Dice over classes 1..C, smoothing 1, over the whole batch); AdamW lr 2e-3, betas 0.9/0.999,
eps 1e-8, weight decay 1e-4 on convolution weights only. f32 tensors, random inputs.

Each configuration is timed after 3 warm-up steps with torch.cuda.synchronize() before every clock
read; it reports the median ms per step, slices/s, and torch.cuda.max_memory_allocated /
max_memory_reserved (reset before each configuration). Two numeric modes:
- `fp32`: TF32 off for convolutions and matrix products (the arithmetic candle does);
- `default`: PyTorch as shipped (cuDNN convolutions may use TF32; matmul stays fp32).

Usage: torch_step.py --batches 8,128,256 --size 128 --steps 10 [--device cpu] [--modes fp32,default]
Prints one JSON line per configuration.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

# The one PyTorch U-Net (bench/torch_unet.py): beside this file once bench/gpu/build.sh has packed
# it, one folder up in the repository.
sys.path[1:1] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]
from torch_unet import UNet, adamw, batch as make_batch, initialise, loss_fn  # noqa: E402


def run(device, batch, size, steps, mode, budget_s):
    tf32 = mode == "default"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(1)
    net = UNet().to(device)
    initialise(net)
    opt = adamw(net)
    x, labels, one_hot = make_batch(batch, size, size, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, fwd, bwd, upd = [], [], [], []
    start = time.perf_counter()
    warmup = 3
    for i in range(steps + warmup):
        if i == warmup and cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), one_hot)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        value = loss.item()
        sync()
        t3 = time.perf_counter()
        if value != value:
            raise SystemExit(f"non-finite loss at step {i}")
        if i >= warmup:
            times.append((t3 - t0) * 1e3)
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            upd.append((t3 - t2) * 1e3)
            if time.perf_counter() - start > budget_s and len(times) >= 3:
                break
    median = statistics.median(times)
    out = {
        "impl": "pytorch",
        "mode": mode,
        "version": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch": batch,
        "h": size,
        "w": size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "steps": len(times),
        "ms_per_step": median,
        "ms_min": min(times),
        "ms_max": max(times),
        "slices_per_s": batch / (median / 1e3),
        "ms_forward_loss": statistics.mean(fwd),
        "ms_backward": statistics.mean(bwd),
        "ms_optimiser": statistics.mean(upd),
    }
    if cuda:
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    del net, opt, x, labels, one_hot
    if cuda:
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,128,256")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per configuration, at most")
    ap.add_argument("--modes", default="fp32,default")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    for mode in args.modes.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            try:
                r = run(device, batch, args.size, args.steps, mode, args.budget)
            except Exception as e:  # an out-of-memory at one size should not lose the others
                r = {"impl": "pytorch", "mode": mode, "batch": batch, "error": repr(e)[:500]}
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
