#!/usr/bin/env python3
"""The candle U-Net training step against the identical PyTorch step, side by side.

Run through `bench/train_vs_pytorch.sh`, which builds the candle step timer and installs PyTorch.
Directly: `python3 bench/train_vs_pytorch.py --candle-bin target/release/examples/train_step`.

For every size it runs, in separate processes (so each peak RSS is its own) and alternating round
by round so that both meet the same machine load: the candle step timer
(`appliance/examples/train_step.rs`, Cosilo's CPU ops), the PyTorch step below, and in the first
and last rounds the candle step with candle's own layers and loss (`COSILO_REFERENCE_OPS=1`: the
step before Cosilo's ops, except that the optimiser is the in-place AdamW in both). Each run
reports the median wall time of its timed steps (after one warm-up step) and the process CPU time
per step. Other jobs on a shared machine only ever add time, so the table compares each side's
quietest run (lowest median); every run is listed with the load average beside it.

Both sides (the PyTorch one is `bench/torch_unet.py`, shared with `bench/gpu/torch_step.py`): the same U-Net (conv3x3 pad 1 -> GroupNorm(4) -> ReLU twice per level, reshape 2x2
max-pool, ConvTranspose2d k2 s2, skip concatenation [skip, up], 1x1 head), the same loss
(log-softmax cross-entropy + soft Dice over the foreground classes, smoothing 1), AdamW (lr 2e-3,
betas 0.9/0.999, eps 1e-8, weight decay 1e-4 on convolution weights only), f32, random inputs,
the same thread count (RAYON_NUM_THREADS / torch.set_num_threads + OMP_NUM_THREADS).

`--worker BASE DEPTH BATCH H W STEPS` runs only the PyTorch step and prints one JSON line in the
format of the candle timer.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = [
    # (label, base, depth, batch, h, w)
    ("issue: base 16, depth 3, batch 8 x 128x128", 16, 3, 8, 128, 128),
    ("demo: base 8, depth 3, batch 8 x 96x96", 8, 3, 8, 96, 96),
]
def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def torch_worker(base, depth, batch, h, w, steps):
    import torch

    import torch_unet

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    torch.manual_seed(1)

    net = torch_unet.UNet(base, depth)
    torch_unet.initialise(net)
    opt = torch_unet.adamw(net)
    x, _, one_hot = torch_unet.batch(batch, h, w)
    times = []
    cpu0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch_unet.loss_fn(net(x), one_hot)
        loss.backward()
        opt.step()
        if i > 0:
            times.append((time.perf_counter() - t0) * 1e3)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / steps
    median = statistics.median(times)
    params = sum(p.numel() for p in net.parameters())
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "version": torch.__version__,
                "threads": torch.get_num_threads(),
                "base": base,
                "depth": depth,
                "batch": batch,
                "h": h,
                "w": w,
                "parameters": params,
                "ms_per_step": round(median, 1),
                "cpu_ms_per_step": round(cpu_ms, 1),
                "slices_per_s": round(batch / (median / 1e3), 2),
                "peak_rss_mib": round(peak_rss_mib(), 1),
            }
        )
    )


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


IMPLS = {
    "candle": "candle + Cosilo ops",
    "pytorch": "PyTorch",
    "candle-reference": "candle's own ops (before)",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=6, type=int, metavar=("BASE", "DEPTH", "BATCH", "H", "W", "STEPS"))
    ap.add_argument("--candle-bin", default="target/release/examples/train_step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per implementation and size")
    ap.add_argument("--reference-steps", type=int, default=3, help="timed steps of each reference run (0: skip)")
    ap.add_argument("--reference-runs", type=int, default=2, help="reference runs per size (first and last rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args()
    if args.worker:
        torch_worker(*args.worker)
        return

    env = dict(os.environ)
    t = str(args.threads)
    env.update(BENCH_THREADS=t, RAYON_NUM_THREADS=t, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t)
    for k in ("COSILO_STEP_DETAIL", "COSILO_OP_PROFILE", "COSILO_REFERENCE_OPS"):
        env.pop(k, None)
    ref_env = dict(env, COSILO_REFERENCE_OPS="1")
    results = []
    for label, base, depth, batch, h, w in SIZES:
        dims = [str(v) for v in (base, depth, batch, h, w)]
        runs = []
        plan = []
        ref = ("candle-reference", [args.candle_bin, *dims, str(args.reference_steps)], ref_env)
        ref_runs = args.reference_runs if args.reference_steps > 0 else 0
        for r in range(args.rounds):
            if r == 0 and ref_runs > 1:
                plan.append(ref)
            plan.append(("candle", [args.candle_bin, *dims, str(args.steps)], env))
            plan.append(("pytorch", [sys.executable, __file__, "--worker", *dims, str(args.steps)], env))
        if ref_runs > 0:
            plan.append(ref)
        for name, cmd, e in plan:
            before = loadavg()
            r = run_json(cmd, e)
            r["impl"] = name
            r["load"] = round(max(before, loadavg()), 2)
            runs.append(r)
            print(f"{label}: {IMPLS[name]} {r['ms_per_step']} ms/step (load {r['load']})", file=sys.stderr)
        results.append((label, batch, runs))

    def best(runs, name):
        rs = [r for r in runs if r["impl"] == name]
        return min(rs, key=lambda r: r["ms_per_step"]) if rs else None

    lines = [
        "# candle vs PyTorch: one U-Net training step on CPU",
        "",
        f"Generated by `bench/train_vs_pytorch.sh` on {os.cpu_count()} cores ({cpu_name()}), "
        f"{args.threads} threads for each side, f32, {args.steps} timed steps per run after a warm-up step; "
        f"{args.rounds} alternating rounds per size. "
        f"PyTorch {torch_version(results)}, candle 0.11.1 with Cosilo's CPU ops (`appliance/src/train/ops`). "
        "The machine is shared: the table compares each side's quietest run (lowest median ms/step); "
        "all runs, with the 1-minute load average during each, are listed below it.",
        "",
        "| size | parameters | candle ms/step | PyTorch ms/step | candle / PyTorch | candle slices/s | "
        "PyTorch slices/s | candle peak RSS MiB | PyTorch peak RSS MiB | before (candle's own ops) ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, batch, runs in results:
        c, p, ref = best(runs, "candle"), best(runs, "pytorch"), best(runs, "candle-reference")
        lines.append(
            f"| {label} | {c['parameters']:,} | {c['ms_per_step']:.0f} | {p['ms_per_step']:.0f} | "
            f"{c['ms_per_step'] / p['ms_per_step']:.2f} | {batch / c['ms_per_step'] * 1e3:.1f} | "
            f"{batch / p['ms_per_step'] * 1e3:.1f} | {c['peak_rss_mib']:.0f} | {p['peak_rss_mib']:.0f} | "
            + (f"{ref['ms_per_step']:.0f} |" if ref else "- |")
        )
    lines += ["", "All runs (median wall ms per step / process CPU ms per step, load average):", ""]
    for label, _, runs in results:
        lines.append(f"- {label}:")
        for name in IMPLS:
            rs = [r for r in runs if r["impl"] == name]
            if rs:
                cells = ", ".join(
                    f"{r['ms_per_step']:.0f} / {r.get('cpu_ms_per_step', 0):.0f} (load {r['load']:.2f})" for r in rs
                )
                lines.append(f"  - {IMPLS[name]}: {cells}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def torch_version(results):
    for _, _, runs in results:
        for r in runs:
            if r.get("version"):
                return r["version"]
    return "?"


if __name__ == "__main__":
    main()
