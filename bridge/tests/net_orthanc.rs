//! Cosilo's SCU and SCP against a real Orthanc (Debian's 1.10.1): C-ECHO, C-FIND by modality and
//! date, C-MOVE into our SCP, C-STORE into Orthanc, and the write-back outbox across an Orthanc
//! outage. Each test starts its own Orthanc on free ports in a temp dir and kills it at the end.

mod net_support;

#[allow(dead_code)]
#[path = "../../tests/src/orthanc.rs"]
mod orthanc;

use std::time::Duration;

use anyhow::Result;
use cosilo_bridge::outbox::{Outbox, RetryPolicy};
use cosilo_bridge::scu::{self, MoveTarget, PeerAe, QueryFilter, QueryLevel};
use net_support::*;
use orthanc::{free_port, Orthanc};

const STUDY_CT: &str = "1.2.826.0.1.3680043.8.498.10";
const STUDY_MR: &str = "1.2.826.0.1.3680043.8.498.11";

fn pacs(o: &Orthanc) -> PeerAe {
    PeerAe::new(&o.aet, &o.dicom_addr(), "COSILO")
}

#[test]
fn echo_find_move_and_store_against_orthanc() -> Result<()> {
    let src = tempfile::tempdir()?;
    let ct = write_series(
        &src.path().join("ct"),
        &ct_spec(STUDY_CT, "1.2.826.0.1.3680043.8.498.10.1", 3),
    )?;
    let mut mr_spec = ct_spec(STUDY_MR, "1.2.826.0.1.3680043.8.498.11.1", 2);
    mr_spec.sop_class = MR;
    mr_spec.modality = "MR";
    mr_spec.study_date = "20230101";
    mr_spec.patient_id = "P002";
    mr_spec.description = "MR BRAIN";
    let mr = write_series(&src.path().join("mr"), &mr_spec)?;

    let scp = TestScp::start(scp_config(), 0)?;
    let port: u16 = scp.port().parse()?;
    let orthanc = Orthanc::start("COSILO", port)?;
    for f in ct.iter().chain(&mr) {
        orthanc.upload(f)?;
    }
    let peer = pacs(&orthanc);
    scu::echo(&peer)?;

    // C-FIND by modality, by date range, and at series level.
    let cts = scu::find(
        &peer,
        QueryLevel::Study,
        &QueryFilter {
            modality: Some("CT".into()),
            ..Default::default()
        },
    )?;
    assert_eq!(
        cts.iter().map(|m| m.study_uid.as_str()).collect::<Vec<_>>(),
        vec![STUDY_CT]
    );
    let old = scu::find(
        &peer,
        QueryLevel::Study,
        &QueryFilter {
            study_date_range: Some((Some("20220101".into()), Some("20231231".into()))),
            ..Default::default()
        },
    )?;
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].study_uid, STUDY_MR);
    assert_eq!(old[0].study_date, "20230101");
    let series = scu::find(
        &peer,
        QueryLevel::Series,
        &QueryFilter {
            study_uid: Some(STUDY_CT.into()),
            ..Default::default()
        },
    )?;
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].modality, "CT");
    assert_eq!(series[0].series_uid, "1.2.826.0.1.3680043.8.498.10.1");

    // C-MOVE the CT study into our SCP: Orthanc opens its own association to COSILO.
    let moved = scu::move_(
        &peer,
        &MoveTarget::Study {
            study_uid: STUDY_CT.into(),
        },
        "COSILO",
    )?;
    assert_eq!((moved.completed, moved.failed), (3, 0));
    assert_eq!(scp.files().len(), 3);
    for f in &ct {
        let uid = sop_uid(f)?;
        let stored = scp
            .spool
            .path()
            .join(STUDY_CT)
            .join("1.2.826.0.1.3680043.8.498.10.1")
            .join(format!("{uid}.dcm"));
        assert_eq!(pixel_bytes(&stored)?, pixel_bytes(f)?);
    }
    // retrieve = find + move: the MR study by modality.
    let got = scu::retrieve(
        &peer,
        &QueryFilter {
            modality: Some("MR".into()),
            ..Default::default()
        },
        "COSILO",
    )?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.completed, 2);
    assert_eq!(scp.files().len(), 5);

    // C-STORE a new instance into Orthanc and see it through REST.
    let new = write_series(
        &src.path().join("new"),
        &ct_spec(STUDY_CT, "1.2.826.0.1.3680043.8.498.10.2", 1),
    )?;
    let out = scu::store(&peer, &new)?;
    assert_eq!(out.stored.len(), 1, "{:?}", out.failed);
    assert!(orthanc.sop_instance_uids()?.contains(&sop_uid(&new[0])?));
    assert_eq!(orthanc.instances()?.len(), 6);
    Ok(())
}

#[test]
fn outbox_retries_through_an_orthanc_outage() -> Result<()> {
    let src = tempfile::tempdir()?;
    let files = write_series(
        src.path(),
        &ct_spec(
            "1.2.826.0.1.3680043.8.498.12",
            "1.2.826.0.1.3680043.8.498.12.1",
            1,
        ),
    )?;
    let mut orthanc = Orthanc::start("COSILO", free_port()?)?;
    let peer = pacs(&orthanc);
    orthanc.stop();

    let policy = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
    };
    let dir = src.path().join("outbox");
    let ob = Outbox::open(&dir, policy)?;
    ob.enqueue(&files[0], &peer)?;
    let r = ob.run_once()?;
    assert_eq!((r.sent, r.retried), (0, 1));
    let item = &ob.pending()?[0];
    assert_eq!(item.attempts, 1);
    assert!(
        item.last_error
            .as_deref()
            .unwrap_or("")
            .contains("associate"),
        "{item:?}"
    );
    // Not due yet: nothing is tried.
    assert_eq!(ob.run_once()?.waiting, 1);

    // Restart of the appliance (reopen) and of the PACS.
    drop(ob);
    orthanc.restart()?;
    let ob = Outbox::open(&dir, policy)?;
    // Passes until the item is due again and sent (against a deadline, not a fixed wait).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = ob.run_once()?;
        if r.sent > 0 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.sent, 1, "{r:?} {:?}", ob.pending()?);
    assert!(ob.pending()?.is_empty());
    assert_eq!(orthanc.sop_instance_uids()?, vec![sop_uid(&files[0])?]);
    Ok(())
}

/// The pseudonym table syncs an instance's own UID lazily (one mapping sync per series, not per
/// instance). If a power cut loses those lines, write-back recovers them from the PACS: an
/// image-level C-FIND of the original series and the keyed hash of each SOPInstanceUID.
#[test]
fn lost_instance_pseudonyms_are_recovered_from_orthanc() -> Result<()> {
    use cosilo_bridge::deid::{DatePolicy, Deidentifier, MappingStore};
    use cosilo_bridge::writeback::{recover_instance_uids, reidentify, WritebackError};
    use dicom::object::{open_file, FileMetaTableBuilder};

    let study = "1.2.826.0.1.3680043.8.498.13";
    let series = "1.2.826.0.1.3680043.8.498.13.1";
    let src = tempfile::tempdir()?;
    let files = write_series(&src.path().join("ct"), &ct_spec(study, series, 4))?;
    let orthanc = Orthanc::start("COSILO", free_port()?)?;
    for f in &files {
        orthanc.upload(f)?;
    }
    let originals: Vec<String> = files.iter().map(|f| sop_uid(f)).collect::<Result<_>>()?;

    // De-identify the series as the bridge does, recording into a mapping store.
    let state = src.path().join("state");
    let secret = b"net_orthanc recovery secret, 32 bytes";
    let deid =
        Deidentifier::new(secret, DatePolicy::Remove)?.with_mapping(MappingStore::open(&state)?);
    let deid_dir = src.path().join("deid");
    std::fs::create_dir_all(&deid_dir)?;
    for (k, f) in files.iter().enumerate() {
        let obj = open_file(f)?;
        let out = deid.deidentify(&obj)?;
        out.object
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_LE))?
            .write_to_file(deid_dir.join(format!("{k}.dcm")))?;
    }
    assert_eq!(
        deid.mapping().map(MappingStore::syncs),
        Some(1),
        "one mapping sync for the whole series (its first instance), none per instance"
    );
    drop(deid);

    // A power cut loses the deferred lines: keep only the lines of everything but the instances.
    let table = state.join(MappingStore::FILE_NAME);
    let text = std::fs::read_to_string(&table)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            !originals
                .iter()
                .any(|o| l.contains(&format!("\"o\":\"{o}\"")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        text.lines().count() - kept.lines().count(),
        4,
        "each instance had its own line"
    );
    std::fs::write(&table, kept)?;

    let mapping = MappingStore::open(&state)?;
    let pseudo = cosilo_sdk::dicom::read_series_dir(&deid_dir)?;
    let err = reidentify(&pseudo, &mapping).unwrap_err();
    assert!(
        matches!(
            err,
            WritebackError::UnknownUid {
                what: "SOPInstanceUID",
                ..
            }
        ),
        "{err}"
    );
    let keyed_hash = Deidentifier::new(secret, DatePolicy::Remove)?;
    let recovered = recover_instance_uids(&pseudo, &mapping, &keyed_hash, &pacs(&orthanc))?;
    assert_eq!(recovered, 4);
    let back = reidentify(&pseudo, &mapping)?;
    let mut got: Vec<String> = back
        .sop_instances
        .iter()
        .map(|i| i.instance_uid.clone())
        .collect();
    let mut want = originals.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every instance maps back to the PACS's own UID");
    assert_eq!(back.series_uid, series);
    // Recorded durably: a fresh open knows them, and nothing is left to recover.
    let reopened = MappingStore::open(&state)?;
    assert_eq!(
        recover_instance_uids(&pseudo, &reopened, &keyed_hash, &pacs(&orthanc))?,
        0
    );
    assert!(reidentify(&pseudo, &reopened).is_ok());
    Ok(())
}
