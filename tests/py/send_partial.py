"""Sends the first N of FILES in one association with pynetdicom, then ends it as told.

usage: send_partial.py HOST PORT CALLED_AE MODE N FILE...
MODE: "abort" (A-ABORT after N), "release" (A-RELEASE after N), "hold" (after N, wait for the
test to kill this process or the peer: a sender cut off without either).
Prints "sent K" after the K-th success; any non-success status is an error (exit 2).
"""
import sys
import time

from pydicom import dcmread
from pynetdicom import AE

host, port, called, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
files = sys.argv[6:][:n]
datasets = [dcmread(f) for f in files]
ae = AE(ae_title="PARTIAL")
for sop, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
    ae.add_requested_context(sop, ts)
assoc = ae.associate(host, port, ae_title=called)
if not assoc.is_established:
    print("no association", flush=True)
    sys.exit(1)
for k, ds in enumerate(datasets, 1):
    status = assoc.send_c_store(ds)
    if not status or status.Status != 0:
        print(f"status {status.Status if status else None} at {k} (established {assoc.is_established}, aborted {assoc.is_aborted})", flush=True)
        sys.exit(2)
    print(f"sent {k}", flush=True)
if mode == "abort":
    assoc.abort()
elif mode == "release":
    assoc.release()
else:
    while True:
        time.sleep(1)
