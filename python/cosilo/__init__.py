"""Cosilo from Python.

The SDK (native, from the Rust crates):

- :class:`Segmenter` loads an exported bundle (``model.onnx`` + ``manifest.json``) into ONNX
  Runtime and segments a NumPy volume with its affine, a NIfTI file or a DICOM series folder;
  labels come back as NumPy plus the affine, and can be written as NIfTI or DICOM SEG.
- :func:`read_nifti` / :func:`write_nifti`.

Federations:

- :class:`Declaration` parses and validates ``federation.toml``; :func:`declare` writes one.
- :class:`Federation` provisions it (each member's keys made in its own folder, the operator
  admits them), starts the sites as ``cosilo run`` processes on this machine, watches them as a
  read-only :class:`Observer` of the broker, and stops them.

Every failure raises :class:`CosiloError`, whose message is the Rust error chain.
"""

from ._cosilo import (
    CosiloError,
    Declaration,
    Observer,
    Segmenter,
    __version__,
    hold_session,
    read_nifti,
    write_nifti,
)
from .federation import Federation, declare, find_cosilo

__all__ = [
    "CosiloError",
    "Declaration",
    "Federation",
    "Observer",
    "Segmenter",
    "__version__",
    "declare",
    "find_cosilo",
    "hold_session",
    "read_nifti",
    "write_nifti",
]
