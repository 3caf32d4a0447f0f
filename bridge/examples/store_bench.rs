//! Receiver side of the C-STORE benchmark (`bench/store_bench.sh`): Cosilo's SCP with the durable
//! [`SpoolSink`] (fsync per instance) on a port, until stdin closes.
//!
//! `cargo run --release -p cosilo-bridge --example store_bench -- <spool-dir> <port> [AE] [--no-fsync]`
//!
//! `--no-fsync` swaps in a sink that writes the same files without fsync, the way dcmtk's
//! `storescp` does, to compare the protocol path alone. Never use such a sink in the product.

use std::io::Read;
use std::sync::Arc;

use anyhow::{Context, Result};
use cosilo_bridge::scp::{
    serve, Accepted, InstanceSink, ReceivedInstance, ScpConfig, SinkError, SpoolSink,
};
use dicom::object::FileMetaTableBuilder;

/// Benchmark-only sink: `<dir>/<sop>.dcm` written without fsync (as `storescp` does).
struct NoSyncSink(std::path::PathBuf);

impl InstanceSink for NoSyncSink {
    fn accept(&self, inst: ReceivedInstance) -> Result<Accepted, SinkError> {
        let refused = |e: String| SinkError::Refused(e);
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(inst.sop_class_uid.as_str())
            .media_storage_sop_instance_uid(inst.sop_instance_uid.as_str())
            .transfer_syntax(inst.transfer_syntax.as_str())
            .build()
            .map_err(|e| refused(e.to_string()))?;
        let path = self.0.join(format!("{}.dcm", inst.sop_instance_uid));
        let file = std::fs::File::create(&path).map_err(|source| SinkError::Io {
            path: path.clone(),
            source,
        })?;
        inst.dataset
            .with_exact_meta(meta)
            .write_all(std::io::BufWriter::new(file))
            .map_err(|e| refused(e.to_string()))?;
        Ok(Accepted::Stored)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .context("usage: store_bench <spool-dir> <port> [AE]")?;
    let port: u16 = args
        .get(2)
        .context("port missing")?
        .parse()
        .context("port")?;
    let ae = args
        .get(3)
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "COSILO".into());
    let sink: Arc<dyn InstanceSink> = if args.iter().any(|a| a == "--no-fsync") {
        std::fs::create_dir_all(dir)?;
        Arc::new(NoSyncSink(dir.into()))
    } else {
        Arc::new(SpoolSink::new(dir, 0)?)
    };
    let cfg = ScpConfig {
        ae_title: ae,
        bind: ([127, 0, 0, 1], port).into(),
        ..ScpConfig::default()
    };
    let handle = serve(cfg, sink)?;
    println!("ready {}", handle.local_addr());
    let mut buf = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut buf);
    handle.stop();
    Ok(())
}
