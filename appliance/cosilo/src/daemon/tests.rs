use super::*;
use cosilo_federation::strategy::{Context, Input, OwnModel, StrategyKind};
use cosilo_federation::weights::WeightFormat;
use cosilo_federation::wire::Control;
use cosilo_federation::wire::{Body, Envelope, UpdateMeta, UpdatePurpose};
use cosilo_train::TrainConfig;

/// A site without a broker, driving strategy `kind` alone; its trainer commands go to the
/// returned receiver.
fn offline_site(eval_every: u64, kind: StrategyKind) -> (Site, std::sync::mpsc::Receiver<Cmd>) {
    let mut cfg = SiteConfig::default();
    cfg.federation.eval_every = eval_every;
    cfg.federation.personalise_steps = 0;
    cfg.site.id = "h1".into();
    let keys = SiteKeys::generate("h1").unwrap();
    let roster = Roster::parse(
        &format!(
            "[federation]\nname = \"{}\"\n\n{}",
            cfg.federation.name,
            keys.roster_entry()
        ),
        "test",
    )
    .unwrap();
    let ctx = Context {
        me: "h1".into(),
        sites: vec!["h1".into()],
        rounds: 3,
        steps_per_round: 7,
        quorum: 1,
        round_deadline_ms: 1_000,
        update_timeout_ms: 1_000,
        patience: 1,
        samples: 1,
    };
    let strategy = strategy::build(kind, ctx, None).unwrap();
    let (commands, rx) = std::sync::mpsc::channel();
    let membership = Membership {
        keys,
        roster,
        link: None,
    };
    let shape = ModelShape {
        layout: Layout {
            tensors: vec![("out.bias".into(), vec![5])],
        },
        samples: 1,
        classes: Classes::new(&TrainConfig::default(), &cfg.federation.score_classes),
    };
    let site = Site::new(
        cfg,
        membership,
        shape,
        strategy,
        commands,
        DaemonState::default(),
    );
    (site, rx)
}

/// The commands queued so far, by name; a `Save` with the strategy round it checkpoints.
fn queued(rx: &std::sync::mpsc::Receiver<Cmd>) -> Vec<String> {
    rx.try_iter()
        .map(|c| match c {
            Cmd::Train { steps, .. } => format!("train {steps}"),
            Cmd::SetWeights(_) => "set".into(),
            Cmd::Evaluate => "evaluate".into(),
            Cmd::FinalScore { personalised } => format!("final score personalised={personalised}"),
            Cmd::Save(v) => format!("save round {}", v["strategy"]["round"]),
            Cmd::SavePersonalised(_) => "save personalised".into(),
            Cmd::Quit => "quit".into(),
        })
        .collect()
}

fn trained() -> Input {
    Input::Trained {
        weights: OwnModel::unsent(vec![0.5; 5]),
        score: None,
        loss: 0.25,
    }
}

#[tokio::test]
async fn a_round_is_checkpointed_before_the_next_round_trains() {
    // Regression: the Save of round k's checkpoint was queued behind round
    // k+1's Train, so the checkpoint held the next round's weights with round k's state.
    let (mut site, rx) = offline_site(1, StrategyKind::Local);
    let a = site.strategy.handle(
        Input::Start {
            weights: OwnModel::unsent(vec![]),
        },
        0,
    );
    site.apply(a).await.unwrap();
    assert_eq!(queued(&rx), ["train 7"]);
    let a = site.strategy.handle(trained(), 1);
    site.apply(a).await.unwrap();
    // The next Train waits for the evaluation and the checkpoint.
    assert_eq!(queued(&rx), ["evaluate"]);
    site.evaluated(Vec::new()).await.unwrap();
    assert_eq!(queued(&rx), ["save round 1", "train 7"]);
    assert_eq!(site.book.rounds.len(), 1);
}

/// Rounds are scored on validation (`Evaluate`); only the finished strategy's model is scored on
/// the test cases (`FinalScore`), once.
#[tokio::test]
async fn rounds_read_validation_and_only_the_final_model_reads_test() {
    let (mut site, rx) = offline_site(1, StrategyKind::Local);
    let a = site.strategy.handle(
        Input::Start {
            weights: OwnModel::unsent(vec![]),
        },
        0,
    );
    site.apply(a).await.unwrap();
    let mut asked = queued(&rx);
    for t in 1..=3 {
        let a = site.strategy.handle(trained(), t);
        site.apply(a).await.unwrap();
        asked.extend(queued(&rx));
        site.evaluated(Vec::new()).await.unwrap();
        asked.extend(queued(&rx));
    }
    assert!(site.strategy.finished());
    let finals: Vec<&String> = asked.iter().filter(|c| c.starts_with("final")).collect();
    assert_eq!(finals, ["final score personalised=false"], "{asked:?}");
    let evaluations = asked.iter().filter(|c| *c == "evaluate").count();
    assert_eq!(evaluations, 3, "{asked:?}");
    // The final score is asked for after the last round's evaluation.
    let last_eval = asked.iter().rposition(|c| c == "evaluate");
    let fin = asked.iter().position(|c| c.starts_with("final"));
    assert!(fin > last_eval, "{asked:?}");
}

#[tokio::test]
async fn rounds_without_evaluation_are_checkpointed_before_training_on() {
    let (mut site, rx) = offline_site(2, StrategyKind::Local);
    let a = site.strategy.handle(
        Input::Start {
            weights: OwnModel::unsent(vec![]),
        },
        0,
    );
    site.apply(a).await.unwrap();
    queued(&rx);
    // Round 0 is not scored (every 2nd round is): logged and saved at once.
    let a = site.strategy.handle(trained(), 1);
    site.apply(a).await.unwrap();
    assert_eq!(queued(&rx), ["save round 1", "train 7"]);
    // Round 1 is scored.
    let a = site.strategy.handle(trained(), 2);
    site.apply(a).await.unwrap();
    assert_eq!(queued(&rx), ["evaluate"]);
    site.evaluated(Vec::new()).await.unwrap();
    assert_eq!(queued(&rx), ["save round 2", "train 7"]);
    assert_eq!(site.book.rounds.len(), 2);
}

#[tokio::test]
async fn own_announcement_from_before_a_restart_reaches_the_strategy_a_forged_one_not() {
    // Regression: own messages (a restarted site's earlier announcement, or a forgery with its
    // key) were all dropped unseen.
    let (mut site, _rx) = offline_site(1, StrategyKind::GossipAvg);
    site.inb.own_seq_floor = 1_000;
    let announcement = |site: &Site, seq: u64, version: u64| {
        let meta = UpdateMeta {
            update_id: seq,
            origin: "h1".into(),
            model_version: version,
            round: version - 1,
            samples: 1,
            purpose: UpdatePurpose::Announce,
            format: WeightFormat::F32,
            layout_digest: site.out.layout.digest(),
        };
        let body = Body::ModelAnnouncement(meta.header(&[0; 20], 1 << 16));
        wire::seal(&Envelope::new("h1", seq, now_ms(), body), &site.out.keys).unwrap()
    };
    let topic = || "cosilo/test/model/h1".to_string();
    // Signed with this site's key, above its own seq floor, not sent by this run: dropped.
    let forged = announcement(&site, 5_000, 7);
    site.message(topic(), forged, true).await.unwrap();
    assert_eq!(site.strategy.model_version(), 0);
    // Its retained announcement from before the restart: the strategy learns the version.
    let retained = announcement(&site, 900, 2);
    site.message(topic(), retained, true).await.unwrap();
    assert_eq!(site.strategy.model_version(), 2);
    assert_eq!((site.inb.refused, site.inb.bytes_received), (0, 0));
}

#[tokio::test]
async fn a_changed_roster_is_checked_in_full_before_it_replaces_the_one_in_use() {
    let (mut site, _rx) = offline_site(1, StrategyKind::FedAvg);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roster.toml");
    let alone = site.inb.roster.clone();
    std::fs::write(&path, alone.to_toml()).unwrap();
    site.roster_watch = Some(RosterWatch::new(&path));
    // Unchanged: nothing happens.
    site.reload_roster(false).await.unwrap();
    assert_eq!((site.inb.rosters_refused, &site.inb.roster), (0, &alone));

    let h2 = SiteKeys::generate("h2").unwrap();
    let with_h2 = format!("{}\n{}", alone.to_toml(), h2.roster_entry());
    let imposter = SiteKeys::generate("h1").unwrap();
    let fed = &site.cfg.federation.name;
    let refused = [
        // Malformed: a key that is not hex, and no key at all.
        with_h2.replace(&h2.public_hex(), &"zz".repeat(32)),
        format!("{}\n[[site]]\nid = \"h2\"\n", alone.to_toml()),
        // Another federation.
        with_h2.replace(&format!("name = \"{fed}\""), "name = \"other\""),
        // Without this site.
        format!("[federation]\nname = \"{fed}\"\n\n{}", h2.roster_entry()),
        // This site under another key.
        format!(
            "[federation]\nname = \"{fed}\"\n\n{}\n{}",
            imposter.roster_entry(),
            h2.roster_entry()
        ),
    ];
    for (i, text) in refused.iter().enumerate() {
        std::fs::write(&path, text).unwrap();
        site.reload_roster(false).await.unwrap();
        assert_eq!(
            site.inb.rosters_refused,
            i as u64 + 1,
            "case {i} was not refused"
        );
        assert_eq!(site.inb.roster, alone, "case {i} replaced the roster");
        // The same bytes again (the next poll) are not refused twice.
        site.reload_roster(false).await.unwrap();
        assert_eq!(site.inb.rosters_refused, i as u64 + 1);
    }

    // h2 is admitted: its messages open.
    std::fs::write(&path, &with_h2).unwrap();
    site.reload_roster(false).await.unwrap();
    assert!(site.inb.roster.contains("h2"));
    let leave = |seq: u64| {
        let env = Envelope::new("h2", seq, now_ms(), Body::Control(Control::Leave));
        wire::seal(&env, &h2).unwrap()
    };
    let topic = || "cosilo/test/control".to_string();
    site.message(topic(), leave(1), false).await.unwrap();
    assert_eq!(site.inb.refused, 0);

    // h2 is removed: its messages are refused as a removed member's.
    std::fs::write(&path, alone.to_toml()).unwrap();
    site.reload_roster(false).await.unwrap();
    assert!(!site.inb.roster.contains("h2"));
    site.message(topic(), leave(2), false).await.unwrap();
    assert_eq!(site.inb.refused_by.get("removed"), Some(&1));
    assert_eq!(site.inb.refused, 1);
}
