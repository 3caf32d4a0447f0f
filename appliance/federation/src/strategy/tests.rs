//! The strategies driven with no broker and no trainer.

use super::*;
use crate::weights::WeightFormat;

/// This site's model (never sent).
fn own(v: Vec<f32>) -> OwnModel {
    OwnModel::unsent(v)
}

/// A peer's model as the daemon hands it over: encoded as on the wire (`f16+zstd`; the tests'
/// values are exact in `f16`).
fn peer(v: Vec<f32>) -> EncodedWeights {
    EncodedWeights::encode(&v, WeightFormat::F16Zstd).unwrap()
}

fn ctx(me: &str, rounds: u64) -> Context {
    Context {
        me: me.into(),
        sites: vec!["h1".into(), "h2".into(), "h3".into()],
        rounds,
        steps_per_round: 5,
        quorum: 2,
        round_deadline_ms: 1_000,
        update_timeout_ms: 10_000,
        patience: 2,
        samples: 10,
    }
}

fn trained(v: f32) -> Input {
    Input::Trained {
        weights: own(vec![v; 4]),
        score: None,
        loss: 1.0,
    }
}

fn model(origin: &str, purpose: Purpose, round: u64, version: u64, samples: u64, v: f32) -> Input {
    Input::Model(PeerModel {
        origin: origin.into(),
        purpose,
        model_version: version,
        round,
        samples,
        weights: peer(vec![v; 4]),
    })
}

fn set_model(actions: &[Action]) -> Option<Vec<f32>> {
    actions.iter().rev().find_map(|a| match a {
        Action::SetModel(w) => Some(w.to_vec()),
        _ => None,
    })
}

fn trains(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::Train { .. }))
}

#[test]
fn local_trains_each_round_then_finishes() {
    let mut s = build(StrategyKind::Local, ctx("h1", 2), None).unwrap();
    assert!(trains(&s.handle(
        Input::Start {
            weights: own(vec![])
        },
        0
    )));
    assert!(trains(&s.handle(trained(1.0), 1)));
    let a = s.handle(trained(2.0), 2);
    assert_eq!(a.last(), Some(&Action::Finished));
    assert!(s.finished());
    assert!(!a.iter().any(|a| matches!(a, Action::Publish { .. })));
}

#[test]
fn fedavg_sites_reach_the_same_average_in_any_arrival_order() {
    // Three sites with samples 10 (own ctx), each sees the other two in a different order.
    let values = [("h1", 1.0f32), ("h2", 2.0), ("h3", 6.0)];
    let mut results = Vec::new();
    for (me, own) in values {
        let mut c = ctx(me, 2);
        c.samples = 10;
        let mut s = build(StrategyKind::FedAvg, c, None).unwrap();
        assert!(trains(&s.handle(
            Input::Start {
                weights: OwnModel::unsent(vec![0.0; 4])
            },
            0
        )));
        let a = s.handle(trained(own), 10);
        assert!(matches!(
            a[0],
            Action::Publish {
                purpose: Purpose::Round,
                round: 0,
                ..
            }
        ));
        assert!(
            set_model(&a).is_none(),
            "averaged before the others arrived"
        );
        let mut got = None;
        for (other, v) in values.iter().rev() {
            if *other != me {
                let a = s.handle(model(other, Purpose::Round, 0, 1, 10, *v), 20);
                if let Some(w) = set_model(&a) {
                    got = Some(w);
                    assert!(trains(&a), "round 1 must start");
                }
            }
        }
        let w = got.expect("averaged once all three were in");
        results.push(w);
        assert_eq!(s.round(), 1);
    }
    assert!((results[0][0] - 3.0).abs() < 1e-6, "{:?}", results[0]);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[1], results[2]);
}

#[test]
fn fedavg_dead_site_deadline_quorum_and_late_updates() {
    let mut s = build(StrategyKind::FedAvg, ctx("h1", 3), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![]),
        },
        0,
    );
    s.handle(trained(1.0), 100);
    // h2 delivers, h3 is dead: nothing before the deadline, the average after it.
    assert!(set_model(&s.handle(model("h2", Purpose::Round, 0, 1, 30, 5.0), 200)).is_none());
    assert!(s.handle(Input::Tick, 900).is_empty());
    let a = s.handle(Input::Tick, 1_100);
    let w = set_model(&a).unwrap();
    assert!((w[0] - 4.0).abs() < 1e-6, "{w:?}"); // (10·1 + 30·5) / 40
    assert!(a.iter().any(|a| matches!(a, Action::Note(_))));
    assert_eq!(s.round(), 1);
    // h3's late round-0 update is ignored.
    let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 100.0), 1_200);
    assert!(set_model(&a).is_none());
    assert!(matches!(&a[0], Action::Note(n) if n.contains("late")));
    // Round 1: below quorum at the deadline → wait until the update timeout.
    s.handle(trained(2.0), 2_000);
    assert!(set_model(&s.handle(Input::Tick, 3_500)).is_none());
    let a = s.handle(Input::Tick, 12_001);
    assert_eq!(set_model(&a).unwrap(), vec![2.0; 4]);
    // Round 2: h3 says it is leaving, h2's early update was buffered: average at once.
    s.handle(model("h2", Purpose::Round, 2, 3, 10, 4.0), 12_100);
    s.handle(
        Input::Presence {
            site: "h3".into(),
            status: PeerStatus::Leaving,
            model_version: 0,
            round: 0,
        },
        12_200,
    );
    let a = s.handle(trained(2.0), 13_000);
    assert_eq!(set_model(&a).unwrap(), vec![3.0; 4]);
    assert_eq!(a.last(), Some(&Action::Finished));
    assert!(s.finished());
    // Strangers and other purposes never reach a model.
    let mut t = build(StrategyKind::FedAvg, ctx("h1", 1), None).unwrap();
    t.handle(
        Input::Start {
            weights: own(vec![]),
        },
        0,
    );
    t.handle(trained(1.0), 0);
    assert!(set_model(&t.handle(model("zz", Purpose::Round, 0, 1, 10, 9.0), 1)).is_none());
    assert!(set_model(&t.handle(model("h2", Purpose::Gossip, 0, 1, 10, 9.0), 1)).is_none());
}

#[test]
fn fedavg_restores_mid_collection_and_republishes() {
    let mut s = build(StrategyKind::FedAvg, ctx("h1", 2), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![]),
        },
        0,
    );
    s.handle(trained(1.0), 10);
    let saved = s.snapshot();
    let mut r = build(StrategyKind::FedAvg, ctx("h1", 2), Some(&saved)).unwrap();
    let a = r.handle(
        Input::Start {
            weights: own(vec![1.0; 4]),
        },
        20,
    );
    assert!(matches!(a[0], Action::Publish { round: 0, .. }));
    r.handle(model("h2", Purpose::Round, 0, 1, 10, 3.0), 30);
    let a = r.handle(model("h3", Purpose::Round, 0, 1, 10, 5.0), 40);
    let w = set_model(&a).unwrap();
    assert!(w.iter().all(|x| (x - 3.0).abs() < 1e-6), "{w:?}");
}

fn published(actions: &[Action]) -> Vec<(u64, u64, Vec<f32>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish {
                round,
                model_version,
                weights,
                ..
            } => Some((*round, *model_version, weights.values.to_vec())),
            _ => None,
        })
        .collect()
}

#[test]
fn fedavg_resends_its_round_update_to_a_joining_peer() {
    // Regression: a round update published before a peer first connected
    // never reached it (round updates are not retained), so it waited out the deadline.
    let mut s = build(StrategyKind::FedAvg, ctx("h1", 2), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![]),
        },
        0,
    );
    // Before its own update exists there is nothing to resend.
    let joining = |site: &str| Input::Presence {
        site: site.into(),
        status: PeerStatus::Joining,
        model_version: 0,
        round: 0,
    };
    assert!(published(&s.handle(joining("h3"), 5)).is_empty());
    s.handle(trained(2.0), 10);
    let a = s.handle(joining("h3"), 20);
    assert_eq!(published(&a), vec![(0, 1, vec![2.0; 4])]);
    // A peer that is already training gets nothing again; nor does an unknown site.
    let training = Input::Presence {
        site: "h2".into(),
        status: PeerStatus::Training,
        model_version: 0,
        round: 0,
    };
    assert!(published(&s.handle(training, 30)).is_empty());
    assert!(published(&s.handle(joining("x9"), 35)).is_empty());
    // The round still ends as usual, and a late round-0 update is still ignored.
    s.handle(model("h2", Purpose::Round, 0, 1, 10, 4.0), 40);
    let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 6.0), 50);
    let w = set_model(&a).unwrap();
    assert!(w.iter().all(|x| (x - 4.0).abs() < 1e-6), "{w:?}");
    let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 9.0), 60);
    assert!(set_model(&a).is_none());
    // In round 1, before training, it holds no round-1 update to resend.
    assert!(published(&s.handle(joining("h2"), 70)).is_empty());
}

#[test]
fn gossip_avg_never_reuses_a_version_announced_before_a_restart() {
    // Regression: a restarted site reused version numbers. h1 published v1 and v2, was killed with its checkpoint
    // at v1, and republished another v2 that peers ignored (they hold a v2 of h1).
    let mut s = build(StrategyKind::GossipAvg, ctx("h1", 4), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    s.handle(trained(1.0), 10);
    let checkpoint = s.snapshot();
    let a = s.handle(trained(2.0), 20);
    assert_eq!(published(&a)[0].1, 2);
    // Restart from the v1 checkpoint; the broker hands back the retained v2 announcement.
    let mut r = build(StrategyKind::GossipAvg, ctx("h1", 4), Some(&checkpoint)).unwrap();
    assert_eq!(r.model_version(), 1);
    assert!(trains(&r.handle(
        Input::Start {
            weights: own(vec![1.0; 4])
        },
        30
    )));
    r.handle(
        Input::Announced {
            site: "h1".into(),
            model_version: 2,
        },
        35,
    );
    assert_eq!(r.model_version(), 2);
    assert_eq!(r.versions_seen().get("h1"), Some(&2));
    let a = r.handle(trained(3.0), 40);
    assert_eq!(published(&a), vec![(2, 3, vec![3.0; 4])]);
    // An older own announcement (or this run's own, echoed) changes nothing.
    r.handle(
        Input::Announced {
            site: "h1".into(),
            model_version: 1,
        },
        45,
    );
    assert_eq!(r.model_version(), 3);
    // A peer that held h1's v2 takes the new v3.
    let mut peer = build(StrategyKind::GossipAvg, ctx("h2", 4), None).unwrap();
    peer.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    peer.handle(model("h1", Purpose::Gossip, 1, 2, 10, 2.0), 50);
    peer.handle(model("h1", Purpose::Gossip, 2, 3, 10, 3.0), 60);
    let a = peer.handle(trained(5.0), 70);
    let w = set_model(&a).unwrap();
    assert!(w.iter().all(|x| (x - 4.0).abs() < 1e-6), "{w:?}");
}

#[test]
fn gossip_avg_merges_newer_peers_without_waiting() {
    let mut s = build(StrategyKind::GossipAvg, ctx("h1", 2), None).unwrap();
    assert!(trains(&s.handle(
        Input::Start {
            weights: own(vec![0.0; 4])
        },
        0
    )));
    // h2's model arrives while h1 trains; h3 is silent.
    s.handle(model("h2", Purpose::Gossip, 0, 1, 30, 5.0), 5);
    let a = s.handle(trained(1.0), 10);
    assert!(matches!(
        a[0],
        Action::Publish {
            purpose: Purpose::Gossip,
            model_version: 1,
            retain: true,
            ..
        }
    ));
    let w = set_model(&a).expect("merged with h2");
    assert!((w[0] - 4.0).abs() < 1e-6, "{w:?}");
    assert!(trains(&a), "did not wait for h3");
    assert_eq!(s.versions_seen().get("h2"), Some(&1));
    assert_eq!(s.versions_seen().get("h1"), Some(&1));
    // The same version again is not merged twice; an older one is ignored.
    s.handle(model("h2", Purpose::Gossip, 0, 1, 30, 5.0), 11);
    // Presence announcing a version we lack → Pull once.
    let p = Input::Presence {
        site: "h3".into(),
        status: PeerStatus::Training,
        model_version: 2,
        round: 2,
    };
    let a = s.handle(p.clone(), 12);
    assert_eq!(
        a,
        vec![Action::Pull {
            from: "h3".into(),
            have_version: 0
        }]
    );
    assert!(s.handle(p, 13).is_empty());
    // Last round: merges h3, then waits for h2's final model.
    s.handle(model("h3", Purpose::Gossip, 1, 2, 10, 7.0), 14);
    let a = s.handle(trained(1.0), 20);
    let w = set_model(&a).unwrap();
    assert!((w[0] - 4.0).abs() < 1e-6, "{w:?}"); // (10·1 + 10·7) / 20
    assert!(!s.finished());
    s.handle(
        Input::Presence {
            site: "h2".into(),
            status: PeerStatus::Idle,
            model_version: 2,
            round: 2,
        },
        21,
    );
    let a = s.handle(model("h2", Purpose::Gossip, 1, 2, 30, 8.0), 22);
    assert!(set_model(&a).is_some());
    assert_eq!(a.last(), Some(&Action::Finished));
    // A restart restores the version vector.
    let saved = s.snapshot();
    let r = build(StrategyKind::GossipAvg, ctx("h1", 2), Some(&saved)).unwrap();
    assert_eq!(r.versions_seen(), s.versions_seen());
    assert!(r.finished());
}

#[test]
fn gossip_avg_final_average_is_one_shared_model_in_any_arrival_order() {
    // Regression: merging each final model as it arrived left h3 (5 cases) with 3/4 of
    // whichever peer came last, and every site with another model.
    let (samples, value) = ([40u64, 15, 5], [1.0f32, 2.0, 7.0]);
    let sites = ["h1", "h2", "h3"];
    let want = (40.0 * 1.0 + 15.0 * 2.0 + 5.0 * 7.0) / 60.0;
    // Per site: the peers whose final model arrives while it trains, then the rest in order.
    let orders: [(&[usize], &[usize]); 3] = [(&[], &[2, 1]), (&[2], &[0]), (&[], &[1, 0])];
    let mut finals = Vec::new();
    for (i, (before, after)) in orders.iter().enumerate() {
        let mut c = ctx(sites[i], 1);
        c.samples = samples[i];
        let mut s = build(StrategyKind::GossipAvg, c, None).unwrap();
        s.handle(
            Input::Start {
                weights: own(vec![0.0; 4]),
            },
            0,
        );
        let peer = |j: usize| model(sites[j], Purpose::Gossip, 0, 1, samples[j], value[j]);
        for &j in before.iter() {
            assert!(s.handle(peer(j), 1).is_empty());
        }
        for j in (0..3).filter(|&j| j != i) {
            s.handle(
                Input::Presence {
                    site: sites[j].into(),
                    status: PeerStatus::Idle,
                    model_version: 1,
                    round: 1,
                },
                2,
            );
        }
        let mut last = s.handle(trained(value[i]), 3);
        for &j in after.iter() {
            assert!(
                !s.finished(),
                "{} finished before {}'s model",
                sites[i],
                sites[j]
            );
            last = s.handle(peer(j), 4);
        }
        assert!(s.finished());
        assert_eq!(last.last(), Some(&Action::Finished));
        let w = set_model(&last).expect("a final average");
        assert!(
            (w[0] - want).abs() < 1e-6,
            "{}: {w:?}, want {want}",
            sites[i]
        );
        let seen = s.versions_seen();
        assert!(sites.iter().all(|h| seen.get(*h) == Some(&1)), "{seen:?}");
        finals.push(w);
    }
    assert_eq!(finals[0], finals[1]);
    assert_eq!(finals[0], finals[2]);
}

#[test]
fn gossip_avg_gives_up_on_a_dead_peer() {
    let mut s = build(StrategyKind::GossipAvg, ctx("h1", 1), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    s.handle(trained(1.0), 100);
    assert!(!s.finished());
    assert!(s.handle(Input::Tick, 5_000).is_empty());
    let a = s.handle(Input::Tick, 10_100);
    assert_eq!(a.last(), Some(&Action::Finished));
}

#[test]
fn ciil_token_goes_round_the_ring() {
    let rounds = 2;
    let mut sites: Vec<Box<dyn Strategy>> = ["h1", "h2", "h3"]
        .iter()
        .map(|s| build(StrategyKind::Ciil, ctx(s, rounds), None).unwrap())
        .collect();
    let starts: Vec<bool> = sites
        .iter_mut()
        .map(|s| {
            trains(&s.handle(
                Input::Start {
                    weights: own(vec![]),
                },
                0,
            ))
        })
        .collect();
    assert_eq!(starts, vec![true, false, false]);
    // Simulate: the holder trains (adds 1 to the model), publishes, everyone receives.
    let mut holder = 0usize;
    let mut value = 0.0f32;
    for position in 0..(rounds * 3) {
        value += 1.0;
        let a = sites[holder].handle(trained(value), position);
        let (round, w) = a
            .iter()
            .find_map(|a| match a {
                Action::Publish {
                    purpose: Purpose::Token,
                    round,
                    weights,
                    ..
                } => Some((*round, weights.values.to_vec())),
                _ => None,
            })
            .unwrap();
        assert_eq!(round, position);
        let origin = ["h1", "h2", "h3"][holder];
        let mut next = None;
        for (i, s) in sites.iter_mut().enumerate() {
            if i == holder {
                continue;
            }
            let a = s.handle(
                model(origin, Purpose::Token, round, round + 1, 10, w[0]),
                position,
            );
            if trains(&a) {
                assert!(next.is_none());
                next = Some(i);
            }
            if position + 1 < rounds * 3 {
                assert_eq!(set_model(&a), Some(w.clone()));
            }
        }
        if position + 1 < rounds * 3 {
            assert_eq!(next, Some((holder + 1) % 3));
            holder = (holder + 1) % 3;
        } else {
            assert!(next.is_none());
        }
    }
    assert!(sites.iter().all(|s| s.finished()));
    // A token from the wrong holder is ignored.
    let mut s = build(StrategyKind::Ciil, ctx("h2", 2), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![]),
        },
        0,
    );
    assert!(!trains(
        &s.handle(model("h3", Purpose::Token, 0, 1, 10, 1.0), 0)
    ));
}

#[test]
fn iil_passes_its_best_after_patience() {
    let mut h1 = build(StrategyKind::Iil, ctx("h1", 10), None).unwrap();
    let mut h2 = build(StrategyKind::Iil, ctx("h2", 10), None).unwrap();
    assert!(trains(&h1.handle(
        Input::Start {
            weights: own(vec![0.0; 4])
        },
        0
    )));
    assert!(!trains(&h2.handle(
        Input::Start {
            weights: own(vec![0.0; 4])
        },
        0
    )));
    let scored = |v: f32, d: f64| Input::Trained {
        weights: own(vec![v; 4]),
        score: Some(d),
        loss: 0.5,
    };
    assert!(trains(&h1.handle(scored(1.0, 0.5), 1)));
    assert!(trains(&h1.handle(scored(2.0, 0.7), 2)));
    assert!(trains(&h1.handle(scored(3.0, 0.6), 3)));
    let a = h1.handle(scored(4.0, 0.65), 4);
    assert!(!trains(&a));
    let passed = a
        .iter()
        .find_map(|a| match a {
            Action::Publish {
                weights, round: 0, ..
            } => Some(weights.values.to_vec()),
            _ => None,
        })
        .unwrap();
    assert_eq!(passed, vec![2.0; 4], "passes the best, not the last");
    assert!(a.contains(&Action::PassToken {
        next: "h2".into(),
        cycle: 0,
        position: 1
    }));
    let a = h2.handle(model("h1", Purpose::Token, 0, 1, 10, 2.0), 5);
    assert_eq!(set_model(&a), Some(vec![2.0; 4]));
    assert!(trains(&a));
    // h1 adopts the last site's model and finishes.
    let a = h1.handle(model("h3", Purpose::Token, 2, 3, 10, 9.0), 6);
    assert_eq!(
        a,
        vec![Action::SetModel(Arc::new(vec![9.0; 4])), Action::Finished]
    );
}

#[test]
fn fedavg_running_sum_is_bit_identical_to_the_ordered_average_in_any_arrival_order() {
    // Values whose f32 sums depend on the order of addition.
    let sites: Vec<String> = ["h1", "h2", "h3", "h4"].map(String::from).to_vec();
    let update = |i: usize| -> (u64, Vec<f32>) {
        let w = (0..64)
            .map(|k| ((k * 7919 + i * 104_729) % 1_000) as f32 * 1e-3 + 1e-7 * i as f32)
            .collect();
        (3 + i as u64 * 11, w)
    };
    let reference = |present: &[usize]| {
        let ups: Vec<_> = present.iter().map(|&i| update(i)).collect();
        average(ups.into_iter().map(|(n, w)| (n, Part::Own(Arc::new(w))))).unwrap()
    };
    // Even sites' updates come as this site's own values, odd ones as a peer's encoded bytes:
    // both must add the same bits.
    let part = |i: usize, w: Vec<f32>| {
        if i % 2 == 0 {
            Part::Own(Arc::new(w))
        } else {
            Part::Peer(EncodedWeights::encode(&w, WeightFormat::F32).unwrap())
        }
    };
    let arrivals: [&[usize]; 5] = [
        &[0, 1, 2, 3],
        &[3, 2, 1, 0],
        &[1, 3, 0, 2],
        &[2, 0, 3], // h2 never sends: h3 and h4 wait for the end
        &[3, 1],    // h1 and h3 never send
    ];
    for order in arrivals {
        let mut sum = fedavg::RoundSum::default();
        for &i in order {
            let (n, w) = update(i);
            sum.offer(&sites, sites[i].clone(), n, part(i, w));
        }
        // A copy of an update already in changes nothing.
        let (n, w) = update(order[0]);
        sum.offer(&sites, sites[order[0]].clone(), n, part(order[0], w));
        assert_eq!(sum.len_from(&sites), order.len());
        let mut present = order.to_vec();
        present.sort();
        let (contributors, avg) = sum.finish();
        let expected: Vec<String> = present.iter().map(|&i| sites[i].clone()).collect();
        assert_eq!(contributors, expected);
        let avg = avg.unwrap();
        let want = reference(&present);
        assert!(
            avg.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "arrival order {order:?} changed the average"
        );
    }
}

fn presence(site: &str, version: u64, round: u64) -> Input {
    Input::Presence {
        site: site.into(),
        status: PeerStatus::Training,
        model_version: version,
        round,
    }
}

fn sites3() -> Vec<String> {
    vec!["h1".into(), "h2".into(), "h3".into()]
}

/// The initiator is the same draw at every site, depends on the step only (and the roster), and
/// every site initiates some steps.
#[test]
fn braintorrent_initiator_is_a_seeded_draw_every_site_computes_alike() {
    let sites = sites3();
    let draws: Vec<usize> = (0..300)
        .map(|t| braintorrent::initiator(&sites, t))
        .collect();
    let again: Vec<usize> = (0..300)
        .map(|t| braintorrent::initiator(&sites, t))
        .collect();
    assert_eq!(draws, again);
    for i in 0..3 {
        let n = draws.iter().filter(|&&d| d == i).count();
        assert!(
            (60..140).contains(&n),
            "site {i} initiates {n} of 300 steps"
        );
    }
    // Not a fixed rotation.
    assert!(draws.windows(2).any(|w| w[0] == w[1]));
    let other: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
    let other_draws: Vec<usize> = (0..300)
        .map(|t| braintorrent::initiator(&other, t))
        .collect();
    assert_ne!(draws, other_draws);
}

/// One step as in the paper: the initiator waits for its peers' step models, pulls only what is
/// newer than its version vector, and replaces its model by the sample-weighted average; a
/// non-initiator never changes its model, even when a pulled model passes by.
#[test]
fn braintorrent_only_the_initiator_pulls_and_changes_its_model() {
    let sites = sites3();
    let first = braintorrent::initiator(&sites, 0);
    let me = sites[first].clone();
    let peers: Vec<String> = sites.iter().filter(|s| **s != me).cloned().collect();

    let mut c = ctx(&me, 1);
    c.samples = 10;
    let mut s = build(StrategyKind::BrainTorrent, c, None).unwrap();
    assert!(trains(&s.handle(
        Input::Start {
            weights: own(vec![0.0; 4])
        },
        0
    )));
    let a = s.handle(trained(1.0), 10);
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Offer {
            model_version: 1,
            ..
        }
    )));
    assert!(!a.iter().any(|a| matches!(a, Action::Publish { .. })));
    // Nobody has trained step 1 yet: no pull, no merge.
    assert!(!a
        .iter()
        .any(|a| matches!(a, Action::Pull { .. } | Action::SetModel(_))));
    // A peer announces version 1: pulled, once.
    let a = s.handle(presence(&peers[0], 1, 1), 20);
    assert_eq!(
        a,
        vec![Action::Pull {
            from: peers[0].clone(),
            have_version: 0
        }]
    );
    assert!(s.handle(presence(&peers[0], 1, 1), 21).is_empty());
    let a = s.handle(model(&peers[0], Purpose::Gossip, 0, 1, 30, 5.0), 30);
    assert!(
        set_model(&a).is_none(),
        "merged before every peer's model was in"
    );
    s.handle(presence(&peers[1], 1, 1), 40);
    let a = s.handle(model(&peers[1], Purpose::Gossip, 0, 1, 60, 9.0), 50);
    // (10·1 + 30·5 + 60·9) / 100 = 7.0
    let merged = set_model(&a).expect("the initiator merges");
    assert!(merged.iter().all(|&v| (v - 7.0).abs() < 1e-6), "{merged:?}");
    assert!(a.iter().any(|a| matches!(
        a,
        Action::EndOfRound { round: 0, contributors } if contributors.len() == 3
    )));
    assert_eq!(s.versions_seen().get(&peers[0]), Some(&1));
    // Its peers have finished their one step: done.
    assert_eq!(a.last(), Some(&Action::Finished));

    // A non-initiator of the same step: trains, offers, logs the round with itself alone, and
    // ignores the pulled models that reach it.
    let mut n = build(StrategyKind::BrainTorrent, ctx(&peers[0], 1), None).unwrap();
    n.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    let a = n.handle(trained(5.0), 10);
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Offer {
            model_version: 1,
            ..
        }
    )));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::EndOfRound { round: 0, contributors } if contributors.len() == 1
    )));
    assert!(!a.iter().any(|a| matches!(a, Action::Pull { .. })));
    let a = n.handle(model(&me, Purpose::Gossip, 0, 1, 10, 1.0), 20);
    assert!(set_model(&a).is_none());
    // It stays (answering pulls) until every peer has finished its steps.
    assert!(!n.finished());
    n.handle(presence(&me, 1, 1), 30);
    let a = n.handle(presence(&peers[1], 1, 1), 31);
    assert_eq!(a.last(), Some(&Action::Finished));
}

/// An initiator whose peer never trains gives up at the update timeout and merges what it has.
#[test]
fn braintorrent_initiator_gives_up_on_a_silent_peer() {
    let sites = sites3();
    let me = sites[braintorrent::initiator(&sites, 0)].clone();
    let peers: Vec<String> = sites.iter().filter(|s| **s != me).cloned().collect();
    let mut s = build(StrategyKind::BrainTorrent, ctx(&me, 2), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    s.handle(trained(1.0), 10);
    s.handle(presence(&peers[0], 1, 1), 20);
    let a = s.handle(model(&peers[0], Purpose::Gossip, 0, 1, 10, 3.0), 30);
    assert!(set_model(&a).is_none());
    assert!(s.handle(Input::Tick, 5_000).is_empty());
    let a = s.handle(Input::Tick, 10_011);
    let merged = set_model(&a).expect("merged at the timeout");
    assert!(merged.iter().all(|&v| (v - 2.0).abs() < 1e-6), "{merged:?}");
    assert!(trains(&a), "the next step trains");
    assert_eq!(s.round(), 1);
}

/// The state survives a checkpoint: version vector and step come back.
#[test]
fn braintorrent_state_round_trips_through_a_snapshot() {
    let sites = sites3();
    let me = sites[braintorrent::initiator(&sites, 0)].clone();
    let peer = sites.iter().find(|s| **s != me).unwrap().clone();
    let mut s = build(StrategyKind::BrainTorrent, ctx(&me, 3), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    s.handle(trained(1.0), 10);
    s.handle(presence(&peer, 1, 1), 20);
    s.handle(model(&peer, Purpose::Gossip, 0, 1, 10, 3.0), 30);
    s.handle(Input::Tick, 100_000);
    let saved = s.snapshot();
    let mut r = build(StrategyKind::BrainTorrent, ctx(&me, 3), Some(&saved)).unwrap();
    assert_eq!(r.round(), 1);
    assert_eq!(r.versions_seen().get(&peer), Some(&1));
    let a = r.handle(
        Input::Start {
            weights: own(vec![2.0; 4]),
        },
        0,
    );
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Offer {
            model_version: 1,
            ..
        }
    )));
    assert!(trains(&a));
}

fn members(sites: &[&str], quorum: usize) -> Input {
    Input::Members {
        sites: sites.iter().map(|s| s.to_string()).collect(),
        quorum,
    }
}

#[test]
fn fedavg_stops_waiting_for_a_removed_member_and_drops_its_waiting_update() {
    let mut s = build(StrategyKind::FedAvg, ctx("h1", 3), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    s.handle(trained(1.0), 10);
    // h3's update waits behind h2's (the sum adds in site-id order).
    let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 100.0), 20);
    assert!(set_model(&a).is_none());
    // h3 is removed mid-round: its waiting update is dropped; h2 is still expected.
    let a = s.handle(members(&["h1", "h2"], 2), 30);
    assert!(
        set_model(&a).is_none(),
        "closed the round without h2: {a:?}"
    );
    let a = s.handle(model("h2", Purpose::Round, 0, 1, 10, 3.0), 40);
    assert_eq!(
        set_model(&a),
        Some(vec![2.0; 4]),
        "h3's update was averaged in"
    );
    let Some(Action::EndOfRound { contributors, .. }) =
        a.iter().find(|a| matches!(a, Action::EndOfRound { .. }))
    else {
        panic!("no end of round: {a:?}");
    };
    assert_eq!(contributors, &["h1", "h2"]);
    // From now on h3's updates are not a member's.
    s.handle(trained(1.0), 50);
    let a = s.handle(model("h3", Purpose::Round, 1, 2, 10, 100.0), 60);
    assert!(
        matches!(&a[..], [Action::Note(n)] if n.contains("ignored")),
        "{a:?}"
    );
}

#[test]
fn fedavg_removing_the_last_missing_member_closes_the_round() {
    let mut s = build(StrategyKind::FedAvg, ctx("h1", 3), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    s.handle(trained(1.0), 10);
    s.handle(model("h2", Purpose::Round, 0, 1, 10, 3.0), 20);
    // Everyone but h3 is in; removing h3 means every member delivered.
    let a = s.handle(members(&["h1", "h2"], 2), 30);
    assert_eq!(set_model(&a), Some(vec![2.0; 4]), "{a:?}");
    assert!(trains(&a));
}

#[test]
fn fedavg_accepts_an_added_member_and_waits_for_it() {
    let mut s = build(StrategyKind::FedAvg, ctx("h1", 3), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    // Before it is a member, h4's update is ignored.
    let a = s.handle(model("h4", Purpose::Round, 0, 1, 10, 7.0), 5);
    assert!(
        matches!(&a[..], [Action::Note(n)] if n.contains("ignored")),
        "{a:?}"
    );
    s.handle(members(&["h1", "h2", "h3", "h4"], 2), 6);
    s.handle(trained(1.0), 10);
    s.handle(model("h2", Purpose::Round, 0, 1, 10, 2.0), 20);
    let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 6.0), 30);
    assert!(set_model(&a).is_none(), "did not wait for h4: {a:?}");
    let a = s.handle(model("h4", Purpose::Round, 0, 1, 10, 7.0), 40);
    assert_eq!(set_model(&a), Some(vec![4.0; 4]), "{a:?}");
}

#[test]
fn gossip_avg_forgets_a_removed_member_and_merges_an_added_one() {
    let mut s = build(StrategyKind::GossipAvg, ctx("h1", 5), None).unwrap();
    s.handle(
        Input::Start {
            weights: own(vec![0.0; 4]),
        },
        0,
    );
    // h3's model arrives but is not merged before h3 is removed.
    s.handle(model("h3", Purpose::Gossip, 0, 1, 10, 100.0), 5);
    s.handle(members(&["h1", "h2", "h4"], 2), 6);
    let a = s.handle(model("h4", Purpose::Gossip, 0, 1, 10, 3.0), 7);
    assert!(!a
        .iter()
        .any(|a| matches!(a, Action::Note(n) if n.contains("ignored"))));
    let a = s.handle(trained(1.0), 10);
    assert_eq!(set_model(&a), Some(vec![2.0; 4]), "{a:?}");
    let seen = s.versions_seen();
    assert!(
        seen.contains_key("h4") && !seen.contains_key("h3"),
        "{seen:?}"
    );
    let a = s.handle(model("h3", Purpose::Gossip, 1, 2, 10, 100.0), 20);
    assert!(
        matches!(&a[..], [Action::Note(n)] if n.contains("ignored")),
        "{a:?}"
    );
}
