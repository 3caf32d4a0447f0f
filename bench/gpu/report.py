#!/usr/bin/env python3
"""Markdown summary of a `bench/gpu/run.sh` output folder: `report.py OUT_DIR` (to stdout)."""

import json
import os
import sys


def lines_json(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return out


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def main():
    out = sys.argv[1]
    md = ["# Cosilo on a GPU: parity checks and the training step, candle vs PyTorch", ""]
    env = os.path.join(out, "env.txt")
    if os.path.exists(env):
        with open(env) as f:
            head = [l.rstrip() for l in f.readlines()[:3]]
        md += ["```", *head, "```", ""]
    check = None
    cpath = os.path.join(out, "check.json")
    if os.path.exists(cpath):
        with open(cpath) as f:
            check = json.load(f)
    if check:
        md += [f"## Checks on {check['device']}: {'all passed' if check['pass'] else 'SOME FAILED'}", ""]
        md += ["| check | forward rel. L2 | worst gradient rel. L2 | tolerance | result |", "|---|---|---|---|---|"]
        for o in check["ops"]:
            if "error" in o:
                md.append(f"| {o['name']} | error: {o['error'][:120]} | | | FAIL |")
                continue
            fwd = o.get("forward_rel_l2", o.get("forward_rel"))
            g = max((x["rel_l2"] for x in o["gradients"]), default=0.0)
            md.append(f"| {o['name']} | {fwd:.1e} | {g:.1e} | {o['tolerance']:.0e} | {'ok' if o['pass'] else 'FAIL'} |")
        md += ["", "Finite differences in f64 on the device (worst of the sampled coordinates, |fd − autograd| / (1 + |fd|)):", ""]
        md += ["| op | worst | tolerance | result |", "|---|---|---|---|"]
        for o in check["gradcheck"]:
            if "error" in o or "worst" not in o:
                md.append(f"| {o['name']} | error: {o.get('error', '?')[:120]} | | FAIL |")
                continue
            md.append(f"| {o['name']} | {o['worst']:.1e} | {o['tolerance']:.0e} | {'ok' if o['pass'] else 'FAIL'} |")
        u = check["unet"]
        md.append("")
        if "error" in u:
            md.append(f"- Whole U-Net: error {u['error']}")
        else:
            md.append(
                f"- Whole U-Net (default, batch {u['batch']} × {u['h']}×{u['w']}): logits rel. L2 {u['logits_rel_l2']:.1e}, "
                f"loss {u['loss_cpu']:.6f} (CPU) vs {u['loss_device']:.6f} (device), worst of {len(u['gradients'])} parameter "
                f"gradients {u['worst_gradient_rel_l2']:.1e} ({u['worst_gradient']}); {'ok' if u['pass'] else 'FAIL'}"
            )
        t = check["training"]
        if "error" in t:
            md.append(f"- Training run: error {t['error']}")
        else:
            c, g = t["loss_cpu"], t["loss_device"]
            md.append(
                f"- Training run ({t['steps']} AdamW steps, batch {t['batch']} × {t['h']}×{t['w']}, same seed and batches): "
                f"loss {c[0]:.4f} → {c[-1]:.4f} on the CPU, {g[0]:.4f} → {g[-1]:.4f} on the device; worst step difference "
                f"{t['worst_rel_to_first']:.1e} of the first loss (tolerance {t['tolerance']}); {'ok' if t['pass'] else 'FAIL'}"
            )
            picks = sorted(set([0, 4, 9, 19, len(c) - 1]))
            md += ["", "| step | " + " | ".join(str(i + 1) for i in picks if i < len(c)) + " |",
                   "|---|" + "---|" * len([i for i in picks if i < len(c)]),
                   "| CPU loss | " + " | ".join(f"{c[i]:.4f}" for i in picks if i < len(c)) + " |",
                   "| GPU loss | " + " | ".join(f"{g[i]:.4f}" for i in picks if i < len(g)) + " |"]
        md.append("")
    candle = {r["batch"]: r for r in lines_json(os.path.join(out, "candle.jsonl")) if "batch" in r}
    torch = {}
    for r in lines_json(os.path.join(out, "torch.jsonl")):
        torch[(r.get("mode"), r.get("batch"))] = r
    smi = {}
    spath = os.path.join(out, "smi_peaks.txt")
    if os.path.exists(spath):
        with open(spath) as f:
            for l in f:
                p = l.split()
                if len(p) >= 3 and p[0] == "candle":
                    try:
                        smi[int(p[1])] = float(p[2])
                    except ValueError:
                        pass
    if candle or torch:
        md += ["## One training step of the default U-Net (base 16, depth 3; forward, loss, backward, AdamW; f32)", ""]
        size = next((r["h"] for r in list(candle.values()) + list(torch.values()) if "h" in r), "?")
        md += [
            f"| batch × {size}² | candle ms/step | candle slices/s | PyTorch fp32 ms/step | PyTorch fp32 slices/s | candle / PyTorch fp32 | "
            "PyTorch default (TF32 convs) ms/step | candle / PyTorch default | candle pool high-water MiB | nvidia-smi peak MiB (candle) | "
            "PyTorch max_memory_allocated MiB (fp32) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for b in sorted(set(candle) | {k[1] for k in torch if k[1] is not None}):
            c = candle.get(b, {})
            p = torch.get(("fp32", b), {})
            d = torch.get(("default", b), {})
            cm, pm, dm = c.get("ms_per_step"), p.get("ms_per_step"), d.get("ms_per_step")
            md.append(
                f"| {b} | {fmt(cm)} | {fmt(c.get('slices_per_s'), '.0f')} | {fmt(pm)} | {fmt(p.get('slices_per_s'), '.0f')} | "
                f"{fmt(cm / pm if cm and pm else None, '.2f')} | {fmt(dm)} | {fmt(cm / dm if cm and dm else None, '.2f')} | "
                f"{fmt(c.get('pool_used_high_mib'), '.0f')} | {fmt(smi.get(b), '.0f')} | {fmt(p.get('max_memory_allocated_mib'), '.0f')} |"
            )
        md += ["", "Phases (ms, mean of the timed steps; forward+loss / backward / optimiser):", ""]
        for b in sorted(candle):
            c = candle[b]
            p = torch.get(("fp32", b), {})
            md.append(
                f"- batch {b}: candle {fmt(c.get('ms_forward_loss'))} / {fmt(c.get('ms_backward'))} / {fmt(c.get('ms_optimiser'))}; "
                f"PyTorch fp32 {fmt(p.get('ms_forward_loss'))} / {fmt(p.get('ms_backward'))} / {fmt(p.get('ms_optimiser'))}"
            )
        errs = [r for r in list(candle.values()) + list(torch.values()) if "error" in r]
        for r in errs:
            md.append(f"- error ({r.get('impl')}, {r.get('mode', '')} batch {r.get('batch')}): {r['error']}")
        md.append("")
    print("\n".join(md))


if __name__ == "__main__":
    main()
