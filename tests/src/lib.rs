//! # cosilo-tests
//!
//! The cross-crate integration harness: helpers the tests under `tests/tests/` share. Each test
//! that needs an outside program (Python's ONNX tools, ONNX Runtime) finds it here and fails with a
//! message saying how to install it, never skipping silently.

use std::path::PathBuf;

pub mod bridge_process;
pub mod brokers;
pub mod federation_harness;
pub mod orthanc;

/// A free TCP port on loopback (one definition, in `orthanc.rs`, which the bridge's own tests
/// include by path).
pub use orthanc::free_port;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The Python interpreter with the reference tools: `COSILO_PYTHON`, else the project's `.venv`
/// (made by `scripts/test.sh`), else `python3`.
pub fn python() -> String {
    if let Ok(p) = std::env::var("COSILO_PYTHON") {
        return p;
    }
    let venv = workspace_root().join(".venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}
