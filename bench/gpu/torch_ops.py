#!/usr/bin/env python3
"""PyTorch counterpart of `gpu_check profile BATCH`: each U-Net op at its largest shape, forward and
forward + backward of sum(f(x) * r), median of 5 synchronised runs after 2 warm-up runs, TF32 off,
with torch.cuda.max_memory_allocated over one forward + backward minus the memory held before it.
Usage: torch_ops.py BATCH. One JSON line per op."""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def maxpool(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def main():
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    dev = torch.device("cuda")
    cases = [
        ("conv3x3 16->16 @128", [(b, 16, 128, 128), (16, 16, 3, 3), (16,)], lambda t: F.conv2d(t[0], t[1], t[2], padding=1)),
        ("conv3x3 32->16 @128", [(b, 32, 128, 128), (16, 32, 3, 3), (16,)], lambda t: F.conv2d(t[0], t[1], t[2], padding=1)),
        ("conv3x3 128->128 @16", [(b, 128, 16, 16), (128, 128, 3, 3), (128,)], lambda t: F.conv2d(t[0], t[1], t[2], padding=1)),
        ("groupnorm+relu 16 @128", [(b, 16, 128, 128), (16,), (16,)], lambda t: F.relu(F.group_norm(t[0], 4, t[1], t[2], 1e-5))),
        ("maxpool2x2 16 @128", [(b, 16, 128, 128)], lambda t: maxpool(t[0])),
        ("convT2x2 32->16 @64->128", [(b, 32, 64, 64), (32, 16, 2, 2), (16,)], lambda t: F.conv_transpose2d(t[0], t[1], t[2], stride=2)),
        ("cat 16+16 @128", [(b, 16, 128, 128), (b, 16, 128, 128)], lambda t: torch.cat([t[0], t[1]], 1)),
        ("conv1x1 16->5 @128", [(b, 16, 128, 128), (5, 16, 1, 1), (5,)], lambda t: F.conv2d(t[0], t[1], t[2])),
    ]
    for name, shapes, f in cases:
        ts = [torch.randn(*s, device=dev, requires_grad=True) for s in shapes]
        with torch.no_grad():
            r = torch.randn_like(f(ts))
        fwd, allt = [], []
        for i in range(7):
            for t in ts:
                t.grad = None
            torch.cuda.synchronize()
            if i == 6:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            y = f(ts)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            (y * r).sum().backward()
            del y
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i == 6:
                high = (torch.cuda.max_memory_allocated() - base) / 2**20
            elif i >= 2:
                fwd.append((t1 - t0) * 1e3)
                allt.append((t2 - t0) * 1e3)
        print(json.dumps({"impl": "pytorch", "op": name, "batch": b, "ms_forward": statistics.median(fwd),
                          "ms_forward_backward": statistics.median(allt), "peak_above_inputs_mib": high}), flush=True)


if __name__ == "__main__":
    main()
