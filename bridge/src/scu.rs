//! The DICOM client side: C-ECHO, Study Root C-FIND and C-MOVE (query/retrieve from the hospital's
//! PACS) and C-STORE (sending results back), over dicom-ul's sync associations with TCP_NODELAY.
//!
//! Each call opens one association, does its work and releases it. A C-MOVE makes the PACS open its
//! own association to the move destination (our SCP, [`crate::scp`]), so `move_` returns only the
//! PACS's counters; the instances arrive through the SCP's sink.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dicom::core::{DataElement, PrimitiveValue, Tag, VR};
use dicom::dictionary_std::tags;
use dicom::encoding::TransferSyntaxIndex;
use dicom::object::InMemDicomObject;
use dicom::transfer_syntax::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociation, ClientAssociationOptions, Pdu};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::dimse::{
    CEchoRq, CFindRq, CMoveRq, CStoreRq, Command, Priority, Status, StatusKind, VERIFICATION,
};

/// Study Root Query/Retrieve Information Model - FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Study Root Query/Retrieve Information Model - MOVE.
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// A remote application entity (the PACS) and how we call it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAe {
    /// The peer's AE title (called AE).
    pub ae_title: String,
    /// `host:port` of the peer.
    pub address: String,
    /// Our AE title (calling AE).
    pub calling_ae: String,
    /// Connect, read and write timeout in seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_timeout_s() -> u64 {
    30
}

impl PeerAe {
    /// A peer with the default 30 s timeout.
    pub fn new(ae_title: &str, address: &str, calling_ae: &str) -> PeerAe {
        PeerAe {
            ae_title: ae_title.into(),
            address: address.into(),
            calling_ae: calling_ae.into(),
            timeout_s: default_timeout_s(),
        }
    }
}

/// Errors of the SCU operations.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("cannot associate with {peer}: {reason}")]
    Associate { peer: String, reason: String },
    #[error("{peer} accepted no presentation context for {what}")]
    NoContext { peer: String, what: String },
    #[error("sending {what} to {peer} failed: {reason}")]
    Send {
        peer: String,
        what: String,
        reason: String,
    },
    #[error("reading the response from {peer} failed: {reason}")]
    Receive { peer: String, reason: String },
    #[error("{peer} answered {what} with status {status}{}", comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
    Status {
        peer: String,
        what: String,
        status: Status,
        comment: Option<String>,
    },
    #[error("cannot read DICOM file {path}: {reason}")]
    ReadFile { path: PathBuf, reason: String },
    #[error("cannot encode the {what} data set: {reason}")]
    Encode { what: String, reason: String },
    #[error("cannot decode a data set from {peer}: {reason}")]
    Decode { peer: String, reason: String },
}

/// Query/retrieve level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryLevel {
    Study,
    Series,
    /// Instances (SOPInstanceUID), within a study and series given in the filter.
    Image,
}

impl QueryLevel {
    fn code(self) -> &'static str {
        match self {
            QueryLevel::Study => "STUDY",
            QueryLevel::Series => "SERIES",
            QueryLevel::Image => "IMAGE",
        }
    }
}

/// Matching keys of a C-FIND; `None` means "any". Dates are `YYYYMMDD`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryFilter {
    /// Modality (`CT`, `MR`): ModalitiesInStudy at study level, Modality at series level.
    pub modality: Option<String>,
    /// Inclusive study date range (`from`, `to`), either end open.
    pub study_date_range: Option<(Option<String>, Option<String>)>,
    /// BodyPartExamined (series level only).
    pub body_part: Option<String>,
    /// StudyDescription, with DICOM wildcards (`*`, `?`) allowed.
    pub study_description: Option<String>,
    pub patient_id: Option<String>,
    pub study_uid: Option<String>,
    /// SeriesInstanceUID (series and image level).
    pub series_uid: Option<String>,
}

/// One C-FIND match with the keys Cosilo asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct FindMatch {
    pub study_uid: String,
    /// Empty at study level.
    pub series_uid: String,
    pub patient_id: String,
    pub study_date: String,
    pub study_description: String,
    /// Modality (series level) or ModalitiesInStudy joined with `\` (study level).
    pub modality: String,
    pub body_part: String,
    /// SOPInstanceUID (image level; empty otherwise).
    pub sop_instance_uid: String,
    /// NumberOfSeriesRelatedInstances (series level), when the PACS returned it.
    pub series_instances: Option<u32>,
    /// The whole identifier as the PACS returned it.
    pub identifier: InMemDicomObject,
}

/// Sub-operation counters of a finished C-MOVE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveOutcome {
    pub completed: u32,
    pub failed: u32,
    pub warning: u32,
    /// The final status.
    pub status: u16,
}

/// Result of a C-STORE SCU run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Files the peer acknowledged with success or warning.
    pub stored: Vec<PathBuf>,
    /// Files refused, with the reason.
    pub failed: Vec<(PathBuf, String)>,
}

/// Opens an association proposing `contexts` (abstract syntax, transfer syntaxes).
fn associate(
    peer: &PeerAe,
    contexts: &[(String, Vec<String>)],
) -> Result<ClientAssociation<TcpStream>, ScuError> {
    let timeout = Duration::from_secs(peer.timeout_s.max(1));
    let mut opts = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.clone())
        .called_ae_title(peer.ae_title.clone())
        .max_pdu_length(65_536)
        .connection_timeout(timeout)
        .read_timeout(timeout)
        .write_timeout(timeout);
    for (abs, ts) in contexts {
        opts = opts.with_presentation_context(abs.clone(), ts.clone());
    }
    let mut assoc = opts
        .establish(peer.address.as_str())
        .map_err(|e| ScuError::Associate {
            peer: peer.address.clone(),
            reason: e.to_string(),
        })?;
    // dcmtk and dicom-ul leave Nagle on; a request/response protocol stalls on delayed ACKs.
    let _ = assoc.inner_stream().set_nodelay(true);
    Ok(assoc)
}

/// The accepted presentation context for an abstract syntax: (id, transfer syntax).
fn accepted(assoc: &ClientAssociation<TcpStream>, abstract_syntax: &str) -> Option<(u8, String)> {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| {
            pc.reason == PresentationContextResultReason::Acceptance
                && pc.abstract_syntax == abstract_syntax
        })
        .map(|pc| (pc.id, pc.transfer_syntax.clone()))
}

fn send_command(
    assoc: &mut ClientAssociation<TcpStream>,
    peer: &PeerAe,
    pc: u8,
    cmd: &Command,
    dataset: Option<&[u8]>,
) -> Result<(), ScuError> {
    let what = format!("{cmd:?}").chars().take(40).collect::<String>();
    let err = |e: String| ScuError::Send {
        peer: peer.address.clone(),
        what: what.clone(),
        reason: e,
    };
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd.encode(),
            }],
        })
        .map_err(|e| err(e.to_string()))?;
    if let Some(ds) = dataset {
        let mut w = assoc.send_pdata(pc);
        w.write_all(ds).map_err(|e| err(e.to_string()))?;
        w.finish().map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Receives one response message: the command and, if it announces one, its data set.
fn receive_message(
    assoc: &mut ClientAssociation<TcpStream>,
    peer: &PeerAe,
) -> Result<(Command, Option<Vec<u8>>), ScuError> {
    let err = |reason: String| ScuError::Receive {
        peer: peer.address.clone(),
        reason,
    };
    let mut command = Vec::new();
    let mut data = Vec::new();
    let mut cmd: Option<Command> = None;
    loop {
        match assoc.receive().map_err(|e| err(e.to_string()))? {
            Pdu::PData { data: pdvs } => {
                for pdv in pdvs {
                    match pdv.value_type {
                        PDataValueType::Command => {
                            command.extend_from_slice(&pdv.data);
                            if pdv.is_last {
                                let c =
                                    Command::decode(&command).map_err(|e| err(e.to_string()))?;
                                if !c.has_dataset() {
                                    return Ok((c, None));
                                }
                                cmd = Some(c);
                            }
                        }
                        PDataValueType::Data => {
                            data.extend_from_slice(&pdv.data);
                            if pdv.is_last {
                                let c = cmd
                                    .take()
                                    .ok_or_else(|| err("data before command".into()))?;
                                return Ok((c, Some(data)));
                            }
                        }
                    }
                }
            }
            Pdu::AbortRQ { source } => return Err(err(format!("peer aborted ({source:?})"))),
            other => return Err(err(format!("unexpected PDU {}", other.short_description()))),
        }
    }
}

fn release(assoc: ClientAssociation<TcpStream>) {
    if let Err(e) = assoc.release() {
        debug!(error = %e, "association release failed");
    }
}

/// C-ECHO: Ok when the peer answers success.
pub fn echo(peer: &PeerAe) -> Result<(), ScuError> {
    let mut assoc = associate(
        peer,
        &[(
            VERIFICATION.into(),
            vec![IMPLICIT_LE.into(), EXPLICIT_LE.into()],
        )],
    )?;
    let (pc, _) = accepted(&assoc, VERIFICATION).ok_or_else(|| ScuError::NoContext {
        peer: peer.address.clone(),
        what: "Verification".into(),
    })?;
    send_command(
        &mut assoc,
        peer,
        pc,
        &Command::EchoRq(CEchoRq { message_id: 1 }),
        None,
    )?;
    let (rsp, _) = receive_message(&mut assoc, peer)?;
    release(assoc);
    match rsp {
        Command::EchoRsp(r) if r.status == Status::SUCCESS => Ok(()),
        Command::EchoRsp(r) => Err(ScuError::Status {
            peer: peer.address.clone(),
            what: "C-ECHO".into(),
            status: r.status,
            comment: None,
        }),
        other => Err(ScuError::Receive {
            peer: peer.address.clone(),
            reason: format!("expected C-ECHO-RSP, got {other:?}"),
        }),
    }
}

fn put_str(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}

fn encode_identifier(
    obj: &InMemDicomObject,
    ts_uid: &str,
    what: &str,
) -> Result<Vec<u8>, ScuError> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| ScuError::Encode {
            what: what.into(),
            reason: format!("unknown transfer syntax {ts_uid}"),
        })?;
    let mut buf = Vec::new();
    obj.write_dataset_with_ts(&mut buf, ts)
        .map_err(|e| ScuError::Encode {
            what: what.into(),
            reason: e.to_string(),
        })?;
    Ok(buf)
}

/// The C-FIND identifier for a level and filter.
pub fn find_identifier(level: QueryLevel, filter: &QueryFilter) -> InMemDicomObject {
    let mut q = InMemDicomObject::new_empty();
    put_str(&mut q, tags::QUERY_RETRIEVE_LEVEL, VR::CS, level.code());
    put_str(
        &mut q,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        filter.study_uid.as_deref().unwrap_or(""),
    );
    put_str(
        &mut q,
        tags::PATIENT_ID,
        VR::LO,
        filter.patient_id.as_deref().unwrap_or(""),
    );
    let date = match &filter.study_date_range {
        None => String::new(),
        Some((from, to)) => {
            let (f, t) = (from.as_deref().unwrap_or(""), to.as_deref().unwrap_or(""));
            if f == t && !f.is_empty() {
                f.to_string()
            } else {
                format!("{f}-{t}")
            }
        }
    };
    put_str(&mut q, tags::STUDY_DATE, VR::DA, &date);
    put_str(
        &mut q,
        tags::STUDY_DESCRIPTION,
        VR::LO,
        filter.study_description.as_deref().unwrap_or(""),
    );
    // Return keys for write-back: a SEG filed into the PACS's study must repeat its patient and
    // study attributes (Orthanc files it into the existing study only when PatientID and
    // StudyInstanceUID both match).
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::STUDY_ID, VR::SH),
        (tags::STUDY_TIME, VR::TM),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    ] {
        put_str(&mut q, tag, vr, "");
    }
    let modality = filter.modality.as_deref().unwrap_or("");
    match level {
        QueryLevel::Study => {
            put_str(&mut q, tags::MODALITIES_IN_STUDY, VR::CS, modality);
        }
        QueryLevel::Series | QueryLevel::Image => {
            put_str(
                &mut q,
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                filter.series_uid.as_deref().unwrap_or(""),
            );
            put_str(&mut q, tags::MODALITY, VR::CS, modality);
            put_str(
                &mut q,
                tags::BODY_PART_EXAMINED,
                VR::CS,
                filter.body_part.as_deref().unwrap_or(""),
            );
        }
    }
    match level {
        QueryLevel::Study => {}
        QueryLevel::Series => put_str(&mut q, tags::NUMBER_OF_SERIES_RELATED_INSTANCES, VR::IS, ""),
        QueryLevel::Image => put_str(&mut q, tags::SOP_INSTANCE_UID, VR::UI, ""),
    }
    q
}

fn text_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// Study Root C-FIND at `level`; returns every match.
pub fn find(
    peer: &PeerAe,
    level: QueryLevel,
    filter: &QueryFilter,
) -> Result<Vec<FindMatch>, ScuError> {
    let mut assoc = associate(
        peer,
        &[(
            STUDY_ROOT_FIND.into(),
            vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
        )],
    )?;
    let (pc, ts) = accepted(&assoc, STUDY_ROOT_FIND).ok_or_else(|| ScuError::NoContext {
        peer: peer.address.clone(),
        what: "Study Root FIND".into(),
    })?;
    let ident = encode_identifier(&find_identifier(level, filter), &ts, "C-FIND identifier")?;
    let rq = Command::FindRq(CFindRq {
        message_id: 1,
        priority: Priority::Medium,
        affected_sop_class_uid: STUDY_ROOT_FIND.into(),
    });
    send_command(&mut assoc, peer, pc, &rq, Some(&ident))?;
    let ts_ref = TransferSyntaxRegistry
        .get(&ts)
        .ok_or_else(|| ScuError::Decode {
            peer: peer.address.clone(),
            reason: format!("unknown transfer syntax {ts}"),
        })?;
    let mut out = Vec::new();
    loop {
        let (rsp, data) = receive_message(&mut assoc, peer)?;
        let Command::FindRsp(r) = rsp else {
            return Err(ScuError::Receive {
                peer: peer.address.clone(),
                reason: format!("expected C-FIND-RSP, got {rsp:?}"),
            });
        };
        match r.status.kind() {
            StatusKind::Pending => {
                let Some(bytes) = data else { continue };
                let obj =
                    InMemDicomObject::read_dataset_with_ts(&bytes[..], ts_ref).map_err(|e| {
                        ScuError::Decode {
                            peer: peer.address.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                let modality = match level {
                    QueryLevel::Study => text_of(&obj, tags::MODALITIES_IN_STUDY),
                    QueryLevel::Series | QueryLevel::Image => text_of(&obj, tags::MODALITY),
                };
                out.push(FindMatch {
                    study_uid: text_of(&obj, tags::STUDY_INSTANCE_UID),
                    series_uid: text_of(&obj, tags::SERIES_INSTANCE_UID),
                    patient_id: text_of(&obj, tags::PATIENT_ID),
                    study_date: text_of(&obj, tags::STUDY_DATE),
                    study_description: text_of(&obj, tags::STUDY_DESCRIPTION),
                    modality,
                    body_part: text_of(&obj, tags::BODY_PART_EXAMINED),
                    sop_instance_uid: text_of(&obj, tags::SOP_INSTANCE_UID),
                    series_instances: text_of(&obj, tags::NUMBER_OF_SERIES_RELATED_INSTANCES)
                        .trim()
                        .parse()
                        .ok(),
                    identifier: obj,
                });
            }
            StatusKind::Success | StatusKind::Warning => break,
            _ => {
                release(assoc);
                return Err(ScuError::Status {
                    peer: peer.address.clone(),
                    what: "C-FIND".into(),
                    status: r.status,
                    comment: None,
                });
            }
        }
    }
    release(assoc);
    Ok(out)
}

/// What to move: a whole study, or one series of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveTarget {
    Study {
        study_uid: String,
    },
    Series {
        study_uid: String,
        series_uid: String,
    },
}

/// Study Root C-MOVE of `target` to `destination_ae` (which the PACS must know, e.g. our SCP).
pub fn move_(
    peer: &PeerAe,
    target: &MoveTarget,
    destination_ae: &str,
) -> Result<MoveOutcome, ScuError> {
    let mut assoc = associate(
        peer,
        &[(
            STUDY_ROOT_MOVE.into(),
            vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
        )],
    )?;
    let (pc, ts) = accepted(&assoc, STUDY_ROOT_MOVE).ok_or_else(|| ScuError::NoContext {
        peer: peer.address.clone(),
        what: "Study Root MOVE".into(),
    })?;
    let mut q = InMemDicomObject::new_empty();
    match target {
        MoveTarget::Study { study_uid } => {
            put_str(&mut q, tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY");
            put_str(&mut q, tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
        }
        MoveTarget::Series {
            study_uid,
            series_uid,
        } => {
            put_str(&mut q, tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES");
            put_str(&mut q, tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
            put_str(&mut q, tags::SERIES_INSTANCE_UID, VR::UI, series_uid);
        }
    }
    let outcome = move_request(&mut assoc, peer, pc, &ts, &q, 1, destination_ae);
    release(assoc);
    outcome
}

/// Study Root C-MOVE of single instances (image level) of one series to `destination_ae`: one
/// C-MOVE request per SOP Instance UID, all on one association, their counters summed. Used to
/// fetch exactly the instances a series lacks ([`crate::fetch`]). A request the PACS answers with
/// a failure status ends the call with that error.
pub fn move_instances(
    peer: &PeerAe,
    study_uid: &str,
    series_uid: &str,
    sop_instance_uids: &[String],
    destination_ae: &str,
) -> Result<MoveOutcome, ScuError> {
    let mut total = MoveOutcome::default();
    if sop_instance_uids.is_empty() {
        return Ok(total);
    }
    let mut assoc = associate(
        peer,
        &[(
            STUDY_ROOT_MOVE.into(),
            vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
        )],
    )?;
    let (pc, ts) = accepted(&assoc, STUDY_ROOT_MOVE).ok_or_else(|| ScuError::NoContext {
        peer: peer.address.clone(),
        what: "Study Root MOVE".into(),
    })?;
    for (k, sop) in sop_instance_uids.iter().enumerate() {
        let mut q = InMemDicomObject::new_empty();
        put_str(&mut q, tags::QUERY_RETRIEVE_LEVEL, VR::CS, "IMAGE");
        put_str(&mut q, tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
        put_str(&mut q, tags::SERIES_INSTANCE_UID, VR::UI, series_uid);
        put_str(&mut q, tags::SOP_INSTANCE_UID, VR::UI, sop);
        // Message ids 1..=65535, wrapping for longer lists (one request is outstanding at a time).
        let id = (k % usize::from(u16::MAX)) as u16 + 1;
        match move_request(&mut assoc, peer, pc, &ts, &q, id, destination_ae) {
            Ok(o) => {
                total.completed += o.completed;
                total.failed += o.failed;
                total.warning += o.warning;
                total.status = o.status;
            }
            Err(e) => {
                release(assoc);
                return Err(e);
            }
        }
    }
    release(assoc);
    Ok(total)
}

/// Sends one C-MOVE-RQ with identifier `q` on an open association and waits for its final
/// response.
fn move_request(
    assoc: &mut ClientAssociation<TcpStream>,
    peer: &PeerAe,
    pc: u8,
    ts: &str,
    q: &InMemDicomObject,
    message_id: u16,
    destination_ae: &str,
) -> Result<MoveOutcome, ScuError> {
    let ident = encode_identifier(q, ts, "C-MOVE identifier")?;
    let rq = Command::MoveRq(CMoveRq {
        message_id,
        priority: Priority::Medium,
        affected_sop_class_uid: STUDY_ROOT_MOVE.into(),
        move_destination: destination_ae.into(),
    });
    send_command(assoc, peer, pc, &rq, Some(&ident))?;
    loop {
        let (rsp, _) = receive_message(assoc, peer)?;
        let Command::MoveRsp(r) = rsp else {
            return Err(ScuError::Receive {
                peer: peer.address.clone(),
                reason: format!("expected C-MOVE-RSP, got {rsp:?}"),
            });
        };
        if r.status.kind() == StatusKind::Pending {
            continue;
        }
        let s = r.sub_operations;
        let outcome = MoveOutcome {
            completed: s.completed.unwrap_or(0).into(),
            failed: s.failed.unwrap_or(0).into(),
            warning: s.warning.unwrap_or(0).into(),
            status: r.status.0,
        };
        return match r.status.kind() {
            StatusKind::Success | StatusKind::Warning => Ok(outcome),
            _ => Err(ScuError::Status {
                peer: peer.address.clone(),
                what: format!("C-MOVE to {destination_ae} ({} failed)", outcome.failed),
                status: r.status,
                comment: None,
            }),
        };
    }
}

/// Finds the studies matching `filter` and moves each to `our_ae`; returns (study UID, outcome).
pub fn retrieve(
    peer: &PeerAe,
    filter: &QueryFilter,
    our_ae: &str,
) -> Result<Vec<(String, MoveOutcome)>, ScuError> {
    let studies = find(peer, QueryLevel::Study, filter)?;
    let mut out = Vec::with_capacity(studies.len());
    for s in studies {
        let outcome = move_(
            peer,
            &MoveTarget::Study {
                study_uid: s.study_uid.clone(),
            },
            our_ae,
        )?;
        out.push((s.study_uid, outcome));
    }
    Ok(out)
}

/// A file to send: its UIDs, transfer syntax and data set.
struct Outgoing {
    path: PathBuf,
    sop_class: String,
    sop_instance: String,
    ts: String,
    obj: InMemDicomObject,
}

fn read_outgoing(path: &Path) -> Result<Outgoing, ScuError> {
    let file = dicom::object::open_file(path).map_err(|e| ScuError::ReadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    let meta = file.meta();
    Ok(Outgoing {
        path: path.to_path_buf(),
        sop_class: clean(meta.media_storage_sop_class_uid()),
        sop_instance: clean(meta.media_storage_sop_instance_uid()),
        ts: clean(meta.transfer_syntax()),
        obj: file.into_inner(),
    })
}

/// C-STORE SCU: sends `files` on one association, proposing for each SOP class the files' own
/// transfer syntaxes plus explicit and implicit VR little endian. A file in a native transfer
/// syntax is re-encoded if the peer accepted only the other little-endian one. Per-file refusals are
/// collected in [`StoreOutcome::failed`]; association-level failures are errors.
pub fn store(peer: &PeerAe, files: &[PathBuf]) -> Result<StoreOutcome, ScuError> {
    let mut outgoing = Vec::with_capacity(files.len());
    let mut outcome = StoreOutcome::default();
    for f in files {
        match read_outgoing(f) {
            Ok(o) => outgoing.push(o),
            Err(e) => outcome.failed.push((f.clone(), e.to_string())),
        }
    }
    if outgoing.is_empty() {
        return Ok(outcome);
    }
    // One context per (SOP class, transfer syntax) so that each file can go in its own syntax.
    let mut wanted: BTreeMap<(String, String), ()> = BTreeMap::new();
    for o in &outgoing {
        for ts in [o.ts.as_str(), EXPLICIT_LE, IMPLICIT_LE] {
            wanted.insert((o.sop_class.clone(), ts.to_string()), ());
        }
    }
    let contexts: Vec<(String, Vec<String>)> = wanted
        .into_keys()
        .map(|(abs, ts)| (abs, vec![ts]))
        .collect();
    if contexts.len() > 128 {
        return Err(ScuError::Encode {
            what: "presentation contexts".into(),
            reason: format!("{} needed, at most 128 per association", contexts.len()),
        });
    }
    let mut assoc = associate(peer, &contexts)?;
    let pcs: Vec<(u8, String, String)> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.id,
                pc.abstract_syntax.clone(),
                pc.transfer_syntax.clone(),
            )
        })
        .collect();
    for (i, o) in outgoing.into_iter().enumerate() {
        let for_class = |ts: &str| {
            pcs.iter()
                .find(|(_, a, t)| *a == o.sop_class && t == ts)
                .map(|(id, _, t)| (*id, t.clone()))
        };
        let native = TransferSyntaxRegistry
            .get(&o.ts)
            .map(|t| !t.is_encapsulated_pixel_data())
            .unwrap_or(false);
        let choice = for_class(&o.ts).or_else(|| {
            if native {
                for_class(EXPLICIT_LE).or_else(|| for_class(IMPLICIT_LE))
            } else {
                None
            }
        });
        let Some((pc, ts)) = choice else {
            outcome.failed.push((
                o.path.clone(),
                format!("peer accepted no context for {} in {}", o.sop_class, o.ts),
            ));
            continue;
        };
        let bytes = encode_identifier(&o.obj, &ts, "C-STORE")?;
        let rq = Command::StoreRq(CStoreRq {
            message_id: (i % 0xFFFF) as u16 + 1,
            priority: Priority::Medium,
            affected_sop_class_uid: o.sop_class.clone(),
            affected_sop_instance_uid: o.sop_instance.clone(),
            move_originator_ae: None,
            move_originator_message_id: None,
        });
        send_command(&mut assoc, peer, pc, &rq, Some(&bytes))?;
        let (rsp, _) = receive_message(&mut assoc, peer)?;
        match rsp {
            Command::StoreRsp(r) => match r.status.kind() {
                StatusKind::Success | StatusKind::Warning => outcome.stored.push(o.path),
                _ => {
                    warn!(file = %o.path.display(), status = %r.status, "C-STORE refused");
                    outcome.failed.push((
                        o.path,
                        format!(
                            "status {}{}",
                            r.status,
                            r.error_comment
                                .map(|c| format!(": {c}"))
                                .unwrap_or_default()
                        ),
                    ));
                }
            },
            other => {
                return Err(ScuError::Receive {
                    peer: peer.address.clone(),
                    reason: format!("expected C-STORE-RSP, got {other:?}"),
                })
            }
        }
    }
    release(assoc);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn study_identifier_carries_the_filter() {
        let f = QueryFilter {
            modality: Some("CT".into()),
            study_date_range: Some((Some("20240101".into()), None)),
            ..Default::default()
        };
        let q = find_identifier(QueryLevel::Study, &f);
        assert_eq!(text_of(&q, tags::QUERY_RETRIEVE_LEVEL), "STUDY");
        assert_eq!(text_of(&q, tags::MODALITIES_IN_STUDY), "CT");
        assert_eq!(text_of(&q, tags::STUDY_DATE), "20240101-");
        assert!(q.element(tags::MODALITY).is_err());
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_SEX,
            tags::ACCESSION_NUMBER,
            tags::STUDY_TIME,
        ] {
            assert!(q.element(tag).is_ok(), "{tag} is requested");
            assert_eq!(text_of(&q, tag), "", "{tag} is a return key, not a filter");
        }
        let s = find_identifier(QueryLevel::Series, &f);
        assert_eq!(text_of(&s, tags::MODALITY), "CT");
        assert!(s.element(tags::SERIES_INSTANCE_UID).is_ok());
    }
}
