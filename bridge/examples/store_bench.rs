//! Receiver side of the C-STORE benchmark (`bench/store_bench.sh`): Cosilo's SCP on a port, until
//! stdin closes, with one of three sinks:
//!
//! - `--deid`: what `cosilo bridge` runs, [`DeidSink`]: de-identification with the pseudonym
//!   table (its own fdatasync only when an instance brings a new series-level pseudonym, i.e. the
//!   first instance of a series; the instances' own UIDs are synced every second, as the bridge's
//!   poll loop does), then the durable [`SpoolSink`] (one journal append + fdatasync), then the
//!   assembler;
//! - default: the durable [`SpoolSink`] alone (one journal append + fdatasync per instance);
//! - `--no-fsync`: see below.
//!
//! `cargo run --release -p cosilo-bridge --example store_bench -- <dir> <port> [AE] [--deid|--no-fsync]`
//!
//! `--no-fsync` swaps in a sink that writes the same files without fsync, the way dcmtk's
//! `storescp` does, to compare the protocol path alone. Never use such a sink in the product.

use std::io::Read;
use std::sync::Arc;

use anyhow::{Context, Result};
use cosilo_bridge::assemble::{SeriesAssembler, SystemClock};
use cosilo_bridge::deid::{DatePolicy, Deidentifier, MappingStore};
use cosilo_bridge::pipeline::DeidSink;
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

/// `--sync-bench DIR`: the cost of one durable 130 KB write, three ways (median of 200):
/// a new file (write + fdatasync + rename + directory fsync, the old SpoolSink), an append into a
/// segment that was only `fallocate`d (unwritten extents: each fdatasync also commits metadata),
/// an append into a segment zero-filled beforehand (fdatasync flushes data blocks only), and the
/// same with 4 KB records (mostly the device flush itself).
fn sync_bench(dir: &std::path::Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::time::Instant;
    std::fs::create_dir_all(dir)?;
    let payload = vec![0x5au8; 130_000];
    let n = 200usize;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut newfile = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let tmp = dir.join(format!(".{i}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&payload)?;
        f.sync_data()?;
        std::fs::rename(&tmp, dir.join(format!("{i}.dcm")))?;
        std::fs::File::open(dir)?.sync_all()?;
        newfile.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seg = |name: &str, zero: bool, payload: &[u8]| -> Result<Vec<f64>> {
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let size = (payload.len() * n) as u64 + 4096;
        f.set_len(size)?;
        if zero {
            let z = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < size {
                let len = z.len().min((size - off) as usize);
                f.write_all_at(&z[..len], off)?;
                off += len as u64;
            }
        } else {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on an open descriptor.
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
            anyhow::ensure!(rc == 0, "fallocate: {}", std::io::Error::last_os_error());
        }
        f.sync_all()?;
        let mut out = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            f.write_all_at(payload, 4096 + (i * payload.len()) as u64)?;
            f.sync_data()?;
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(out)
    };
    let falloc = seg("fallocated.seg", false, &payload)?;
    let zeroed = seg("zeroed.seg", true, &payload)?;
    let small = seg("small.seg", true, &payload[..4096])?;
    println!("durable 130 KB write, median of {n} (ms):");
    println!(
        "  new file + fdatasync + rename + dir fsync: {:.3}",
        median(newfile)
    );
    println!(
        "  append to fallocated segment + fdatasync:  {:.3}",
        median(falloc)
    );
    println!(
        "  append to zero-filled segment + fdatasync: {:.3}",
        median(zeroed)
    );
    println!(
        "  same, 4 KB instead of 130 KB (the flush alone): {:.3}",
        median(small)
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sync-bench") {
        return sync_bench(std::path::Path::new(
            args.get(2).context("--sync-bench DIR")?,
        ));
    }
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
    } else if args.iter().any(|a| a == "--deid") {
        let root = std::path::Path::new(dir);
        let deid = Deidentifier::new(b"store-bench secret, 32 bytes long", DatePolicy::Remove)?
            .with_mapping(MappingStore::open(&root.join("state"))?);
        let spool = root.join("spool");
        let assembler = Arc::new(SeriesAssembler::open(
            &spool,
            std::time::Duration::from_secs(3600),
            Arc::new(SystemClock::default()),
        )?);
        let sink = Arc::new(DeidSink::new(deid, SpoolSink::new(&spool, 0)?, assembler));
        // The bridge's poll loop syncs the deferred mapping lines every poll interval (1 s).
        let syncer = Arc::downgrade(&sink);
        std::thread::spawn(move || {
            while let Some(sink) = syncer.upgrade() {
                if let Err(e) = sink.sync_mapping() {
                    eprintln!("mapping sync failed: {e}");
                }
                drop(sink);
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        sink
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
