#!/usr/bin/env python3
"""Peak memory of the whole site daemon with 2, 4 and 8 peers, every site a real `cosilo run`
process, federated over the embedded MQTT broker (rumqttd).

For each peer count P it lays out P + 1 sites (s01, s02, ...; site i trains on cohort hospital
h1/h2/h3 in turn, training cases only, so no held-out evaluation runs), keys from
`cosilo keygen`, a roster and site configurations edited from `cosilo print-default-config site`.
The embedded broker runs in one more `cosilo run` process, `broker`, a site of a federation of
its own (one site, strategy `fedavg`: a site with strategy `local` starts no broker; rounds enough to outlive the measured sites) so that no measured site
carries the broker and the broker never leaves before the sites have said goodbye (a site that
hosted it and finished first cut the others off). The script starts it, waits until it accepts
connections, starts the sites, waits for every site to exit, then stops it with SIGTERM. While a site runs its VmHWM is read from
/proc/PID/status every 0.2 s; when it exits, os.wait4 gives its ru_maxrss (the same high-water
mark, read by the kernel at exit). A site that exits must exit 0 with a summary saying the
strategy finished, or the script stops with an error; a site still running after --timeout is
killed and reported as not finished (its VmHWM up to then is kept, its ru_maxrss is not).

    bench/daemon_memory.py --bin target/release/cosilo --label after --out out/daemon-memory \
        [--peers 2,4,8] [--strategy gossip-avg] [--base 64] [--rounds 3] [--steps 2]

Prints one JSON line per site and run; `--table` prints the Markdown rows instead.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def edit_toml(text, values):
    """Sets `key = value` in `[section]` for every (section, key) of `values`, appending keys the
    text does not have (or has only commented out) at the end of their section."""
    out, section, seen = [], None, set()

    def flush(sec):
        for (s, k), v in values.items():
            if s == sec and (s, k) not in seen:
                out.append(f"{k} = {v}")
                seen.add((s, k))

    for line in text.splitlines():
        m = re.match(r"^\[(\w+)\]\s*$", line)
        if m:
            flush(section)
            section = m.group(1)
            out.append(line)
            continue
        m = re.match(r"^(\w+)\s*=", line)
        if m and (section, m.group(1)) in values:
            out.append(f"{m.group(1)} = {values[(section, m.group(1))]}")
            seen.add((section, m.group(1)))
            continue
        out.append(line)
    flush(section)
    missing = set(values) - seen
    if missing:
        raise SystemExit(f"sections not found for {sorted(missing)}")
    return "\n".join(out) + "\n"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def training_manifest(cohort, dest):
    """The cohort's manifest without its held-out cases (so no site spends minutes scoring)."""
    with open(os.path.join(cohort, "manifest.json")) as f:
        m = json.load(f)
    cases = m["cases"]
    m["cases"] = [c for c in cases if c.get("split", "train") == "train"]
    if not m["cases"] or len(m["cases"]) == len(cases):
        raise SystemExit("the cohort manifest has no train/test split field as expected")
    # Paths in the manifest are relative to its folder: keep it beside the original.
    with open(dest, "w") as f:
        json.dump(m, f)
    return dest


def federation(args, peers, root, manifest):
    sites = [f"s{i + 1:02d}" for i in range(peers + 1)]
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rosters = {"memory": ['[federation]\nname = "memory"\n'], "broker": ['[federation]\nname = "broker"\n']}
    for s in sites + ["broker"]:
        fed = "broker" if s == "broker" else "memory"
        rosters[fed].append(run([args.bin, "keygen", "--site", s, "--out", root]).stdout)
    for fed, lines in rosters.items():
        with open(os.path.join(root, f"roster-{fed}.toml"), "w") as f:
            f.write("\n".join(lines))
    default = run([args.bin, "print-default-config", "site"]).stdout
    port = free_port()
    for i, s in enumerate(sites + ["broker"]):
        host = s == "broker"
        fed = "broker" if host else "memory"
        hospital = f"h{i % 3 + 1}"
        store = os.path.join(root, f"{s}-store")
        run([args.bin, "import", "--store", store, "--manifest", manifest, "--hospital", hospital])
        q = lambda v: json.dumps(v)  # noqa: E731 (TOML strings are JSON strings here)
        values = {
            ("site", "id"): q(s),
            ("site", "store"): q(store),
            ("site", "hospital"): q(hospital),
            ("federation", "name"): q(fed),
            ("federation", "strategy"): q("fedavg" if host else args.strategy),
            ("federation", "roster"): q(os.path.join(root, f"roster-{fed}.toml")),
            ("federation", "key"): q(os.path.join(root, f"{s}.key")),
            ("federation", "rounds"): 1_000_000 if host else args.rounds,
            ("federation", "steps_per_round"): 1 if host else args.steps,
            ("federation", "personalise_steps"): 0,
            ("federation", "eval_every"): 0,
            ("federation", "quorum"): "1.0",
            ("federation", "round_deadline_s"): 600,
            ("federation", "update_timeout_s"): args.update_timeout,
            ("broker", "embedded"): "true" if host else "false",
            ("broker", "port"): port,
            # The broker's own site trains the smallest model (it is not measured).
            ("train", "base"): 4 if host else args.base,
            ("train", "depth"): 2 if host else args.depth,
            ("train", "batch_size"): args.batch,
            ("train", "patch"): f"[{args.patch}, {args.patch}]",
        }
        with open(os.path.join(root, f"{s}.toml"), "w") as f:
            f.write(edit_toml(default, values))
    return sites, port


def wait_for_port(port, proc, deadline):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the broker process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the embedded broker did not accept connections in time")


def measure(args, peers, root, manifest):
    sites, port = federation(args, peers, root, manifest)
    env = dict(os.environ, RAYON_NUM_THREADS="1", RUST_LOG="info", NO_COLOR="1")
    procs = {}
    deadline = time.monotonic() + args.timeout

    def start(s):
        log = open(os.path.join(root, f"{s}.log"), "w")
        cmd = [args.bin, "run", "--config", os.path.join(root, f"{s}.toml"),
               "--summary", os.path.join(root, f"{s}-summary.json")]
        procs[s] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    start("broker")
    broker = procs.pop("broker")
    wait_for_port(port, broker, deadline)
    for s in sites:
        start(s)
    hwm = {s: 0 for s in sites}
    result = {}
    try:
        while len(result) < len(sites):
            if time.monotonic() > deadline:
                # Report what finished; a site still running is killed and marked.
                for s, p in procs.items():
                    if s not in result:
                        p.kill()
                        p.wait()
                        result[s] = (None, None)
                break
            if broker.poll() is not None:
                raise SystemExit(f"{peers} peers: the broker process exited early ({root})")
            for s, p in procs.items():
                if s in result:
                    continue
                v = vm_hwm_kib(p.pid)
                if v is not None:
                    hwm[s] = max(hwm[s], v)
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    result[s] = (p.returncode, ru.ru_maxrss)
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
        broker.terminate()
        try:
            broker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
    rows = []
    for s in sites:
        code, maxrss = result[s]
        if code is None:
            print(f"{peers} peers: {s} did not finish within {args.timeout} s ({root})", file=sys.stderr)
            rows.append({
                "label": args.label, "strategy": args.strategy, "peers": peers, "site": s,
                "finished": False, "vm_hwm_mib": round(hwm[s] / 1024, 1), "maxrss_mib": None,
                "bytes_received": None,
            })
            continue
        summary_path = os.path.join(root, f"{s}-summary.json")
        finished = False
        received = None
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            finished = summary.get("finished", False)
            received = summary.get("bytes_received")
        if code != 0 or not finished:
            raise SystemExit(f"{peers} peers: {s} exited {code}, finished {finished} (see {root})")
        rows.append({
            "label": args.label, "strategy": args.strategy, "peers": peers, "site": s,
            "finished": True, "vm_hwm_mib": round(hwm[s] / 1024, 1),
            "maxrss_mib": round(maxrss / 1024, 1), "bytes_received": received,
        })
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default="out/daemon-memory")
    ap.add_argument("--peers", default="2,4,8")
    ap.add_argument("--strategy", default="gossip-avg")
    ap.add_argument("--base", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run; sites still running then are killed and reported")
    ap.add_argument("--update-timeout", type=int, default=240, help="the sites' update_timeout_s (a dead peer is given up after it)")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    out = os.path.abspath(args.out)
    cohort = os.path.join(out, "cohort")
    if not os.path.exists(os.path.join(cohort, "manifest.json")):
        run([args.bin, "data", "fetch"])
        run([args.bin, "data", "cohort", "--out", cohort, "--seed", "11", "--sizes", "2,2,1", "--test", "1"])
    manifest = training_manifest(cohort, os.path.join(cohort, "train-only.json"))
    for peers in [int(p) for p in args.peers.split(",")]:
        rows = measure(args, peers, os.path.join(out, f"{args.label}-{args.strategy}-p{peers}"), manifest)
        if args.table:
            hwm = [r["vm_hwm_mib"] for r in rows if r["finished"]]
            print(f"| {args.label} | {args.strategy} | {peers} | {min(hwm)} | "
                  f"{round(statistics.median(hwm), 1)} | {max(hwm)} | "
                  f"{max(r['maxrss_mib'] for r in rows if r['finished'])} | "
                  f"{sum(not r['finished'] for r in rows)} |", flush=True)
        else:
            for r in rows:
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
