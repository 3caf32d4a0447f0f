"""Type stubs of the native module (``cosilo._cosilo``, built from ``python/src/lib.rs``)."""

from os import PathLike
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]
_Labels = Tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]

__version__: str

class CosiloError(Exception):
    """A Cosilo operation failed; ``str(e)`` is the Rust error chain ("outer: cause: root")."""

    chain: List[str]
    """The chain's links, outermost first."""

class Segmenter:
    """A segmentation bundle (``model.onnx`` + ``manifest.json``) loaded into ONNX Runtime.

    ``ort_library`` is the ONNX Runtime shared library (default ``$ORT_DYLIB_PATH``, then the
    SDK's search); ``threads`` its intra-op threads.
    """

    def __init__(self, bundle: _Path, ort_library: Optional[_Path] = None, threads: Optional[int] = None) -> None: ...
    @property
    def classes(self) -> List[str]:
        """Class names, background first; a voxel's label is its class's index."""
    @property
    def model_name(self) -> str:
        """The bundle's model name."""
    def segment(self, volume: npt.NDArray[np.float32], affine: npt.NDArray[np.float64]) -> _Labels:
        """Segments an (I, J, K) float32 volume whose voxel (i, j, k) lies at
        ``affine @ (i, j, k, 1)`` (RAS mm, as nibabel). Returns (uint8 labels (I, J, K), affine)."""
    def segment_nifti(self, path: _Path) -> _Labels:
        """Segments a NIfTI file; labels on the file's grid."""
    def segment_dicom(self, folder: _Path, seg_out: Optional[_Path] = None) -> _Labels:
        """Segments the DICOM image series in ``folder``; with ``seg_out`` also writes a DICOM SEG."""
    def write_dicom_seg(self, labels: npt.NDArray[np.uint8], folder: _Path, out: _Path) -> None:
        """Writes labels on the grid of the series in ``folder`` as a DICOM SEG referencing it."""

def read_nifti(path: _Path) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Reads a NIfTI-1 file: (float32 (I, J, K) data, 4x4 affine)."""

def write_nifti(path: _Path, data: Union[npt.NDArray[np.uint8], npt.NDArray[np.float32]], affine: npt.NDArray[np.float64]) -> None:
    """Writes uint8 labels or float32 values with their affine as NIfTI-1 (.nii / .nii.gz)."""

class Declaration:
    """A federation declaration (``federation.toml``), parsed and validated."""

    @staticmethod
    def load(path: _Path) -> "Declaration":
        """Reads and validates a file; CosiloError names the key and the reason."""
    @staticmethod
    def parse(text: str) -> "Declaration":
        """Parses and validates declaration text."""
    @property
    def name(self) -> str: ...
    @property
    def sites(self) -> List[str]: ...
    @property
    def observers(self) -> List[str]: ...
    @property
    def strategy(self) -> str: ...
    @property
    def rounds(self) -> Optional[int]: ...
    @property
    def security(self) -> str:
        """"none", "tls" or "mtls"."""
    @property
    def broker_kind(self) -> str:
        """"embedded" or "mosquitto"."""
    @property
    def broker_host(self) -> str: ...
    @property
    def broker_port(self) -> int: ...
    def to_toml(self) -> str: ...

class Observer:
    """A read-only client of the federation's broker; every message is verified against the
    roster before it is reported. ``folder`` is an installed member folder."""

    def __init__(self, folder: _Path, id: Optional[str] = None) -> None: ...
    def poll(self, timeout: float = 1.0) -> List[Dict[str, Any]]:
        """Waits up to ``timeout`` s for events: dicts with ``kind`` "connected",
        "disconnected", "presence", "metrics" (site, round, model_version, dice, loss, cases) or
        "refused" (topic, reason)."""
    def close(self) -> None:
        """Disconnects."""

def hold_session(folder: _Path, timeout: float = 20.0) -> None:
    """Creates the persistent broker session of the site installed in ``folder``."""
