//! The length guard at the network boundary: the running SCP answers C000 (cannot understand) to
//! a C-STORE whose data set declares an element longer than the message, stores nothing, and the
//! association goes on working. Before the guard, dicom-parser 0.10.1 allocated the declared
//! length (up to 4 GiB) first (bridge/FUZZING.md).

mod net_support;

use std::time::{Duration, Instant};

use anyhow::Result;
use cosilo_bridge::dimse::{CStoreRq, Command, Priority, Status};
use dicom::encoding::TransferSyntaxIndex;
use dicom::transfer_syntax::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociationOptions, Pdu};
use net_support::*;

const STUDY: &str = "1.2.826.0.1.3680043.8.498.77";
const SERIES: &str = "1.2.826.0.1.3680043.8.498.77.1";

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

#[test]
fn declared_lengths_past_the_message_get_c000_and_nothing_is_stored() -> Result<()> {
    let scp = TestScp::start(scp_config(), 0)?;
    let mut a = ClientAssociationOptions::new()
        .calling_ae_title("RAW")
        .called_ae_title("COSILO")
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .establish(scp.addr().as_str())?;
    let pc = a.presentation_contexts()[0].id;
    let ts = TransferSyntaxRegistry
        .get(EXPLICIT_LE)
        .expect("explicit VR LE");
    let mut send = |uid: &str, data: &[u8]| -> Result<(Status, Option<String>)> {
        a.send(&Pdu::PData {
            data: vec![
                PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: store_rq(uid).encode(),
                },
                PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Data,
                    is_last: true,
                    data: data.to_vec(),
                },
            ],
        })?;
        match a.receive()? {
            Pdu::PData { data } => match Command::decode(&data[0].data)? {
                Command::StoreRsp(r) => Ok((r.status, r.error_comment)),
                other => anyhow::bail!("unexpected {other:?}"),
            },
            other => anyhow::bail!("unexpected PDU {other:?}"),
        }
    };
    let spec = ct_spec(STUDY, SERIES, 2);
    let mut slices = Vec::new();
    for i in 0..2 {
        let mut buf = Vec::new();
        slice_dataset(&spec, i).write_dataset_with_ts(&mut buf, ts)?;
        slices.push((format!("{SERIES}.{}", i + 1), buf));
    }
    // Patient name (0010,0010) PN: 2-byte length 0xFFFF; pixel data (7FE0,0010) OW: 0xDEADBEEF.
    let (uid, good) = &slices[0];
    let at = |tag: [u8; 4]| good.windows(4).position(|w| w == tag).expect("tag present");
    let mut short = good.clone();
    let pn = at([0x10, 0x00, 0x10, 0x00]);
    assert_eq!(&short[pn + 4..pn + 6], b"PN");
    short[pn + 6..pn + 8].copy_from_slice(&0xFFFFu16.to_le_bytes());
    let mut long = good.clone();
    let px = at([0xE0, 0x7F, 0x10, 0x00]);
    long[px + 8..px + 12].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    for bad in [&short, &long] {
        let t0 = Instant::now();
        let (status, comment) = send(uid, bad)?;
        assert_eq!(status, Status::CANNOT_UNDERSTAND);
        // Refused by the guard, not by the parser after allocating (the comment is LO, 64 chars).
        let comment = comment.unwrap_or_default();
        assert!(comment.contains("length guard"), "{comment}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    assert!(scp.files().is_empty(), "a refused instance was stored");
    // The same association still stores well-formed instances.
    for (uid, bytes) in &slices {
        assert_eq!(send(uid, bytes)?.0, Status::SUCCESS);
    }
    a.release()?;
    assert_eq!(scp.files().len(), 2);
    Ok(())
}
