//! The SCP against real senders: dcmtk's `echoscu` / `storescu` (with `TCP_NODELAY=1`), Cosilo's
//! own SCU, and a hand-driven dicom-ul association for malformed and aborted transfers. Every test
//! starts its own SCP on a free loopback port with a temp spool.

mod net_support;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use cosilo_bridge::dimse::{CStoreRq, Command, Priority, Status};
use cosilo_bridge::journal::{self, JournalConfig};
use cosilo_bridge::scp::{Accepted, InstanceSink, ReceivedInstance, ScpConfig, SpoolSink};
use cosilo_bridge::scu::{self, PeerAe};
use dicom::encoding::TransferSyntaxIndex;
use dicom::transfer_syntax::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociation, ClientAssociationOptions, Pdu};
use net_support::*;

/// Polls `f` every 20 ms until it holds, failing after 10 s.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn peer(scp: &TestScp) -> PeerAe {
    PeerAe::new("COSILO", &scp.addr(), "TESTSCU")
}

#[test]
fn echoscu_gets_success() -> Result<()> {
    let scp = TestScp::start(scp_config(), 0)?;
    let out = dcmtk(
        "echoscu",
        &[
            "-aec",
            "COSILO",
            "-aet",
            "ECHOSCU",
            "127.0.0.1",
            &scp.port(),
        ],
    )?;
    ensure_success(&out, "echoscu")?;
    scu::echo(&peer(&scp))?;
    Ok(())
}

#[test]
fn storescu_explicit_and_implicit_arrive_with_identical_pixels() -> Result<()> {
    let src = tempfile::tempdir()?;
    let scp = TestScp::start(scp_config(), 0)?;
    for (flag, series) in [
        ("-xe", "1.2.826.0.1.3680043.8.498.1.1.1"),
        ("-xi", "1.2.826.0.1.3680043.8.498.1.1.2"),
    ] {
        let files = write_series(
            &src.path().join(flag),
            &ct_spec("1.2.826.0.1.3680043.8.498.1", series, 4),
        )?;
        let mut args = vec!["-aec", "COSILO", "-aet", "STORESCU", flag, "127.0.0.1"];
        let port = scp.port();
        args.push(&port);
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        ensure_success(&dcmtk("storescu", &args)?, "storescu")?;
        for f in &files {
            let uid = sop_uid(f)?;
            let stored = scp
                .spool
                .path()
                .join("1.2.826.0.1.3680043.8.498.1")
                .join(series)
                .join(format!("{uid}.dcm"));
            assert!(
                stored.exists(),
                "{} missing after storescu {flag}",
                stored.display()
            );
            assert_eq!(
                pixel_bytes(&stored)?,
                pixel_bytes(f)?,
                "pixel data differs ({flag})"
            );
            let meta_ts = dicom::object::open_file(&stored)?
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_string();
            let expect = if flag == "-xi" {
                "1.2.840.10008.1.2"
            } else {
                EXPLICIT_LE
            };
            assert_eq!(meta_ts, expect);
        }
    }
    // dcmdump (an independent reader) parses what we wrote.
    let any = scp.files().into_iter().next().expect("stored files");
    ensure_success(&dcmtk("dcmdump", &[&any.display().to_string()])?, "dcmdump")?;
    assert_eq!(scp.files().len(), 8);
    Ok(())
}

#[test]
fn storescu_required_contexts_send_a_segmentation() -> Result<()> {
    let src = tempfile::tempdir()?;
    let mut spec = ct_spec(
        "1.2.826.0.1.3680043.8.498.2",
        "1.2.826.0.1.3680043.8.498.2.1",
        1,
    );
    spec.sop_class = SEG;
    spec.modality = "SEG";
    let files = write_series(src.path(), &spec)?;
    let scp = TestScp::start(scp_config(), 0)?;
    let out = dcmtk(
        "storescu",
        &[
            "-R",
            "-aec",
            "COSILO",
            "127.0.0.1",
            &scp.port(),
            &files[0].display().to_string(),
        ],
    )?;
    ensure_success(&out, "storescu -R")?;
    assert_eq!(scp.files().len(), 1);
    Ok(())
}

#[test]
fn calling_ae_outside_the_allowlist_is_rejected() -> Result<()> {
    let cfg = ScpConfig {
        allowed_calling_aes: vec!["PACS".into()],
        ..scp_config()
    };
    let scp = TestScp::start(cfg, 0)?;
    let out = dcmtk(
        "echoscu",
        &[
            "-aec",
            "COSILO",
            "-aet",
            "INTRUDER",
            "127.0.0.1",
            &scp.port(),
        ],
    )?;
    assert!(!out.status.success(), "echoscu from INTRUDER should fail");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Rejected") || text.contains("rejected"),
        "{text}"
    );
    let ok = dcmtk(
        "echoscu",
        &["-aec", "COSILO", "-aet", "PACS", "127.0.0.1", &scp.port()],
    )?;
    ensure_success(&ok, "echoscu from PACS")?;
    Ok(())
}

#[test]
fn unknown_sop_class_is_refused_and_nothing_stored() -> Result<()> {
    let src = tempfile::tempdir()?;
    let mut spec = ct_spec(
        "1.2.826.0.1.3680043.8.498.3",
        "1.2.826.0.1.3680043.8.498.3.1",
        1,
    );
    spec.sop_class = "1.2.840.10008.5.1.4.1.1.6.1"; // Ultrasound Image Storage
    let files = write_series(src.path(), &spec)?;
    let scp = TestScp::start(scp_config(), 0)?;
    let out = dcmtk(
        "storescu",
        &[
            "-R",
            "-aec",
            "COSILO",
            "127.0.0.1",
            &scp.port(),
            &files[0].display().to_string(),
        ],
    )?;
    assert!(
        !out.status.success(),
        "storescu of an ultrasound image should fail"
    );
    // dicom-ul refuses an association in which no context was accepted.
    let e = scu::store(&peer(&scp), &files).unwrap_err();
    assert!(e.to_string().contains("no presentation contexts"), "{e}");
    assert!(scp.files().is_empty());
    Ok(())
}

/// Opens a CT association by hand (explicit VR LE) for malformed / aborted transfers.
fn raw_ct_association(scp: &TestScp) -> Result<(ClientAssociation<std::net::TcpStream>, u8)> {
    let a = ClientAssociationOptions::new()
        .calling_ae_title("RAW")
        .called_ae_title("COSILO")
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .establish(scp.addr().as_str())?;
    let pc = a.presentation_contexts()[0].id;
    Ok((a, pc))
}

fn store_rq(uid: &str) -> Command {
    Command::StoreRq(CStoreRq {
        message_id: 1,
        priority: Priority::Medium,
        affected_sop_class_uid: CT.into(),
        affected_sop_instance_uid: uid.into(),
        move_originator_ae: None,
        move_originator_message_id: None,
    })
}

fn send_raw(
    a: &mut ClientAssociation<std::net::TcpStream>,
    pc: u8,
    cmd: &Command,
    data: &[u8],
    last: bool,
) -> Result<()> {
    a.send(&Pdu::PData {
        data: vec![
            PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd.encode(),
            },
            PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Data,
                is_last: last,
                data: data.to_vec(),
            },
        ],
    })?;
    Ok(())
}

fn response_status(a: &mut ClientAssociation<std::net::TcpStream>) -> Result<Status> {
    match a.receive()? {
        Pdu::PData { data } => match Command::decode(&data[0].data)? {
            Command::StoreRsp(r) => Ok(r.status),
            other => anyhow::bail!("unexpected {other:?}"),
        },
        other => anyhow::bail!("unexpected PDU {other:?}"),
    }
}

fn encoded_slice(uid_series: &str, i: usize) -> Result<(String, Vec<u8>)> {
    let spec = ct_spec("1.2.826.0.1.3680043.8.498.4", uid_series, i + 1);
    let ds = slice_dataset(&spec, i);
    let uid = format!("{uid_series}.{}", i + 1);
    let ts = TransferSyntaxRegistry
        .get(EXPLICIT_LE)
        .expect("explicit VR LE");
    let mut buf = Vec::new();
    ds.write_dataset_with_ts(&mut buf, ts)?;
    Ok((uid, buf))
}

#[test]
fn malformed_or_mismatched_data_sets_are_refused_and_nothing_stored() -> Result<()> {
    let scp = TestScp::start(scp_config(), 0)?;
    let (mut a, pc) = raw_ct_association(&scp)?;
    // An element claiming 4 GiB of value: cannot be parsed.
    let mut garbage = vec![0x08, 0x00, 0x16, 0x00, b'U', b'I', 0x10, 0x00];
    garbage.extend_from_slice(b"1.2.840.10008.5.");
    garbage.extend_from_slice(&[
        0x10, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0x7F, 1, 2,
    ]);
    send_raw(&mut a, pc, &store_rq("1.2.3.4"), &garbage, true)?;
    let s = response_status(&mut a)?;
    assert!(
        s == Status::CANNOT_UNDERSTAND || s == Status::DATASET_MISMATCH,
        "{s}"
    );
    // A well-formed data set whose SOP Instance UID differs from the command's: A900.
    let (_uid, bytes) = encoded_slice("1.2.826.0.1.3680043.8.498.4.1", 0)?;
    send_raw(&mut a, pc, &store_rq("1.2.3.999"), &bytes, true)?;
    assert_eq!(response_status(&mut a)?, Status::DATASET_MISMATCH);
    // And a correct one still works on the same association.
    let (uid, bytes) = encoded_slice("1.2.826.0.1.3680043.8.498.4.1", 1)?;
    send_raw(&mut a, pc, &store_rq(&uid), &bytes, true)?;
    assert_eq!(response_status(&mut a)?, Status::SUCCESS);
    a.release()?;
    assert_eq!(scp.files().len(), 1);
    Ok(())
}

#[test]
fn aborted_association_mid_transfer_leaves_no_partial_file() -> Result<()> {
    let scp = TestScp::start(scp_config(), 0)?;
    let (mut a, pc) = raw_ct_association(&scp)?;
    let (uid, bytes) = encoded_slice("1.2.826.0.1.3680043.8.498.5.1", 0)?;
    send_raw(
        &mut a,
        pc,
        &store_rq(&uid),
        &bytes[..bytes.len() / 2],
        false,
    )?;
    a.abort()?;
    // Also a peer that just vanishes mid-instance.
    let (mut b, pc) = raw_ct_association(&scp)?;
    send_raw(
        &mut b,
        pc,
        &store_rq(&uid),
        &bytes[..bytes.len() / 3],
        false,
    )?;
    drop(b);
    // Not vacuous: wait until the SCP has ended both associations, then look.
    wait_until("both associations ended", || {
        scp.handle
            .as_ref()
            .is_some_and(|h| h.active_associations() == 0)
    })?;
    assert!(scp.files().is_empty(), "{:?}", scp.files());
    Ok(())
}

#[test]
fn disk_reserve_answers_out_of_resources() -> Result<()> {
    let src = tempfile::tempdir()?;
    let files = write_series(
        src.path(),
        &ct_spec(
            "1.2.826.0.1.3680043.8.498.6",
            "1.2.826.0.1.3680043.8.498.6.1",
            2,
        ),
    )?;
    let free = cosilo_hardware::disk(src.path())?.available_bytes;
    let scp = TestScp::start(scp_config(), free.saturating_mul(2))?;
    let r = scu::store(&peer(&scp), &files)?;
    assert!(r.stored.is_empty());
    assert_eq!(r.failed.len(), 2);
    assert!(r.failed[0].1.contains("A700"), "{:?}", r.failed);
    assert!(scp.files().is_empty());
    Ok(())
}

#[test]
fn duplicates_are_idempotent() -> Result<()> {
    let src = tempfile::tempdir()?;
    let files = write_series(
        src.path(),
        &ct_spec(
            "1.2.826.0.1.3680043.8.498.7",
            "1.2.826.0.1.3680043.8.498.7.1",
            3,
        ),
    )?;
    let scp = TestScp::start(scp_config(), 0)?;
    let first = scu::store(&peer(&scp), &files)?;
    let again = scu::store(&peer(&scp), &files)?;
    assert_eq!(first.stored.len(), 3);
    assert_eq!(again.stored.len(), 3, "{:?}", again.failed);
    assert_eq!(scp.files().len(), 3);
    Ok(())
}

#[test]
fn associations_beyond_the_limit_are_rejected_until_one_ends() -> Result<()> {
    let cfg = ScpConfig {
        max_associations: 1,
        ..scp_config()
    };
    let scp = TestScp::start(cfg, 0)?;
    let (held, _) = raw_ct_association(&scp)?;
    let e = scu::echo(&peer(&scp)).unwrap_err();
    assert!(e.to_string().contains("associate"), "{e}");
    held.release()?;
    wait_until("the held association ended", || {
        scp.handle
            .as_ref()
            .is_some_and(|h| h.active_associations() == 0)
    })?;
    scu::echo(&peer(&scp))?;
    Ok(())
}

#[test]
fn stop_lets_a_running_association_finish() -> Result<()> {
    let mut scp = TestScp::start(scp_config(), 0)?;
    let (mut a, pc) = raw_ct_association(&scp)?;
    let handle = scp.handle.take().expect("running");
    let addr = handle.local_addr();
    let stopper = std::thread::spawn(move || handle.stop());
    // Stopping has begun once a new association is refused.
    wait_until("stop refuses new associations", || {
        scu::echo(&PeerAe::new("COSILO", &addr.to_string(), "TESTSCU")).is_err()
    })?;
    // ...but the running association completes its store within the grace period.
    let (uid, bytes) = encoded_slice("1.2.826.0.1.3680043.8.498.8.1", 0)?;
    send_raw(&mut a, pc, &store_rq(&uid), &bytes, true)?;
    assert_eq!(response_status(&mut a)?, Status::SUCCESS);
    a.release()?;
    stopper.join().expect("stop thread");
    // Stopped: no new association.
    assert!(scu::echo(&PeerAe::new("COSILO", &addr.to_string(), "TESTSCU")).is_err());
    let files: Vec<PathBuf> = scp.files();
    assert_eq!(files.len(), 1);
    Ok(())
}

const CRASH_STUDY: &str = "1.2.826.0.1.3680043.8.498.7";
const CRASH_SERIES: &str = "1.2.826.0.1.3680043.8.498.7.1";
const CRASH_INSTANCES: usize = 12;

/// The child half of `acknowledged_instances_survive_sigkill_before_the_checkpoint`: a no-op
/// unless the parent sets `COSILO_JOURNAL_CHILD`. Accepts the instances with a flusher that never
/// runs, keeps a copy of each acknowledged file outside the spool, then SIGKILLs itself.
/// Ignored, so that a plain run does not count it as a pass; the parent runs it with `--ignored`.
#[test]
#[ignore = "child process of acknowledged_instances_survive_sigkill_before_the_checkpoint"]
fn journal_crash_child() -> Result<()> {
    let Ok(dir) = std::env::var("COSILO_JOURNAL_CHILD") else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    let acked = dir.join("acked");
    std::fs::create_dir_all(&acked)?;
    let sink = SpoolSink::with_journal(
        dir.join("spool"),
        0,
        JournalConfig {
            checkpoint_after: Duration::from_secs(3600),
            ..JournalConfig::default()
        },
    )?;
    let spec = ct_spec(CRASH_STUDY, CRASH_SERIES, CRASH_INSTANCES);
    for i in 0..CRASH_INSTANCES {
        let sop = format!("{CRASH_SERIES}.{}", i + 1);
        let inst = ReceivedInstance {
            calling_ae: "CRASHER".into(),
            sop_class_uid: CT.into(),
            sop_instance_uid: sop.clone(),
            transfer_syntax: EXPLICIT_LE.into(),
            dataset: slice_dataset(&spec, i),
        };
        assert_eq!(sink.accept(inst)?, Accepted::Stored);
        std::fs::copy(
            sink.path_for(CRASH_STUDY, CRASH_SERIES, &sop),
            acked.join(format!("{sop}.dcm")),
        )?;
    }
    // SAFETY: kill(2) on our own pid; the point is to die without running any destructor.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL did not stop the process");
}

#[test]
fn acknowledged_instances_survive_sigkill_before_the_checkpoint() -> Result<()> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "journal_crash_child", "--ignored", "--nocapture"])
        .env("COSILO_JOURNAL_CHILD", dir.path())
        .output()?;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "child did not die by SIGKILL: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let spool = dir.path().join("spool");
    let mut acked: Vec<PathBuf> = std::fs::read_dir(dir.path().join("acked"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    acked.sort();
    assert_eq!(acked.len(), CRASH_INSTANCES);
    let series_dir = spool.join(CRASH_STUDY).join(CRASH_SERIES);
    let spooled = |a: &PathBuf| series_dir.join(a.file_name().unwrap_or_default());

    // The flusher never ran: all records are still in one segment.
    let segments: Vec<PathBuf> = std::fs::read_dir(spool.join(journal::JOURNAL_DIR))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    let scans: Vec<_> = segments
        .iter()
        .map(|p| journal::scan_segment(p).map(|s| (p.clone(), s)))
        .collect::<Result<_, _>>()?;
    let (seg_path, scan) = scans
        .iter()
        .find(|(_, s)| !s.records.is_empty())
        .context("no segment holds records")?;
    assert_eq!(scan.records.len(), CRASH_INSTANCES);

    // Lose what only the page cache held: remove the spool files, leave one cut in half.
    for (i, a) in acked.iter().enumerate() {
        let p = spooled(a);
        if i == 0 {
            let len = std::fs::metadata(&p)?.len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)?
                .set_len(len / 2)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    // And a torn last record: an append that was cut off (never acknowledged).
    let torn_rel = format!("{CRASH_STUDY}/{CRASH_SERIES}/9.9.9.dcm");
    let generation = scan.generation.context("segment header")?;
    let torn = journal::encode_record(generation, &torn_rel, &[0x42; 20_000]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(seg_path)?
        .write_all_at(&torn[..10_000], scan.tail)?;

    let sink = SpoolSink::new(&spool, 0)?;
    assert_eq!(sink.replayed(), CRASH_INSTANCES);
    for a in &acked {
        let p = spooled(a);
        assert_eq!(
            std::fs::read(&p)?,
            std::fs::read(a)?,
            "{} differs from what was acknowledged",
            p.display()
        );
        assert_eq!(pixel_bytes(&p)?, pixel_bytes(a)?);
    }
    assert!(
        !spool.join(&torn_rel).exists(),
        "the torn record was replayed"
    );
    // Replayed once: a second opening finds a clean journal.
    drop(sink);
    assert_eq!(SpoolSink::new(&spool, 0)?.replayed(), 0);
    Ok(())
}

#[test]
fn journal_is_checkpointed_in_the_background_and_files_match() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = SpoolSink::with_journal(
        dir.path(),
        0,
        JournalConfig {
            checkpoint_after: Duration::from_millis(20),
            ..JournalConfig::default()
        },
    )?;
    let spec = ct_spec(CRASH_STUDY, CRASH_SERIES, 3);
    for i in 0..3 {
        let inst = ReceivedInstance {
            calling_ae: "T".into(),
            sop_class_uid: CT.into(),
            sop_instance_uid: format!("{CRASH_SERIES}.{}", i + 1),
            transfer_syntax: EXPLICIT_LE.into(),
            dataset: slice_dataset(&spec, i),
        };
        assert_eq!(sink.accept(inst)?, Accepted::Stored);
    }
    let journal_dir = dir.path().join(journal::JOURNAL_DIR);
    let records = || -> Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(&journal_dir)? {
            n += journal::scan_segment(&e?.path())?.records.len();
        }
        Ok(n)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while records()? > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "flusher did not checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..3 {
        let p = sink.path_for(
            CRASH_STUDY,
            CRASH_SERIES,
            &format!("{CRASH_SERIES}.{}", i + 1),
        );
        assert_eq!(sop_uid(&p)?, format!("{CRASH_SERIES}.{}", i + 1));
    }
    Ok(())
}
