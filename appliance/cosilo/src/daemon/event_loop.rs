//! The daemon's setup and event loop: keys and roster, the trainer thread, the broker link and
//! the strategy, then one `select!` over shutdown, link events, trainer replies and the clock,
//! each arm one call.

use std::future::Future;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::labels::Classes;
use super::roster::{RosterWatch, ROSTER_POLL};
use super::rounds::Personalisation;
use super::trainer::{self, Cmd, Reply, TrainerSpec};
use super::{personalised_run, session_run, DaemonError, DaemonState, RunSummary, Site};
use super::{Membership, ModelShape};
use crate::config::SiteConfig;
use crate::status::Board;
use cosilo_federation::broker::EmbeddedBroker;
use cosilo_federation::keys::{Roster, SiteKeys};
use cosilo_federation::link::{self, Link, LinkConfig, LinkEvent, TlsConfig};
use cosilo_federation::strategy::{self, Context, Input, StrategyKind};
use cosilo_federation::weights::FlatWeights;
use cosilo_federation::wire::{topics, Body, Control, SiteStatus};
use cosilo_hardware::gate::TrainingGate;
use cosilo_hardware::guard::{detect_gpu, GuardMonitor};
use cosilo_hardware::SysRoot;
use cosilo_store::Store;
use cosilo_train::TrainConfig;

/// This site's key and the roster: loaded and checked for a networked strategy, made up for a
/// site running alone.
fn keys_and_roster(cfg: &SiteConfig) -> Result<(SiteKeys, Roster), DaemonError> {
    let me = &cfg.site.id;
    if cfg.federation.strategy == StrategyKind::Local {
        let keys = SiteKeys::generate(me)?;
        let roster = Roster::parse(
            &format!(
                "[federation]\nname = \"{}\"\n\n{}",
                cfg.federation.name,
                keys.roster_entry()
            ),
            "local",
        )?;
        return Ok((keys, roster));
    }
    let keys = SiteKeys::load(&cfg.federation.key)?;
    let roster = Roster::load(&cfg.federation.roster)?;
    if roster.name() != cfg.federation.name {
        return Err(DaemonError::WrongFederation {
            roster: roster.name().to_string(),
            config: cfg.federation.name.clone(),
        });
    }
    if !roster.contains(me) {
        return Err(DaemonError::NotInRoster {
            site: me.clone(),
            roster: cfg.federation.roster.clone(),
        });
    }
    Ok((keys, roster))
}

/// The trainer thread, the channels to it and its stop flag.
struct TrainerHandle {
    thread: JoinHandle<()>,
    commands: std::sync::mpsc::Sender<Cmd>,
    replies: mpsc::UnboundedReceiver<Reply>,
    stop: Arc<AtomicBool>,
    /// Reads the hardware and throttles or parks training through the gate while it lives.
    _guards: GuardMonitor,
}

fn start_trainer(cfg: &SiteConfig, train_cfg: &TrainConfig) -> Result<TrainerHandle, DaemonError> {
    let store = Store::open(&cfg.site.store).map_err(|source| DaemonError::Store {
        path: cfg.site.store.clone(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let gate = TrainingGate::new();
    let root = SysRoot::default();
    let guards = GuardMonitor::spawn(
        cfg.guards.clone(),
        root.clone(),
        detect_gpu(&root),
        gate.clone(),
    )
    .map_err(DaemonError::Guards)?;
    let (commands, cmd_rx) = std::sync::mpsc::channel();
    let (reply_tx, replies) = mpsc::unbounded_channel();
    let spec = TrainerSpec {
        store,
        cfg: train_cfg.clone(),
        // steps_per_round 0: a round is one local epoch, counted once the session knows its slices.
        schedule_steps: (cfg.federation.steps_per_round > 0).then(|| cfg.schedule_steps()),
        rounds: cfg.federation.rounds as usize,
        personalise_steps: cfg.federation.personalise_steps,
        hospital: cfg.hospital().map(str::to_string),
        run: session_run(cfg),
        personal_run: personalised_run(cfg),
        stop: stop.clone(),
        gate,
        classes: Classes::new(train_cfg, &cfg.federation.score_classes),
    };
    let thread = std::thread::Builder::new()
        .name(format!("trainer-{}", cfg.site.id))
        .spawn(move || trainer::run(spec, cmd_rx, reply_tx))
        .map_err(|_| DaemonError::TrainerGone)?;
    Ok(TrainerHandle {
        thread,
        commands,
        replies,
        stop,
        _guards: guards,
    })
}

/// The trainer's first answer: the session's weights, sample count, held-out cases and the
/// state saved with its checkpoint.
struct Ready {
    weights: FlatWeights,
    samples: u64,
    steps_per_epoch: usize,
    validation_cases: usize,
    test_cases: usize,
    saved: DaemonState,
    resumed: bool,
}

async fn ready(replies: &mut mpsc::UnboundedReceiver<Reply>) -> Result<Ready, DaemonError> {
    let (weights, samples, steps_per_epoch, validation_cases, test_cases, saved) =
        match replies.recv().await {
            Some(Reply::Ready {
                weights,
                samples,
                steps_per_epoch,
                validation_cases,
                test_cases,
                saved,
            }) => (
                weights,
                samples,
                steps_per_epoch,
                validation_cases,
                test_cases,
                saved,
            ),
            Some(Reply::Failed(e)) => return Err(e),
            _ => return Err(DaemonError::TrainerGone),
        };
    let saved: DaemonState = saved
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let resumed = !saved.strategy.is_null();
    info!(
        samples,
        steps_per_epoch,
        validation_cases,
        test_cases,
        parameters = weights.data.len(),
        resumed,
        "session ready"
    );
    Ok(Ready {
        weights,
        samples,
        steps_per_epoch,
        validation_cases,
        test_cases,
        saved,
        resumed,
    })
}

/// The broker (embedded when asked), the link and its events; none for a site running alone.
type Connection = (
    Option<EmbeddedBroker>,
    Option<Link>,
    Option<mpsc::Receiver<LinkEvent>>,
);

async fn connect(cfg: &SiteConfig) -> Result<Connection, DaemonError> {
    if cfg.federation.strategy == StrategyKind::Local {
        return Ok((None, None, None));
    }
    let mut broker = None;
    if cfg.broker.embedded {
        let addr = (cfg.broker.host.as_str(), cfg.broker.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| DaemonError::Address(cfg.broker.host.clone()))?;
        broker = Some(EmbeddedBroker::start(addr, cfg.broker.max_packet_bytes)?);
        info!(%addr, "embedded broker started");
    }
    let mut lc = LinkConfig::new(
        cfg.broker.host.clone(),
        cfg.broker.port,
        format!("cosilo-{}-{}", cfg.federation.name, cfg.site.id),
    );
    lc.max_packet_bytes = cfg.broker.max_packet_bytes;
    if !cfg.broker.ca_file.as_os_str().is_empty() {
        lc.tls = Some(TlsConfig {
            ca_file: cfg.broker.ca_file.clone(),
            client_cert: non_empty(&cfg.broker.client_cert),
            client_key: non_empty(&cfg.broker.client_key),
        });
    }
    let (link, events) =
        link::connect(&lc, topics::member_filters(&cfg.federation.name), None).await?;
    Ok((broker, Some(link), Some(events)))
}

fn non_empty(p: &std::path::Path) -> Option<std::path::PathBuf> {
    (!p.as_os_str().is_empty()).then(|| p.to_path_buf())
}

/// Runs the site until its strategy finishes or `shutdown` completes.
pub(super) async fn run_site(
    cfg: SiteConfig,
    shutdown: impl Future<Output = ()>,
    board: Arc<Board>,
) -> Result<RunSummary, DaemonError> {
    let t0 = Instant::now();
    cfg.validate()?;
    let train_cfg = cfg.train_config()?;
    // Keys and roster first: a misconfigured site fails before any training.
    let (keys, roster) = keys_and_roster(&cfg)?;
    let mut sites: Vec<String> = roster.sites().iter().map(|s| s.id.clone()).collect();
    sites.sort();

    let TrainerHandle {
        thread,
        commands,
        mut replies,
        stop,
        _guards,
    } = start_trainer(&cfg, &train_cfg)?;
    let ready = ready(&mut replies).await?;
    let ctx = Context {
        me: cfg.site.id.clone(),
        rounds: cfg.federation.rounds,
        steps_per_round: match cfg.federation.steps_per_round {
            0 => ready.steps_per_epoch,
            n => n,
        },
        quorum: cfg.federation.quorum.sites(sites.len()),
        round_deadline_ms: cfg.federation.round_deadline_s * 1000,
        update_timeout_ms: cfg.federation.update_timeout_s * 1000,
        patience: cfg.federation.patience,
        samples: ready.samples,
        sites,
    };
    let strategy = strategy::build(
        cfg.federation.strategy,
        ctx,
        ready.resumed.then_some(&ready.saved.strategy),
    )?;
    let (_broker, link, events) = connect(&cfg).await?;
    let shape = ModelShape {
        layout: ready.weights.layout.clone(),
        samples: ready.samples,
        classes: Classes::new(&train_cfg, &cfg.federation.score_classes),
    };
    let membership = Membership { keys, roster, link };
    let roster_watch = (cfg.federation.strategy != StrategyKind::Local)
        .then(|| RosterWatch::new(&cfg.federation.roster));
    let mut site = Site::new(cfg, membership, shape, strategy, commands, ready.saved);
    site.roster_watch = roster_watch;
    if !ready.resumed && ready.validation_cases > 0 {
        // The initial model's validation Dice (the "before" column); answered before any round.
        site.command(Cmd::Evaluate)?;
        match replies.recv().await {
            Some(Reply::Evaluated(s)) => site.evaluated(s).await?,
            Some(Reply::Failed(e)) => return Err(e),
            _ => return Err(DaemonError::TrainerGone),
        }
    }
    site.presence(SiteStatus::Joining).await?;
    let weights = site.out.as_sent(ready.weights.data)?;
    site.handle(Input::Start { weights }).await?;

    let mut lp = EventLoop {
        site,
        stop,
        shutting_down: false,
        board,
    };
    let finished = lp.run(shutdown, events, replies).await?;
    let mut site = lp.site;
    site.leave(finished).await?;
    site.report(&lp.board, finished);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(site.summary(finished, (ready.validation_cases, ready.test_cases), t0))
}

/// SIGHUP, where the platform has it and the handler could be installed; otherwise a future
/// that never completes.
struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangup {
    fn install() -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::hangup()) {
                Ok(s) => Hangup(Some(s)),
                Err(e) => {
                    warn!(reason = %e, "cannot handle SIGHUP; the roster is still read when it changes");
                    Hangup(None)
                }
            }
        }
        #[cfg(not(unix))]
        Hangup()
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.0.as_mut() {
            if s.recv().await.is_some() {
                return;
            }
            self.0 = None;
        }
        std::future::pending::<()>().await
    }
}

/// What the loop does after an event.
enum Flow {
    Continue,
    /// The link's event stream ended.
    LinkClosed,
    /// The run is over; `finished`: the strategy finished and its final state is saved.
    Stop {
        finished: bool,
    },
}

struct EventLoop {
    site: Site,
    stop: Arc<AtomicBool>,
    shutting_down: bool,
    /// The status board, told the site's progress on every tick.
    board: Arc<Board>,
}

impl EventLoop {
    /// Until the run is over: true when the strategy finished and its final state is saved.
    async fn run(
        &mut self,
        shutdown: impl Future<Output = ()>,
        mut events: Option<mpsc::Receiver<LinkEvent>>,
        mut replies: mpsc::UnboundedReceiver<Reply>,
    ) -> Result<bool, DaemonError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut roster_poll = tokio::time::interval(ROSTER_POLL);
        let mut hangup = Hangup::install();
        tokio::pin!(shutdown);
        loop {
            let flow = tokio::select! {
                _ = &mut shutdown, if !self.shutting_down => self.shutdown_requested()?,
                ev = async { events.as_mut()?.recv().await }, if events.is_some() => {
                    self.link_event(ev).await?
                }
                reply = replies.recv() => self.reply(reply).await?,
                _ = tick.tick() => self.tick().await?,
                _ = roster_poll.tick() => self.roster(false).await?,
                _ = hangup.recv() => {
                    info!("SIGHUP: reading the roster again");
                    self.roster(true).await?
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::LinkClosed => events = None,
                Flow::Stop { finished } => return Ok(finished),
            }
        }
    }

    fn shutdown_requested(&mut self) -> Result<Flow, DaemonError> {
        info!("shutdown requested: finishing the step in progress");
        self.shutting_down = true;
        self.stop.store(true, Ordering::SeqCst);
        let site = &mut self.site;
        site.book.held_train = None;
        if matches!(
            site.book.personalisation,
            Personalisation::Training | Personalisation::Scoring
        ) {
            // The shared model is saved already; a half-personalised one must not overwrite
            // it. Personalisation runs again after a restart.
            return Ok(Flow::Stop { finished: true });
        }
        if site.book.pending_eval.is_empty() {
            site.command(Cmd::Save(site.state()))?;
        }
        // Otherwise the rounds waiting for their evaluation are logged first and the last of
        // them saves the state with them in: a restarted site must not lose a round it trained
        // (regression: a SIGTERM between a round's end and its evaluation left that round out
        // of the log).
        Ok(Flow::Continue)
    }

    async fn link_event(&mut self, ev: Option<LinkEvent>) -> Result<Flow, DaemonError> {
        match ev {
            Some(LinkEvent::Connected { session_present }) => {
                info!(session_present, "connected to the broker");
                self.site.presence(self.site.out.status).await?;
            }
            Some(LinkEvent::Message {
                topic,
                payload,
                retained,
            }) => {
                if !self.shutting_down {
                    self.site.message(topic, payload, retained).await?;
                }
            }
            Some(LinkEvent::Disconnected { reason }) => {
                warn!(%reason, "lost the broker; reconnecting")
            }
            None => return Ok(Flow::LinkClosed),
        }
        Ok(Flow::Continue)
    }

    async fn reply(&mut self, reply: Option<Reply>) -> Result<Flow, DaemonError> {
        let site = &mut self.site;
        match reply {
            Some(Reply::Trained {
                weights,
                loss,
                score,
                stopped,
            }) => {
                if stopped || self.shutting_down {
                    return Ok(Flow::Continue);
                }
                if site.book.personalisation == Personalisation::Training {
                    site.personalisation_trained(loss)?;
                    return Ok(Flow::Continue);
                }
                site.book.last_loss = Some(loss);
                // Peers hold this model as the wire format decodes it; so does this site, so
                // that every site averages the same numbers.
                let weights = site.out.as_sent(weights)?;
                site.handle(Input::Trained {
                    weights,
                    score,
                    loss,
                })
                .await?;
            }
            Some(Reply::Evaluated(s)) => site.evaluated(s).await?,
            Some(Reply::Saved) => {
                if self.shutting_down {
                    if site.book.pending_eval.is_empty() {
                        let finished = site.strategy.finished();
                        return Ok(Flow::Stop { finished });
                    }
                    return Ok(Flow::Continue);
                }
                if site.strategy.finished()
                    && site.book.pending_eval.is_empty()
                    && site.finished_and_saved()?
                {
                    return Ok(Flow::Stop { finished: true });
                }
            }
            Some(Reply::Failed(e)) => return Err(e),
            Some(Reply::Ready { .. }) => {}
            None => return Err(DaemonError::TrainerGone),
        }
        Ok(Flow::Continue)
    }

    /// Reads the roster again (`force`: on SIGHUP) unless shutting down.
    async fn roster(&mut self, force: bool) -> Result<Flow, DaemonError> {
        if !self.shutting_down {
            self.site.reload_roster(force).await?;
        }
        Ok(Flow::Continue)
    }

    async fn tick(&mut self) -> Result<Flow, DaemonError> {
        self.site.report(&self.board, false);
        if !self.shutting_down {
            let expired = self.site.inb.reassembler.expire(Instant::now());
            for (origin, id) in expired {
                warn!(%origin, update_id = id, "gave up an incomplete update");
            }
            self.site.handle(Input::Tick).await?;
        }
        Ok(Flow::Continue)
    }
}

impl Site {
    /// Leaves cleanly: stops the trainer, announces the final status (and a `Leave` when the
    /// run did not finish), flushes and closes the link.
    async fn leave(&mut self, finished: bool) -> Result<(), DaemonError> {
        let _ = self.command(Cmd::Quit);
        if self.out.link.is_none() {
            return Ok(());
        }
        let status = if finished {
            SiteStatus::Idle
        } else {
            SiteStatus::Leaving
        };
        self.presence(status).await?;
        if !finished {
            let topic = topics::control(&self.out.federation);
            self.out
                .send(&topic, Body::Control(Control::Leave), false)
                .await?;
        }
        if let Some(l) = &self.out.link {
            l.flush().await?;
            l.close().await?;
        }
        Ok(())
    }

    /// `cases`: (validation, test) cases of this site.
    fn summary(self, finished: bool, cases: (usize, usize), t0: Instant) -> RunSummary {
        let book = self.book;
        // Test Dice only: a run stopped before its final score has none (the rounds' Dice are
        // validation Dice).
        let final_dice = book.final_dice;
        let summary = RunSummary {
            site: self.out.me,
            strategy: self.cfg.federation.strategy.name().to_string(),
            finished,
            initial_tissue_mean: self.classes.score(&book.initial_dice),
            initial_dice: book.initial_dice,
            final_tissue_mean: self.classes.score(&final_dice),
            final_dice,
            personalise_steps: if book.personalisation == Personalisation::Done {
                self.cfg.federation.personalise_steps
            } else {
                0
            },
            personalised_tissue_mean: self.classes.score(&book.personalised_dice),
            personalised_dice: book.personalised_dice,
            rounds: book.rounds,
            training_cases: self.out.samples,
            validation_cases: cases.0,
            test_cases: cases.1,
            bytes_sent: self.out.bytes_sent,
            bytes_received: self.inb.bytes_received,
            refused: self.inb.refused,
            seconds: t0.elapsed().as_secs_f64(),
        };
        info!(
            finished = summary.finished,
            tissue_dice = ?summary.final_tissue_mean,
            bytes_sent = summary.bytes_sent,
            bytes_received = summary.bytes_received,
            refused = summary.refused,
            "site stopped"
        );
        summary
    }
}
