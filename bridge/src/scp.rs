//! The DICOM service provider: C-ECHO and C-STORE on a TCP port, one std thread per association
//! (bounded), every instance made durable by an [`InstanceSink`] before the success status goes out.
//!
//! [`serve`] binds, spawns the accept loop and returns an [`ScpHandle`]; [`ScpHandle::stop`] stops
//! accepting and lets running associations finish for a grace period before cutting them. The
//! association layer is dicom-ul's sync API; command sets come from [`crate::dimse`]. Anything that
//! goes wrong mid-transfer (a truncated P-DATA, an A-ABORT, a dropped socket, a read timeout) drops
//! the partial instance: only complete, parsed data sets ever reach the sink. [`SpoolSink`] is the
//! durable sink: one DICOM file per instance, made durable through the spool's write-ahead
//! [`crate::journal`] (one device flush per instance) before the success status goes out.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dicom::dictionary_std::tags;
use dicom::encoding::TransferSyntaxIndex;
use dicom::object::InMemDicomObject;
use dicom::transfer_syntax::TransferSyntaxRegistry;
use dicom_ul::association::server::AccessControl;
use dicom_ul::association::Association;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType,
    PresentationContextNegotiated, PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociation, ServerAssociationOptions};
use tracing::{debug, info, warn};

use crate::dimse::{CEchoRsp, CStoreRq, CStoreRsp, Command, Status};
pub use crate::spool::SpoolSink;

/// SOP classes the SCP accepts (see [`crate::door`]).
pub use crate::door::STORAGE_SOP_CLASSES as SUPPORTED_SOP_CLASSES;

/// Transfer syntaxes the SCP accepts (see [`crate::door`]).
pub const SUPPORTED_TRANSFER_SYNTAXES: &[&str] = &{
    let mut out = [""; crate::door::TRANSFER_SYNTAXES.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = crate::door::TRANSFER_SYNTAXES[i].0;
        i += 1;
    }
    out
};

/// One instance received by C-STORE, decoded from the P-DATA in the negotiated transfer syntax.
#[derive(Debug, Clone)]
pub struct ReceivedInstance {
    /// The AE title of the sender.
    pub calling_ae: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// The transfer syntax the data set arrived in (and should be stored in).
    pub transfer_syntax: String,
    pub dataset: InMemDicomObject,
}

/// What a sink did with an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Written durably.
    Stored,
    /// The identical instance was already stored (answered with success: C-STORE is idempotent).
    Duplicate,
}

/// Why a sink did not take an instance; each maps to a C-STORE failure status.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A700: no room (disk reserve, queue full); the sender should retry later.
    #[error("out of resources: {0}")]
    OutOfResources(String),
    /// A900: the data set is unacceptable (missing UIDs, wrong class, policy).
    #[error("refused: {0}")]
    Refused(String),
    /// A700: writing failed.
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SinkError {
    /// The C-STORE status this error is answered with.
    pub fn status(&self) -> Status {
        match self {
            SinkError::OutOfResources(_) | SinkError::Io { .. } => Status::OUT_OF_RESOURCES,
            SinkError::Refused(_) => Status::DATASET_MISMATCH,
        }
    }
}

/// Where received instances go. `accept` MUST make the instance durable before returning `Ok`:
/// the SCP sends success only afterwards, and the sender may then delete its copy.
pub trait InstanceSink: Send + Sync + 'static {
    /// Takes one complete instance.
    fn accept(&self, inst: ReceivedInstance) -> Result<Accepted, SinkError>;

    /// The association whose instances [`InstanceSink::accept`] was given ended: with an
    /// A-RELEASE (`released`), or aborted, cut or timed out. Called on the association's own
    /// thread (the one that called `accept`), after its last `accept`.
    fn association_ended(&self, released: bool) {
        let _ = released;
    }
}

/// Settings of the SCP.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Our AE title.
    pub ae_title: String,
    /// Address to listen on (port 0 picks a free one; see [`ScpHandle::local_addr`]).
    pub bind: SocketAddr,
    /// Calling AE titles allowed to associate; empty means any.
    pub allowed_calling_aes: Vec<String>,
    /// Concurrent associations; more are rejected with "local limit exceeded" (transient).
    pub max_associations: usize,
    /// Largest PDU we accept.
    pub max_pdu: u32,
    /// A peer silent for this long loses its association (and any partial instance).
    pub read_timeout: Duration,
    /// How long [`ScpHandle::stop`] lets running associations finish.
    pub grace_period: Duration,
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            ae_title: "COSILO".into(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            allowed_calling_aes: Vec::new(),
            max_associations: 8,
            max_pdu: 65_536,
            read_timeout: Duration::from_secs(60),
            grace_period: Duration::from_secs(10),
        }
    }
}

/// Errors starting the SCP.
#[derive(Debug, thiserror::Error)]
pub enum ScpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the listening address: {0}")]
    LocalAddr(std::io::Error),
    #[error("cannot start the accept thread: {0}")]
    Spawn(std::io::Error),
    #[error("invalid SCP configuration: {0}")]
    Config(String),
}

/// A running SCP; dropping it stops it like [`ScpHandle::stop`].
pub struct ScpHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
    grace: Duration,
}

/// State shared by the accept loop and the association threads.
struct Shared {
    stopping: AtomicBool,
    active: AtomicUsize,
    next_id: AtomicU64,
    /// Clones of the live association sockets, to cut them after the grace period.
    sockets: Mutex<HashMap<u64, TcpStream>>,
}

impl ScpHandle {
    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of associations running now.
    pub fn active_associations(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stops accepting, waits up to the grace period for running associations, then cuts the rest
    /// (their partial instances are dropped, never stored).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + self.grace;
        while self.shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let sockets = self
            .shared
            .sockets
            .lock()
            .map(|mut s| std::mem::take(&mut *s));
        if let Ok(sockets) = sockets {
            if !sockets.is_empty() {
                warn!(
                    count = sockets.len(),
                    "SCP grace period over, cutting running associations"
                );
            }
            for s in sockets.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        info!(addr = %self.addr, "SCP stopped");
    }
}

impl Drop for ScpHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The called AE title (must be ours) and the calling-AE allowlist, checked during association
/// negotiation.
struct AllowList(Arc<Vec<String>>);

impl AccessControl for AllowList {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let calling = calling_ae_title.trim();
        if called_ae_title.trim() != this_ae_title.trim() {
            warn!(
                calling_ae = calling,
                called_ae = called_ae_title.trim(),
                "association rejected: called AE title is not ours"
            );
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if self.0.is_empty() || self.0.iter().any(|a| a.trim() == calling) {
            Ok(())
        } else {
            warn!(
                calling_ae = calling,
                "association rejected: calling AE title not in the allowlist"
            );
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

/// Starts the SCP: binds `cfg.bind` and serves on background threads until stopped.
pub fn serve(cfg: ScpConfig, sink: Arc<dyn InstanceSink>) -> Result<ScpHandle, ScpError> {
    if cfg.max_associations == 0 {
        return Err(ScpError::Config(
            "max_associations must be at least 1".into(),
        ));
    }
    if cfg.ae_title.trim().is_empty() || cfg.ae_title.len() > 16 {
        return Err(ScpError::Config(format!(
            "AE title {:?} must have 1 to 16 characters",
            cfg.ae_title
        )));
    }
    let listener = TcpListener::bind(cfg.bind).map_err(|source| ScpError::Bind {
        addr: cfg.bind,
        source,
    })?;
    let addr = listener.local_addr().map_err(ScpError::LocalAddr)?;
    let shared = Arc::new(Shared {
        stopping: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        sockets: Mutex::new(HashMap::new()),
    });
    let grace = cfg.grace_period;
    let cfg = Arc::new(cfg);
    let thread_shared = shared.clone();
    let accept_thread = std::thread::Builder::new()
        .name(format!("scp-accept-{}", addr.port()))
        .spawn(move || accept_loop(listener, cfg, sink, thread_shared))
        .map_err(ScpError::Spawn)?;
    info!(%addr, "SCP listening");
    Ok(ScpHandle {
        addr,
        shared,
        accept_thread: Some(accept_thread),
        grace,
    })
}

fn accept_loop(
    listener: TcpListener,
    cfg: Arc<ScpConfig>,
    sink: Arc<dyn InstanceSink>,
    shared: Arc<Shared>,
) {
    let allow = Arc::new(cfg.allowed_calling_aes.clone());
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "SCP accept failed");
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let _ = stream.set_nodelay(true);
        if shared.active.fetch_add(1, Ordering::SeqCst) >= cfg.max_associations {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, max = cfg.max_associations, "association rejected: too many associations");
            reject_busy(stream, cfg.read_timeout);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            if let Ok(mut s) = shared.sockets.lock() {
                s.insert(id, clone);
            }
        }
        let (cfg2, sink2, shared2, allow2) =
            (cfg.clone(), sink.clone(), shared.clone(), allow.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("scp-assoc-{id}"))
            .spawn(move || {
                run_association(stream, &peer, &cfg2, allow2, sink2.as_ref());
                if let Ok(mut s) = shared2.sockets.lock() {
                    s.remove(&id);
                }
                shared2.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start an association thread");
            shared.active.fetch_sub(1, Ordering::SeqCst);
            if let Ok(mut s) = shared.sockets.lock() {
                s.remove(&id);
            }
        }
    }
}

/// Answers an A-ASSOCIATE-RQ with a transient "local limit exceeded" rejection.
fn reject_busy(mut stream: TcpStream, timeout: Duration) {
    let _ = stream.set_read_timeout(Some(timeout.min(Duration::from_secs(5))));
    // Read the request (header + body) so that closing does not reset the connection.
    let mut header = [0u8; 6];
    if stream.read_exact(&mut header).is_ok() {
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as u64;
        let _ = std::io::copy(
            &mut (&mut stream).take(len.min(1 << 20)),
            &mut std::io::sink(),
        );
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut buf = Vec::new();
    if dicom_ul::write_pdu(&mut buf, &rj).is_ok() {
        let _ = stream.write_all(&buf);
    }
    let _ = stream.shutdown(Shutdown::Write);
}

fn run_association(
    stream: TcpStream,
    peer: &str,
    cfg: &ScpConfig,
    allow: Arc<Vec<String>>,
    sink: &dyn InstanceSink,
) {
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(AllowList(allow))
        .ae_title(cfg.ae_title.clone())
        .max_pdu_length(cfg.max_pdu)
        .read_timeout(cfg.read_timeout)
        .write_timeout(cfg.read_timeout);
    for (uid, _) in SUPPORTED_SOP_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    for ts in SUPPORTED_TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*ts);
    }
    let assoc = match options.establish(stream) {
        Ok(a) => a,
        Err(e) => {
            warn!(%peer, error = %e, "association not established");
            return;
        }
    };
    let calling_ae = assoc.peer_ae_title().trim().to_string();
    log_rejected_contexts(peer, &calling_ae, assoc.presentation_contexts());
    debug!(%peer, %calling_ae, "association established");
    let mut conv = Conversation {
        calling_ae,
        peer,
        sink,
        contexts: assoc.presentation_contexts().to_vec(),
        command: Vec::new(),
        data: Vec::new(),
        pending: None,
        stored: 0,
    };
    let released = converse(&mut conv, assoc);
    sink.association_ended(released);
}

/// Runs the association's DIMSE conversation until it ends; true when it ended with an A-RELEASE
/// and no partial message.
fn converse(conv: &mut Conversation<'_>, mut assoc: ServerAssociation<TcpStream>) -> bool {
    loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => {
                conv.log_lost(&format!("connection lost: {e}"));
                return false;
            }
        };
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    if let Err(reason) = conv.on_pdv(pdv, &mut assoc) {
                        warn!(peer = %conv.peer, calling_ae = %conv.calling_ae, %reason,
                            "aborting association");
                        let _ = assoc.abort();
                        return false;
                    }
                }
            }
            Pdu::ReleaseRQ => {
                let _ = assoc.send(&Pdu::ReleaseRP);
                let partial = conv.pending.is_some() || !conv.data.is_empty();
                if partial {
                    conv.log_lost("released mid-message");
                }
                info!(peer = %conv.peer, calling_ae = %conv.calling_ae, stored = conv.stored,
                    "association released");
                return !partial;
            }
            Pdu::AbortRQ { source } => {
                conv.log_lost(&format!("peer aborted ({source:?})"));
                return false;
            }
            other => {
                warn!(peer = %conv.peer, pdu = %other.short_description(), "unexpected PDU, aborting");
                let _ = assoc.abort();
                return false;
            }
        }
    }
}

/// One line per refused abstract syntax (not per context: a default storescu proposes ~120
/// contexts, most classes twice), with the context ids and the reason.
fn log_rejected_contexts(peer: &str, calling_ae: &str, contexts: &[PresentationContextNegotiated]) {
    let mut by_class: Vec<(&str, Vec<u8>, PresentationContextResultReason)> = Vec::new();
    for pc in contexts {
        if pc.reason == PresentationContextResultReason::Acceptance {
            continue;
        }
        match by_class
            .iter_mut()
            .find(|(a, _, r)| *a == pc.abstract_syntax && *r == pc.reason)
        {
            Some((_, ids, _)) => ids.push(pc.id),
            None => by_class.push((&pc.abstract_syntax, vec![pc.id], pc.reason.clone())),
        }
    }
    if by_class.is_empty() {
        return;
    }
    let accepted = contexts.len() - by_class.iter().map(|(_, ids, _)| ids.len()).sum::<usize>();
    for (abstract_syntax, ids, reason) in &by_class {
        debug!(%peer, %calling_ae, %abstract_syntax, context_ids = ?ids, ?reason,
            "presentation context rejected");
    }
    info!(%peer, %calling_ae, accepted, rejected_classes = by_class.len(),
        classes = ?by_class.iter().map(|(a, _, r)| format!("{a} ({r:?})")).collect::<Vec<_>>(),
        "presentation contexts rejected");
}

/// The DIMSE state of one association.
struct Conversation<'a> {
    calling_ae: String,
    peer: &'a str,
    sink: &'a dyn InstanceSink,
    contexts: Vec<PresentationContextNegotiated>,
    command: Vec<u8>,
    data: Vec<u8>,
    /// A command whose data set is still arriving, with its presentation context.
    pending: Option<(u8, Command)>,
    stored: usize,
}

impl Conversation<'_> {
    fn log_lost(&self, why: &str) {
        if self.pending.is_some() {
            // No SOP Instance UID here: it is an identifier of the patient's data.
            warn!(peer = %self.peer, calling_ae = %self.calling_ae,
                received_bytes = self.data.len(),
                "{why}: partial instance discarded, nothing stored");
        } else {
            debug!(peer = %self.peer, calling_ae = %self.calling_ae, stored = self.stored, "{why}");
        }
    }

    fn on_pdv(
        &mut self,
        pdv: PDataValue,
        assoc: &mut ServerAssociation<TcpStream>,
    ) -> Result<(), String> {
        match pdv.value_type {
            PDataValueType::Command => {
                if self.pending.is_some() {
                    return Err("command fragment while a data set was expected".into());
                }
                self.command.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(());
                }
                let cmd = Command::decode(&std::mem::take(&mut self.command))
                    .map_err(|e| format!("undecodable command set: {e}"))?;
                if cmd.has_dataset() {
                    self.pending = Some((pdv.presentation_context_id, cmd));
                    Ok(())
                } else {
                    self.dispatch(pdv.presentation_context_id, cmd, None, assoc)
                }
            }
            PDataValueType::Data => {
                let Some((pc, _)) = &self.pending else {
                    return Err("data fragment without a command".into());
                };
                if *pc != pdv.presentation_context_id {
                    return Err("data set on a different presentation context".into());
                }
                self.data.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(());
                }
                let (pc, cmd) = self.pending.take().ok_or("no pending command")?;
                let data = std::mem::take(&mut self.data);
                self.dispatch(pc, cmd, Some(data), assoc)
            }
        }
    }

    fn dispatch(
        &mut self,
        pc: u8,
        cmd: Command,
        data: Option<Vec<u8>>,
        assoc: &mut ServerAssociation<TcpStream>,
    ) -> Result<(), String> {
        let reply = match cmd {
            Command::EchoRq(rq) => Command::EchoRsp(CEchoRsp {
                message_id_being_responded_to: rq.message_id,
                status: Status::SUCCESS,
            }),
            Command::StoreRq(rq) => {
                let (status, comment) = self.store(pc, &rq, data.unwrap_or_default());
                Command::StoreRsp(CStoreRsp {
                    message_id_being_responded_to: rq.message_id,
                    affected_sop_class_uid: rq.affected_sop_class_uid,
                    affected_sop_instance_uid: rq.affected_sop_instance_uid,
                    status,
                    error_comment: comment,
                })
            }
            Command::CancelRq { .. } => return Ok(()),
            other => return Err(format!("unsupported request {other:?}")),
        };
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: reply.encode(),
                }],
            })
            .map_err(|e| format!("cannot send response: {e}"))
    }

    /// Parses and hands one instance to the sink; returns the C-STORE status.
    fn store(&mut self, pc: u8, rq: &CStoreRq, data: Vec<u8>) -> (Status, Option<String>) {
        // `why` goes to the log and the PACS: it never names a study, series or instance UID.
        let fail = |status: Status, why: String| {
            warn!(peer = %self.peer, calling_ae = %self.calling_ae,
                sop_class = %rq.affected_sop_class_uid, status = %status, "C-STORE refused: {why}");
            (status, Some(truncate_comment(&why)))
        };
        let Some(ctx) = self.contexts.iter().find(|c| c.id == pc) else {
            return fail(
                Status::CANNOT_UNDERSTAND,
                format!("unknown presentation context {pc}"),
            );
        };
        if ctx.abstract_syntax != rq.affected_sop_class_uid {
            return fail(
                Status::DATASET_MISMATCH,
                format!(
                    "SOP class {} sent on the context for {}",
                    rq.affected_sop_class_uid, ctx.abstract_syntax
                ),
            );
        }
        let Some(ts) = TransferSyntaxRegistry.get(&ctx.transfer_syntax) else {
            return fail(
                Status::CANNOT_UNDERSTAND,
                format!("unknown transfer syntax {}", ctx.transfer_syntax),
            );
        };
        // dicom-rs allocates declared lengths before reading them: refuse impossible ones first.
        if let Err(e) = crate::guard::check_dataset_lengths(&data, ts) {
            let why = format!(
                "data set refused by the length guard ({} bytes): {e}",
                data.len()
            );
            return fail(Status::CANNOT_UNDERSTAND, why);
        }
        let dataset = match InMemDicomObject::read_dataset_with_ts(&data[..], ts) {
            Ok(d) => d,
            Err(e) => {
                return fail(
                    Status::CANNOT_UNDERSTAND,
                    format!("cannot parse the data set ({} bytes): {e}", data.len()),
                )
            }
        };
        let uid = |tag| {
            dataset
                .element(tag)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        };
        let class = uid(tags::SOP_CLASS_UID);
        let instance = uid(tags::SOP_INSTANCE_UID);
        if class.as_deref() != Some(rq.affected_sop_class_uid.as_str())
            || instance.as_deref() != Some(rq.affected_sop_instance_uid.as_str())
        {
            return fail(
                Status::DATASET_MISMATCH,
                format!(
                    "the data set's SOP class or instance UID differs from the command's \
                     (class {})",
                    if class.as_deref() == Some(rq.affected_sop_class_uid.as_str()) {
                        "matches"
                    } else {
                        "differs"
                    }
                ),
            );
        }
        if let Err(e) = crate::door::check_pixels(
            &dataset,
            &rq.affected_sop_class_uid,
            &rq.affected_sop_instance_uid,
            &ctx.transfer_syntax,
        ) {
            return fail(
                Status::CANNOT_UNDERSTAND,
                format!("unusable pixel data: {e}"),
            );
        }
        let inst = ReceivedInstance {
            calling_ae: self.calling_ae.clone(),
            sop_class_uid: rq.affected_sop_class_uid.clone(),
            sop_instance_uid: rq.affected_sop_instance_uid.clone(),
            transfer_syntax: ctx.transfer_syntax.clone(),
            dataset,
        };
        match self.sink.accept(inst) {
            Ok(a) => {
                self.stored += 1;
                debug!(outcome = ?a, "C-STORE");
                (Status::SUCCESS, None)
            }
            Err(e) => fail(e.status(), e.to_string()),
        }
    }
}

/// ErrorComment is LO: at most 64 characters.
fn truncate_comment(s: &str) -> String {
    s.chars().take(64).collect()
}
