//! Membership changes while the site runs. The roster file is read again on SIGHUP and whenever
//! its content changes (read every [`ROSTER_POLL`]: a roster is a few hundred bytes, so comparing
//! the bytes is cheaper to get right than modification times, which a same-second rewrite does
//! not change). A new roster replaces the one in use only after it is checked in full: it parses
//! and validates like a roster at start (ids, keys, duplicates), it is of this federation, and it
//! names this site with this site's own public key. A roster that fails any check is refused with
//! its reason logged, and the roster in use stays; the same bytes are not logged again.
//!
//! Once switched: a removed member's messages fail the signature check (it is not on the roster)
//! and are counted under the refusal reason `removed`; the strategy gets [`Input::Members`]
//! (it stops waiting for a removed member, drops what it held of it and had not merged, and
//! counts an added member's models). What a removed member contributed before the switch stays
//! where it is: a FedAvg round's running sum keeps an update it already added, a BrainTorrent
//! merge keeps what it merged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::{DaemonError, Site};
use cosilo_federation::keys::Roster;
use cosilo_federation::strategy::Input;

/// How often the roster file is read for a change.
pub(super) const ROSTER_POLL: Duration = Duration::from_secs(2);

/// The roster file and the bytes last read from it.
pub(super) struct RosterWatch {
    path: PathBuf,
    /// The content last acted on (switched to, or refused).
    last: Vec<u8>,
    /// The last read error logged (logged once until the file reads again).
    last_error: Option<String>,
}

/// Why a changed roster was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum RosterRefusal {
    #[error("{0}")]
    Invalid(#[from] cosilo_federation::keys::KeysError),
    #[error("it is the roster of federation {found:?}, not {expected:?}")]
    WrongFederation { found: String, expected: String },
    #[error("it does not name this site {0:?} (was this site removed? its messages will be refused by the members that have the new roster)")]
    WithoutThisSite(String),
    #[error("it gives this site {0:?} a public key other than this site's own")]
    OtherKey(String),
}

impl RosterWatch {
    /// Watches `path`, whose content `roster` was loaded from at start.
    pub(super) fn new(path: &Path) -> Self {
        RosterWatch {
            path: path.to_path_buf(),
            last: std::fs::read(path).unwrap_or_default(),
            last_error: None,
        }
    }

    /// The file's content when it differs from the last acted on (`force`: also when it does
    /// not, for SIGHUP); None when unchanged or unreadable (logged once).
    fn read_changed(&mut self, force: bool) -> Option<Vec<u8>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                self.last_error = None;
                if bytes == self.last && !force {
                    return None;
                }
                Some(bytes)
            }
            Err(e) => {
                let e = e.to_string();
                if self.last_error.as_ref() != Some(&e) {
                    warn!(path = %self.path.display(), reason = %e, "cannot read the roster; keeping the one in use");
                    self.last_error = Some(e);
                }
                None
            }
        }
    }
}

impl Site {
    /// Reads the roster again and switches to it when it changed and passes every check
    /// (`force`: SIGHUP, which also reports an unchanged roster).
    pub(super) async fn reload_roster(&mut self, force: bool) -> Result<(), DaemonError> {
        let Some(watch) = self.roster_watch.as_mut() else {
            return Ok(());
        };
        let Some(bytes) = watch.read_changed(force) else {
            return Ok(());
        };
        let path = watch.path.display().to_string();
        watch.last = bytes.clone();
        let new = match self.check_roster(&bytes, &path) {
            Ok(r) => r,
            Err(e) => {
                self.inb.rosters_refused += 1;
                warn!(roster = %path, reason = %e, "refused a new roster; keeping the one in use");
                return Ok(());
            }
        };
        if new == self.inb.roster {
            info!(roster = %path, "roster unchanged");
            return Ok(());
        }
        let ids = |r: &Roster| -> Vec<String> { r.sites().iter().map(|s| s.id.clone()).collect() };
        let (old_ids, new_ids) = (ids(&self.inb.roster), ids(&new));
        let added: Vec<&String> = new_ids.iter().filter(|s| !old_ids.contains(s)).collect();
        let removed: Vec<String> = old_ids
            .iter()
            .filter(|s| !new_ids.contains(s))
            .cloned()
            .collect();
        // A member whose key changed is a new identity: messages signed with the old key now
        // fail their signature check.
        let rekeyed: Vec<&String> = new_ids
            .iter()
            .filter(|s| {
                self.inb
                    .roster
                    .verifying_key(s)
                    .is_some_and(|k| Some(k) != new.verifying_key(s))
            })
            .collect();
        info!(
            roster = %path,
            members = %new_ids.join(","),
            added = ?added,
            removed = ?removed,
            rekeyed = ?rekeyed,
            "switched to a new roster"
        );
        self.inb.removed.retain(|s| !new_ids.contains(s));
        self.inb.removed.extend(removed);
        self.inb.roster = new;
        let quorum = self.cfg.federation.quorum.sites(new_ids.len());
        self.handle(Input::Members {
            sites: new_ids,
            quorum,
        })
        .await
    }

    /// A roster read from `origin`, checked as the daemon needs it.
    fn check_roster(&self, bytes: &[u8], origin: &str) -> Result<Roster, RosterRefusal> {
        let text = String::from_utf8_lossy(bytes);
        let roster = Roster::parse(&text, origin)?;
        if roster.name() != self.cfg.federation.name {
            return Err(RosterRefusal::WrongFederation {
                found: roster.name().to_string(),
                expected: self.cfg.federation.name.clone(),
            });
        }
        let me = &self.out.me;
        match roster.verifying_key(me) {
            None => Err(RosterRefusal::WithoutThisSite(me.clone())),
            Some(k) if *k != self.out.keys.verifying_key() => {
                Err(RosterRefusal::OtherKey(me.clone()))
            }
            Some(_) => Ok(roster),
        }
    }
}
