"""Sends DICOM files with pynetdicom, each in its own transfer syntax (no re-encoding), one
association per file so that a rejected context says which file it was.

usage: send_as_is.py HOST PORT CALLED_AE FILE...
Prints one JSON object per file: {"file", "sop_class", "transfer_syntax", "context"
("accepted" | "rejected" | "no-association"), "status" (int or null), "comment" (the
C-STORE response's Error Comment)}.
"""
import json
import sys

from pydicom import dcmread
from pynetdicom import AE

host, port, called = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for path in sys.argv[4:]:
    ds = dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    sop = str(ds.SOPClassUID)
    out = {"file": path, "sop_class": sop, "transfer_syntax": ts, "context": None, "status": None,
           "comment": ""}
    ae = AE(ae_title="SYNTAXES")
    ae.add_requested_context(sop, ts)
    # Verification too, so that the association stands when the file's context is rejected.
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        out["context"] = "no-association"
    else:
        accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == sop]
        if not accepted:
            out["context"] = "rejected"
        else:
            out["context"] = "accepted"
            status = assoc.send_c_store(ds)
            out["status"] = int(status.Status) if status and "Status" in status else None
            out["comment"] = str(status.get("ErrorComment", "")) if status else ""
        assoc.release()
    print(json.dumps(out), flush=True)
