//! Tests of the wire format: every byte flipped, every truncation, forged lengths, replays,
//! reassembly in any order, and the limits.

use super::*;
use cosilo_rng::Rng;

fn keys(site: &str, n: u8) -> SiteKeys {
    SiteKeys::from_seed(site, [n; 32]).unwrap()
}

fn roster(ks: &[&SiteKeys]) -> Roster {
    let mut s = "[federation]\nname = \"demo\"\n".to_string();
    for k in ks {
        s.push_str(&k.roster_entry());
    }
    Roster::parse(&s, "test").unwrap()
}

fn header(total_len: u64, chunk_count: u32) -> UpdateHeader {
    UpdateHeader {
        update_id: 77,
        origin: "h1".into(),
        model_version: 5,
        round: 3,
        samples: 40,
        purpose: UpdatePurpose::FedAvgRound,
        format: WeightFormat::F16Zstd,
        layout_digest: [9; 32],
        total_len,
        chunk_count,
        payload_sha256: [7; 32],
    }
}

fn all_bodies(k: &SiteKeys) -> Vec<Body> {
    let mut seen = BTreeMap::new();
    seen.insert("h2".to_string(), 4);
    seen.insert("h3".to_string(), 0);
    vec![
        Body::Presence(Presence {
            status: SiteStatus::Training,
            model_version: 12,
            versions_seen: seen,
            samples: 40,
            round: 2,
            strategy: "braintorrent".into(),
            public_key: k.public_bytes(),
        }),
        Body::UpdateChunk(UpdateChunk {
            update: header(10, 2),
            index: 1,
            data: vec![1, 2, 3, 4, 5],
        }),
        Body::Control(Control::Token {
            cycle: 2,
            position: 1,
            next: "h3".into(),
            update_id: 9,
        }),
        Body::Control(Control::RoundOpen {
            round: 4,
            deadline_unix_ms: 1_800_000_000_000,
        }),
        Body::Control(Control::Pull {
            from: "h2".into(),
            have_version: 3,
        }),
        Body::Control(Control::Leave),
        Body::Metrics(Metrics {
            round: 4,
            model_version: 12,
            dice: vec![Some(0.91), None, Some(0.5)],
            loss: Some(0.25),
            cases: 4,
        }),
        Body::Metrics(Metrics {
            round: 0,
            model_version: 0,
            dice: vec![],
            loss: None,
            cases: 0,
        }),
        Body::ModelAnnouncement(header(1_000_000, 100)),
    ]
}

#[test]
fn every_message_kind_round_trips() {
    let k = keys("h1", 1);
    let r = roster(&[&k, &keys("h2", 2)]);
    for (i, body) in all_bodies(&k).into_iter().enumerate() {
        let env = Envelope::new("h1", 100 + i as u64, 1_700_000_000_000, body);
        let bytes = seal(&env, &k).unwrap();
        assert_eq!(&bytes[..4], b"CSLO");
        assert_eq!(bytes[4], VERSION);
        assert_eq!(bytes[5], env.kind() as u8);
        assert_eq!(open(&bytes, &r).unwrap(), env);
    }
}

#[test]
fn non_members_and_wrong_keys_are_refused() {
    let h1 = keys("h1", 1);
    let h2 = keys("h2", 2);
    let r = roster(&[&h1, &h2]);
    let env = Envelope::new("h9", 1, 0, Body::Control(Control::Leave));
    let outsider = keys("h9", 9);
    let e = open(&seal(&env, &outsider).unwrap(), &r).unwrap_err();
    assert_eq!(e, WireError::NotMember("h9".into()));
    // h2's name signed with another key.
    let impostor = keys("h2", 3);
    let env = Envelope::new("h2", 1, 0, Body::Control(Control::Leave));
    let e = open(&seal(&env, &impostor).unwrap(), &r).unwrap_err();
    assert_eq!(e, WireError::BadSignature("h2".into()));
    // Sealing in someone else's name, or in another version, is refused at the source.
    assert!(matches!(seal(&env, &h1), Err(WireError::Encode(_))));
    let mut v2 = Envelope::new("h1", 1, 0, Body::Control(Control::Leave));
    v2.version = 2;
    assert!(matches!(seal(&v2, &h1), Err(WireError::Encode(_))));
    // A presence advertising another key than the roster's.
    let mut bodies = all_bodies(&h1);
    let Body::Presence(mut p) = bodies.remove(0) else {
        unreachable!()
    };
    p.public_key = h2.public_bytes();
    let env = Envelope::new("h1", 1, 0, Body::Presence(p));
    let e = open(&seal(&env, &h1).unwrap(), &r).unwrap_err();
    assert_eq!(e, WireError::KeyMismatch("h1".into()));
}

#[test]
fn a_flipped_bit_anywhere_is_refused() {
    let k = keys("h1", 1);
    let r = roster(&[&k, &keys("h2", 2)]);
    for body in all_bodies(&k) {
        let bytes = seal(&Envelope::new("h1", 5, 6, body), &k).unwrap();
        for pos in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut m = bytes.clone();
                m[pos] ^= mask;
                assert!(open(&m, &r).is_err(), "flip {mask:#x} at {pos} accepted");
            }
        }
    }
}

#[test]
fn every_truncation_and_extension_is_refused() {
    let k = keys("h1", 1);
    let r = roster(&[&k]);
    for body in all_bodies(&k) {
        let bytes = seal(&Envelope::new("h1", 5, 6, body), &k).unwrap();
        for len in 0..bytes.len() {
            assert!(open(&bytes[..len], &r).is_err(), "truncated to {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(open(&longer, &r).is_err());
    }
    assert_eq!(open(&[], &r), Err(WireError::Truncated("signature")));
}

/// The body parser itself must be total: mutate bodies and re-sign them validly, so the
/// mutations get past the signature check.
#[test]
fn body_parser_is_total_on_signed_garbage() {
    let k = keys("h1", 1);
    let r = roster(&[&k, &keys("h2", 2), &keys("h3", 3)]);
    let mut rng = Rng::new(42);
    let mut outcomes = [0usize; 2];
    for body in all_bodies(&k) {
        let unsigned = encode_unsigned(&Envelope::new("h1", 1, 2, body)).unwrap();
        let body_at = 4 + 1 + 1 + 1 + 2 + 8 + 8 + 4;
        for _ in 0..400 {
            let mut m = unsigned.clone();
            let flips = 1 + rng.below(4);
            for _ in 0..flips {
                let pos = body_at + rng.below(m.len() - body_at);
                m[pos] = rng.next_u64() as u8;
            }
            if rng.below(3) == 0 {
                // Random truncation of the body with a consistent length prefix.
                let cut = body_at + rng.below(m.len() - body_at + 1);
                m.truncate(cut);
                let bl = (cut - body_at) as u32;
                m[body_at - 4..body_at].copy_from_slice(&bl.to_le_bytes());
            }
            let sig = k.sign(&m);
            m.extend_from_slice(&sig);
            outcomes[open(&m, &r).is_ok() as usize] += 1;
        }
    }
    // Both outcomes occur: the loop exercised real parsing, not only early refusals.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn random_bytes_never_panic() {
    let k = keys("h1", 1);
    let r = roster(&[&k]);
    let mut rng = Rng::new(7);
    for _ in 0..2000 {
        let n = rng.below(300);
        let mut b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        if n > 6 && rng.below(2) == 0 {
            b[..4].copy_from_slice(&MAGIC);
            b[4] = VERSION;
            b[5] = 1 + rng.below(5) as u8;
        }
        assert!(open(&b, &r).is_err());
    }
    // A forged huge data length does not allocate: it is refused as truncated.
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(&MAGIC);
    w.u8(VERSION);
    w.u8(Kind::UpdateChunk as u8);
    w.id("h1").unwrap();
    w.u64(1);
    w.u64(1);
    w.u32(u32::MAX);
    let mut m = w.0;
    m.extend_from_slice(&[0; 64]);
    assert_eq!(open(&m, &r), Err(WireError::Truncated("body")));
}

#[test]
fn unknown_version_and_kind_are_named() {
    let k = keys("h1", 1);
    let r = roster(&[&k]);
    let bytes = seal(
        &Envelope::new("h1", 1, 1, Body::Control(Control::Leave)),
        &k,
    )
    .unwrap();
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert_eq!(open(&v2, &r), Err(WireError::UnknownVersion(2)));
    let mut k9 = bytes.clone();
    k9[5] = 9;
    assert_eq!(open(&k9, &r), Err(WireError::UnknownKind(9)));
    let mut bad = bytes;
    bad[0] = b'X';
    assert_eq!(open(&bad, &r), Err(WireError::BadMagic));
}

#[test]
fn encode_refuses_what_it_cannot_represent() {
    let k = keys("h1", 1);
    let mut bodies = all_bodies(&k);
    let Body::Presence(mut p) = bodies.remove(0) else {
        unreachable!()
    };
    p.strategy = "x".repeat(256);
    let e = seal(&Envelope::new("h1", 1, 1, Body::Presence(p)), &k);
    assert!(matches!(e, Err(WireError::Encode(_))));
    let m = Metrics {
        round: 0,
        model_version: 0,
        dice: vec![Some(f64::NAN)],
        loss: None,
        cases: 1,
    };
    assert!(seal(&Envelope::new("h1", 1, 1, Body::Metrics(m)), &k).is_err());
    let c = Control::Pull {
        from: "H/2".into(),
        have_version: 0,
    };
    assert!(seal(&Envelope::new("h1", 1, 1, Body::Control(c)), &k).is_err());
}

#[test]
fn replay_guard_refuses_repeats_and_stale_messages() {
    let mut g = ReplayGuard::new(Duration::from_secs(60));
    let now = 1_700_000_000_000u64;
    let msg = |sender: &str, seq, at, body| Envelope::new(sender, seq, at, body);
    let leave = || Body::Control(Control::Leave);
    g.accept(&msg("h1", 5, now, leave()), now).unwrap();
    let e = g.accept(&msg("h1", 5, now, leave()), now).unwrap_err();
    assert!(matches!(
        e,
        WireError::Replayed {
            seq: 5,
            last: 5,
            ..
        }
    ));
    assert!(g.accept(&msg("h1", 4, now, leave()), now).is_err());
    g.accept(&msg("h1", 6, now, leave()), now).unwrap();
    // Another sender, and another kind of the same sender, have their own counters.
    g.accept(&msg("h2", 1, now, leave()), now).unwrap();
    let ann = Body::ModelAnnouncement(header(1, 1));
    g.accept(&msg("h1", 2, now, ann.clone()), now).unwrap();
    assert_eq!(g.last_seq("h1", Kind::Control), Some(6));
    assert_eq!(g.last_seq("h1", Kind::ModelAnnouncement), Some(2));
    // Outside the window, either way; a refused message is not recorded.
    let e = g
        .accept(&msg("h1", 7, now - 60_001, leave()), now)
        .unwrap_err();
    assert!(matches!(e, WireError::Stale { .. }));
    assert!(g.accept(&msg("h1", 8, now + 60_001, leave()), now).is_err());
    assert_eq!(g.last_seq("h1", Kind::Control), Some(6));
    g.accept(&msg("h1", 9, now - 60_000, leave()), now).unwrap();
    // Retained model announcements are judged by version, not age.
    g.accept(&msg("h1", 3, now - 86_400_000, ann), now).unwrap();
    // Persisted and restored, it still refuses.
    let json = serde_json::to_string(&g).unwrap();
    let back: ReplayGuard = serde_json::from_str(&json).unwrap();
    assert_eq!(back, g);
    assert!(back.check(&msg("h1", 9, now, leave()), now).is_err());
    assert!(back.check(&msg("h1", 10, now, leave()), now).is_ok());
}

#[test]
fn replay_guard_tells_a_redelivery_from_a_replay() {
    // Regression: QoS 1 redeliveries after a broker restart were refused as replays.
    let k = keys("h1", 1);
    let mut g = ReplayGuard::new(Duration::from_secs(60));
    let now = 1_700_000_000_000u64;
    let sealed = |seq, body| {
        let env = Envelope::new("h1", seq, now, body);
        let bytes = seal(&env, &k).unwrap();
        (env, bytes)
    };
    let (e5, b5) = sealed(5, Body::Control(Control::Leave));
    assert_eq!(g.admit(&e5, &b5, now), Ok(Admission::Fresh));
    assert_eq!(g.admit(&e5, &b5, now), Ok(Admission::Duplicate));
    // The same seq with other bytes is a replay, and so is a lower seq.
    let (e5b, b5b) = sealed(
        5,
        Body::Control(Control::Pull {
            from: "h2".into(),
            have_version: 1,
        }),
    );
    assert!(matches!(
        g.admit(&e5b, &b5b, now),
        Err(WireError::Replayed {
            seq: 5,
            last: 5,
            ..
        })
    ));
    let (e4, b4) = sealed(4, Body::Control(Control::Leave));
    assert!(g.admit(&e4, &b4, now).is_err());
    let (e6, b6) = sealed(6, Body::Control(Control::Leave));
    assert_eq!(g.admit(&e6, &b6, now), Ok(Admission::Fresh));
    // Once a newer message is accepted, the older one is a replay again.
    assert!(g.admit(&e5, &b5, now).is_err());
    assert_eq!(g.admit(&e6, &b6, now), Ok(Admission::Duplicate));
    // The digest survives a checkpoint.
    let mut back: ReplayGuard = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
    assert_eq!(back.admit(&e6, &b6, now), Ok(Admission::Duplicate));
}

fn meta(id: u64) -> UpdateMeta {
    UpdateMeta {
        update_id: id,
        origin: "h1".into(),
        model_version: 3,
        round: 1,
        samples: 40,
        purpose: UpdatePurpose::BrainTorrent,
        format: WeightFormat::F16,
        layout_digest: [1; 32],
    }
}

fn payload(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn chunks_reassemble_in_any_order_with_duplicates() {
    let data = payload(10_000, 1);
    let chunks = split_update(&meta(1), &data, 999);
    assert_eq!(chunks.len(), 11);
    assert_eq!(chunks[10].data.len(), 10_000 - 999 * 10);
    let mut rng = Rng::new(3);
    for _ in 0..5 {
        let mut order: Vec<UpdateChunk> = chunks.clone();
        order.extend(chunks.iter().take(4).cloned()); // duplicates
        rng.shuffle(&mut order);
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let t = Instant::now();
        let mut done = None;
        for c in order {
            if let Some(u) = r.offer(c, t).unwrap() {
                assert!(done.is_none(), "completed twice");
                done = Some(u);
            }
        }
        let u = done.expect("complete");
        assert_eq!(u.payload, data);
        assert_eq!(u.header.chunk_count, 11);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.buffered_bytes(), 0);
    }
    // One chunk for a tiny payload, one empty chunk for an empty one.
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let t = Instant::now();
    for (i, p) in [payload(5, 2), Vec::new()].into_iter().enumerate() {
        let cs = split_update(&meta(10 + i as u64), &p, 100);
        assert_eq!(cs.len(), 1);
        let u = r.offer(cs[0].clone(), t).unwrap().unwrap();
        assert_eq!(u.payload, p);
    }
}

#[test]
fn chunks_survive_sealing() {
    let k = keys("h1", 1);
    let ro = roster(&[&k]);
    let data = payload(5000, 4);
    let budget = chunk_payload_budget(2048);
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut out = None;
    for (i, c) in split_update(&meta(1), &data, budget)
        .into_iter()
        .enumerate()
    {
        let bytes = seal(&Envelope::new("h1", i as u64, 0, Body::UpdateChunk(c)), &k).unwrap();
        let Body::UpdateChunk(c) = open(&bytes, &ro).unwrap().body else {
            unreachable!()
        };
        out = r.offer(c, Instant::now()).unwrap().or(out);
    }
    assert_eq!(out.unwrap().payload, data);
}

#[test]
fn a_missing_chunk_expires() {
    let limits = ReassemblyLimits {
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let mut r = Reassembler::new(limits);
    let t0 = Instant::now();
    let chunks = split_update(&meta(5), &payload(3000, 5), 1000);
    r.offer(chunks[0].clone(), t0).unwrap();
    r.offer(chunks[2].clone(), t0).unwrap();
    assert_eq!(r.pending(), 1);
    assert_eq!(r.buffered_bytes(), 2000);
    assert!(r.expire(t0 + Duration::from_secs(10)).is_empty());
    assert_eq!(
        r.expire(t0 + Duration::from_secs(11)),
        vec![("h1".to_string(), 5)]
    );
    assert_eq!(r.pending(), 0);
    assert_eq!(r.buffered_bytes(), 0);
}

#[test]
fn inconsistent_chunks_are_refused() {
    let t = Instant::now();
    let a = split_update(&meta(1), &payload(3000, 1), 1000);
    // Same origin and id, different payload (hence different sha256 header).
    let b = split_update(&meta(1), &payload(3000, 2), 1000);
    let mut r = Reassembler::new(ReassemblyLimits::default());
    r.offer(a[0].clone(), t).unwrap();
    let e = r.offer(b[1].clone(), t).unwrap_err();
    assert!(matches!(e, WireError::ChunkMismatch { .. }), "{e}");
    assert_eq!(r.pending(), 0, "a conflicting partial update is dropped");

    // Same header, tampered data: caught by the SHA-256.
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut bad = a.clone();
    bad[1].data[0] ^= 1;
    r.offer(bad[0].clone(), t).unwrap();
    r.offer(bad[1].clone(), t).unwrap();
    let e = r.offer(bad[2].clone(), t).unwrap_err();
    assert!(matches!(e, WireError::Integrity { .. }), "{e}");

    // A duplicate index with different data.
    let mut r = Reassembler::new(ReassemblyLimits::default());
    r.offer(a[0].clone(), t).unwrap();
    let mut d = a[0].clone();
    d.data[5] ^= 1;
    assert!(matches!(
        r.offer(d, t),
        Err(WireError::ChunkMismatch { .. })
    ));

    // Sizes that cannot add up, indices out of range, forged counts.
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut c = a[0].clone();
    c.data.truncate(900);
    assert!(r.offer(c, t).is_err());
    let mut c = a[2].clone();
    c.index = 3;
    assert!(r.offer(c, t).is_err());
    let mut c = a[0].clone();
    c.update.chunk_count = u32::MAX;
    assert!(r.offer(c, t).is_err());
    let mut c = a[2].clone();
    c.data.push(0);
    r.offer(a[0].clone(), t).unwrap();
    assert!(r.offer(c, t).is_err());
}

#[test]
fn reassembly_is_bounded() {
    let t = Instant::now();
    let limits = ReassemblyLimits {
        max_update_bytes: 10_000,
        max_partial: 3,
        max_partial_per_origin: 2,
        max_buffered_bytes: 2400,
        timeout: Duration::from_secs(60),
    };
    let mut r = Reassembler::new(limits);
    let big = split_update(&meta(1), &payload(10_001, 1), 5000);
    assert!(matches!(
        r.offer(big[0].clone(), t),
        Err(WireError::TooLarge { .. })
    ));
    // Per origin: a third update from h1 evicts h1's oldest.
    for id in 1..=3u64 {
        let cs = split_update(&meta(id), &payload(2000, id), 500);
        r.offer(cs[0].clone(), t + Duration::from_millis(id))
            .unwrap();
    }
    assert_eq!(r.pending(), 2);
    assert_eq!(r.buffered_bytes(), 1000);
    // Over all origins.
    let other = |origin: &str, id| UpdateMeta {
        origin: origin.into(),
        ..meta(id)
    };
    r.offer(
        split_update(&other("h2", 1), &payload(2000, 9), 500)[0].clone(),
        t,
    )
    .unwrap();
    let e = r
        .offer(
            split_update(&other("h3", 1), &payload(2000, 9), 500)[0].clone(),
            t,
        )
        .unwrap_err();
    assert!(matches!(e, WireError::Capacity(_)), "{e}");
    // Bytes: 1500 held; 500 more fit, 500 after that would pass 2400.
    let cs = split_update(&other("h2", 1), &payload(2000, 9), 500);
    r.offer(cs[1].clone(), t).unwrap();
    let e = r.offer(cs[2].clone(), t).unwrap_err();
    assert!(matches!(e, WireError::Capacity(_)), "{e}");
    assert_eq!(r.buffered_bytes(), 2000);
    assert_eq!(r.pending(), 3);
    // A new update refused for bytes leaves no empty partial behind.
    let mut r = Reassembler::new(ReassemblyLimits {
        max_buffered_bytes: 400,
        ..limits
    });
    let e = r
        .offer(split_update(&meta(9), &payload(2000, 9), 500)[0].clone(), t)
        .unwrap_err();
    assert!(matches!(e, WireError::Capacity(_)), "{e}");
    assert_eq!(r.pending(), 0);
}

#[test]
fn budgeted_chunks_fit_the_packet_limit() {
    // The longest ids, topic and header fields: the sealed chunk plus MQTT framing fits.
    let long = "a".repeat(MAX_ID);
    let k = SiteKeys::from_seed(&long, [1; 32]).unwrap();
    for max_packet in [1024usize, 10 * 1024, 1 << 20] {
        let budget = chunk_payload_budget(max_packet);
        assert!(budget > 0);
        let m = UpdateMeta {
            origin: long.clone(),
            update_id: u64::MAX,
            ..meta(1)
        };
        let chunks = split_update(&m, &payload(budget * 2 + 1, 3), budget);
        let sealed = seal(
            &Envelope::new(
                &long,
                u64::MAX,
                u64::MAX,
                Body::UpdateChunk(chunks[0].clone()),
            ),
            &k,
        )
        .unwrap();
        let topic = topics::updates(&long, &long);
        let remaining = 2 + topic.len() + 2 + sealed.len();
        let fixed = 1 + if remaining < 128 {
            1
        } else if remaining < 16384 {
            2
        } else {
            3
        };
        assert!(
            fixed + remaining <= max_packet,
            "{max_packet}: {}",
            fixed + remaining
        );
    }
    assert_eq!(chunk_payload_budget(100), 0);
}

#[test]
fn topics_are_structured() {
    assert_eq!(topics::presence("demo", "h1"), "cosilo/demo/presence/h1");
    assert_eq!(topics::updates("demo", "h1"), "cosilo/demo/updates/h1");
    assert_eq!(topics::model("demo", "h1"), "cosilo/demo/model/h1");
    assert_eq!(topics::control("demo"), "cosilo/demo/control");
    assert_eq!(topics::metrics("demo", "h2"), "cosilo/demo/metrics/h2");
    assert_eq!(topics::all("demo"), "cosilo/demo/#");
    assert_eq!(topics::member_filters("demo").len(), 5);
    for t in [
        topics::presence("demo", "h1"),
        topics::updates("demo", "h1"),
        topics::model("demo", "h1"),
        topics::metrics("demo", "h1"),
    ] {
        let (ch, site) = topics::parse("demo", &t).unwrap();
        assert_eq!(site, Some("h1"));
        assert!(t.contains(ch));
    }
    assert_eq!(
        topics::parse("demo", "cosilo/demo/control"),
        Some(("control", None))
    );
    assert_eq!(topics::parse("demo", "cosilo/other/control"), None);
    assert_eq!(topics::parse("demo", "cosilo/demo/updates/h1/x"), None);
    assert_eq!(topics::parse("demo", "cosilo/demo/bogus/h1"), None);
    assert_eq!(topics::parse("demo", "cosilo/demo/updates/"), None);
}
