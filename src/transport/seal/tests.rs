use super::*;
use proptest::prelude::*;

fn key(n: u8) -> Key {
    Key::from_bytes([n; KEY_LEN])
}

fn stamp(session: u64, seq: u64, time_ms: u64) -> Stamp {
    Stamp {
        session,
        seq,
        time_ms,
    }
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn sealed(ring: &Keyring, label: &ClusterLabel, body: &[u8]) -> Vec<u8> {
    let mut buf = body.to_vec();
    ring.seal_in_place(label, stamp(7, 1, 0), &mut buf).unwrap();
    buf
}

#[test]
fn round_trip_at_empty_one_kilobyte_and_the_budget() {
    let ring = Keyring::new(key(1));
    let label = ClusterLabel::new("prod");
    for len in [0, 1024, MAX_SEALED_PLAINTEXT] {
        let body = plaintext(len);
        let mut buf = sealed(&ring, &label, &body);
        assert_eq!(buf.len(), len + SEAL_OVERHEAD);
        assert!(buf.len() <= MAX_DATAGRAM_LEN);
        assert_eq!(buf[..2], SEAL_MAGIC);
        if len > 0 {
            assert_ne!(
                buf[SEAL_HEADER_LEN..buf.len() - TAG_LEN],
                body[..],
                "encrypted"
            );
        }
        let opened = ring.open_in_place(&label, &mut buf).unwrap();
        assert_eq!(&buf[opened.plaintext.clone()], &body[..]);
        assert_eq!(opened.stamp, stamp(7, 1, 0));
        assert_eq!(opened.key_id, ring.primary_id());
    }
}

#[test]
fn seal_reserved_matches_the_encoder_workflow() {
    let ring = Keyring::new(key(1));
    let label = ClusterLabel::new("prod");
    let mut buf = Vec::with_capacity(MAX_DATAGRAM_LEN);
    reserve_header(&mut buf);
    buf.extend_from_slice(b"hello");
    let capacity = buf.capacity();
    ring.seal_reserved(&label, stamp(1, 2, 3), &mut buf)
        .unwrap();
    assert_eq!(buf.capacity(), capacity, "no reallocation");
    let range = ring.open_in_place(&label, &mut buf).unwrap().plaintext;
    assert_eq!(&buf[range], b"hello");
    // A buffer without the reserved room is refused, not misread.
    let mut short = vec![0u8; SEAL_HEADER_LEN - 1];
    assert_eq!(
        ring.seal_reserved(&label, stamp(1, 2, 3), &mut short),
        Err(SealError::NoHeaderRoom {
            len: SEAL_HEADER_LEN - 1
        })
    );
}

#[test]
fn nonces_differ_between_seals_of_the_same_plaintext() {
    let ring = Keyring::new(key(1));
    let label = ClusterLabel::new("prod");
    let a = sealed(&ring, &label, b"same");
    let b = sealed(&ring, &label, b"same");
    assert_ne!(a[OFF_NONCE..SEAL_HEADER_LEN], b[OFF_NONCE..SEAL_HEADER_LEN]);
    assert_ne!(a[SEAL_HEADER_LEN..], b[SEAL_HEADER_LEN..]);
}

#[test]
fn a_plaintext_over_the_budget_is_refused_at_seal_time() {
    let ring = Keyring::new(key(1));
    let label = ClusterLabel::new("prod");
    let mut buf = plaintext(MAX_SEALED_PLAINTEXT + 1);
    let err = ring
        .seal_in_place(&label, stamp(1, 1, 1), &mut buf)
        .unwrap_err();
    assert_eq!(
        err,
        SealError::TooLarge {
            len: MAX_SEALED_PLAINTEXT + 1,
            max: MAX_SEALED_PLAINTEXT
        }
    );
    assert_eq!(buf.len(), MAX_SEALED_PLAINTEXT + 1, "buffer left as it was");
    let mut reserved = Vec::new();
    reserve_header(&mut reserved);
    reserved.extend_from_slice(&plaintext(MAX_SEALED_PLAINTEXT + 1));
    assert!(matches!(
        ring.seal_reserved(&label, stamp(1, 1, 1), &mut reserved),
        Err(SealError::TooLarge { .. })
    ));
}

#[test]
fn budget_helpers() {
    assert_eq!(SEAL_OVERHEAD, 71);
    assert_eq!(MAX_SEALED_PLAINTEXT, 65_507 - 71);
    assert_eq!(plaintext_budget(MAX_DATAGRAM_LEN), MAX_SEALED_PLAINTEXT);
    assert_eq!(plaintext_budget(10), 0);
}

#[test]
fn wrong_key_no_key_and_other_cluster_do_not_open() {
    let label = ClusterLabel::new("prod");
    let sender = Keyring::new(key(1));
    let datagram = sealed(&sender, &label, b"state");

    // A ring without the key: unknown id, no tag check attempted.
    let stranger = Keyring::new(key(2));
    assert_eq!(
        stranger.open_in_place(&label, &mut datagram.clone()),
        Err(OpenError::UnknownKey)
    );

    // A different key that claims the same id (what a forger would do): the tag fails.
    let mut impostor = Keyring::new(key(2));
    impostor.keys[0].id = sender.primary_id();
    assert_eq!(
        impostor.open_in_place(&label, &mut datagram.clone()),
        Err(OpenError::BadTag)
    );

    // Same key, another cluster label.
    assert_eq!(
        sender.open_in_place(&ClusterLabel::new("staging"), &mut datagram.clone()),
        Err(OpenError::BadTag)
    );
    // The right ring and label open it.
    assert!(sender.open_in_place(&label, &mut datagram.clone()).is_ok());
}

#[test]
fn tampering_any_byte_is_rejected() {
    let ring = Keyring::new(key(1));
    let label = ClusterLabel::new("prod");
    let datagram = sealed(&ring, &label, &plaintext(300));
    for pos in 0..datagram.len() {
        for flip in [0x01u8, 0x80, 0xFF] {
            let mut bad = datagram.clone();
            bad[pos] ^= flip;
            let err = ring.open_in_place(&label, &mut bad).unwrap_err();
            let expected = match pos {
                0 | 1 => OpenError::NotSealed,
                OFF_VERSION => OpenError::BadVersion(SEAL_VERSION ^ flip),
                OFF_KEY_ID..OFF_SESSION => OpenError::UnknownKey,
                _ => OpenError::BadTag, // session, seq, time, nonce, ciphertext, tag
            };
            assert_eq!(err, expected, "byte {pos} flipped by {flip:#x}");
        }
    }
    // Truncation anywhere and an appended byte too.
    for len in 0..datagram.len() {
        assert!(
            ring.open_in_place(&label, &mut datagram[..len].to_vec())
                .is_err()
        );
    }
    let mut longer = datagram.clone();
    longer.push(0);
    assert_eq!(
        ring.open_in_place(&label, &mut longer),
        Err(OpenError::BadTag)
    );
}

#[test]
fn short_inputs_are_typed() {
    let ring = Keyring::new(key(1));
    let label = ClusterLabel::new("prod");
    assert_eq!(
        ring.open_in_place(&label, &mut []),
        Err(OpenError::NotSealed)
    );
    assert_eq!(
        ring.open_in_place(&label, &mut [0xC5]),
        Err(OpenError::NotSealed)
    );
    assert_eq!(
        ring.open_in_place(&label, &mut [0xC5, 0xEA]),
        Err(OpenError::Truncated)
    );
    let mut header_only = vec![0xC5, 0xEA, SEAL_VERSION];
    header_only.resize(SEAL_OVERHEAD - 1, 0);
    assert_eq!(
        ring.open_in_place(&label, &mut header_only),
        Err(OpenError::Truncated)
    );
}

#[test]
fn our_decoder_rejects_sealed_datagrams_as_foreign() {
    // chitchat 0.13 checks the same magic first (SPEC §3.1); its decoder is crate-private.
    let ring = Keyring::new(key(1));
    let datagram = sealed(&ring, &ClusterLabel::new("prod"), b"x");
    assert_ne!(datagram[..2], CHITCHAT_MAGIC);
    assert!(crate::wire::decode_envelope(&datagram).is_err());
}

/// Three nodes rotate from k1 to k2 one node at a time; after every single change every node
/// still opens every other node's datagrams.
#[test]
fn rotation_in_three_steps_keeps_every_pair_talking() {
    let label = ClusterLabel::new("prod");
    let nodes: Vec<Arc<KeyringHandle>> = (0..3)
        .map(|_| KeyringHandle::new(Keyring::new(key(1))))
        .collect();
    let old = key(1).id();
    let new = key(2).id();
    let all_pairs_open = |step: &str| {
        for (i, a) in nodes.iter().enumerate() {
            for (j, b) in nodes.iter().enumerate() {
                let mut d = sealed(&a.load(), &label, b"gossip");
                let opened = b.load().open_in_place(&label, &mut d);
                assert!(opened.is_ok(), "{step}: {i} -> {j}: {opened:?}");
            }
        }
    };
    all_pairs_open("start");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.install(key(2)).unwrap(), new);
        all_pairs_open(&format!("install on {i}"));
    }
    for (i, n) in nodes.iter().enumerate() {
        n.set_primary(new).unwrap();
        all_pairs_open(&format!("switch primary on {i}"));
    }
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.remove(new), Err(KeyringError::RemovePrimary(new)));
        n.remove(old).unwrap();
        all_pairs_open(&format!("remove old on {i}"));
    }
    for n in &nodes {
        assert_eq!(n.load().key_ids().collect::<Vec<_>>(), vec![new]);
    }
    // Skipping step 1 on a receiver breaks it: that is why install comes first everywhere.
    let early = KeyringHandle::new(Keyring::new(key(3)));
    let late = KeyringHandle::new(Keyring::new(key(1)));
    let mut d = sealed(&early.load(), &label, b"gossip");
    assert_eq!(
        late.load().open_in_place(&label, &mut d),
        Err(OpenError::UnknownKey)
    );
}

#[test]
fn keyring_operations_refuse_what_would_break_the_ring() {
    let mut ring = Keyring::from_keys([key(1), key(2), key(1)]).unwrap();
    assert_eq!(ring.len(), 2, "installing a present key is a no-op");
    assert_eq!(ring.primary_id(), key(1).id());
    assert_eq!(
        ring.set_primary(key(9).id()),
        Err(KeyringError::UnknownKey(key(9).id()))
    );
    assert_eq!(
        ring.remove(key(9).id()),
        Err(KeyringError::UnknownKey(key(9).id()))
    );
    ring.set_primary(key(2).id()).unwrap();
    assert_eq!(
        ring.key_ids().collect::<Vec<_>>(),
        vec![key(2).id(), key(1).id()]
    );
    assert!(matches!(
        Keyring::from_keys(std::iter::empty()),
        Err(KeyringError::Empty)
    ));
    for n in 3..=MAX_KEYS as u8 {
        ring.install(key(n)).unwrap();
    }
    assert_eq!(ring.install(key(200)), Err(KeyringError::Full));
    // A different key under an id already present is refused.
    let mut clash = Keyring::new(key(1));
    clash.keys[0].id = key(5).id();
    assert_eq!(
        clash.install(key(5)),
        Err(KeyringError::IdCollision(key(5).id()))
    );
    // Keys never show in Debug output.
    let shown = format!("{:?} {:?}", key(1), ring);
    assert!(!shown.contains(&key(1).to_base64()) && !shown.contains("1, 1, 1"));
}

#[test]
fn a_running_context_sees_a_replaced_ring_at_once() {
    let handle = KeyringHandle::new(Keyring::new(key(1)));
    let receiver = SealContext::new(handle.clone(), "prod", KeyedMode::Required);
    let sender = SealContext::new(
        KeyringHandle::new(Keyring::new(key(2))),
        "prod",
        KeyedMode::Required,
    );
    let mut d = b"x".to_vec();
    sender.seal_in_place(&mut d).unwrap();
    assert_eq!(
        receiver.classify(&mut d.clone()),
        Received::Rejected(Reject::Open(OpenError::UnknownKey))
    );
    handle.replace(Keyring::from_keys([key(1), key(2)]).unwrap());
    let range = match receiver.classify(&mut d) {
        Received::Sealed(range) => range,
        other => panic!("{other:?}"),
    };
    assert_eq!(&d[range], b"x");
}

#[test]
fn key_file_parsing() {
    let k1 = key(1).to_base64();
    let k2 = key(2).to_base64();
    let text = format!("# cluster keys\n\n  {k1}  \r\n# old key, remove after rotation\n{k2}\n");
    let ring = Keyring::parse_key_file(&text).unwrap();
    assert_eq!(
        ring.key_ids().collect::<Vec<_>>(),
        vec![key(1).id(), key(2).id()]
    );

    let line_of = |text: &str| match Keyring::parse_key_file(text) {
        Err(KeyFileError::Line { line, problem }) => (line, problem),
        other => panic!("{other:?}"),
    };
    let (line, problem) = line_of(&format!("{k1}\n\nnot base64!\n"));
    assert_eq!(line, 3);
    assert!(matches!(
        problem,
        KeyLineProblem::BadKey(KeyError::NotBase64(_))
    ));
    let short = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
    assert_eq!(
        line_of(&format!("# x\n{short}\n")),
        (2, KeyLineProblem::BadKey(KeyError::WrongLength(16)))
    );
    assert_eq!(
        line_of(&format!("{k1}\n{k2}\n{k1}\n")),
        (3, KeyLineProblem::Duplicate { first_line: 1 })
    );
    let unpadded = k1.trim_end_matches('=');
    assert!(matches!(
        line_of(unpadded),
        (1, KeyLineProblem::BadKey(KeyError::NotBase64(_)))
    ));
    let many: String = (1..=MAX_KEYS as u8 + 1)
        .map(|n| key(n).to_base64() + "\n")
        .collect();
    assert_eq!(line_of(&many), (MAX_KEYS + 1, KeyLineProblem::TooMany));
    assert!(matches!(
        Keyring::parse_key_file("# nothing\n\n"),
        Err(KeyFileError::NoKeys)
    ));
    assert!(matches!(
        Keyring::parse_key_file(""),
        Err(KeyFileError::NoKeys)
    ));
    // The message names the line and what is wrong.
    let msg = Keyring::parse_key_file(&format!("{k1}\n{short}\n"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("line 2") && msg.contains("16 bytes"), "{msg}");
}

#[test]
fn key_file_from_disk() {
    let dir = std::env::temp_dir().join(format!("seal-keyfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys");
    let generated = Key::generate().unwrap();
    std::fs::write(&path, format!("{}\n", generated.to_base64())).unwrap();
    let ring = Keyring::load_key_file(&path).unwrap();
    assert_eq!(ring.primary_id(), generated.id());
    let missing = Keyring::load_key_file(&dir.join("absent")).unwrap_err();
    assert!(matches!(missing, KeyFileError::Io { .. }), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn replay_guard_accepts_fresh_and_rejects_duplicates_and_old() {
    let guard = ReplayGuard::default();
    assert_eq!(guard.check(&stamp(1, 10, 1_000)), Ok(()));
    assert_eq!(guard.check(&stamp(1, 10, 1_000)), Err(OpenError::Replayed));
    // Reordered but within the window: accepted once.
    assert_eq!(guard.check(&stamp(1, 12, 1_002)), Ok(()));
    assert_eq!(guard.check(&stamp(1, 11, 1_001)), Ok(()));
    assert_eq!(guard.check(&stamp(1, 11, 1_001)), Err(OpenError::Replayed));
    // Further behind than the sequence window: too old to tell, rejected.
    assert_eq!(
        guard.check(&stamp(1, 12 + REPLAY_WINDOW_SEQS, 1_003)),
        Ok(())
    );
    assert_eq!(guard.check(&stamp(1, 12, 1_002)), Err(OpenError::TooOld));
    assert_eq!(guard.check(&stamp(1, 13, 1_002)), Ok(()));
    // A fresh sequence number but sender time more than 30 s behind its newest: rejected
    // (a datagram recorded on its way to another node and replayed here later).
    assert_eq!(guard.check(&stamp(1, 1_000, 40_000)), Ok(()));
    assert_eq!(guard.check(&stamp(1, 1_001, 9_999)), Err(OpenError::TooOld));
    assert_eq!(guard.check(&stamp(1, 1_002, 10_000)), Ok(()));
    // Sessions are independent.
    assert_eq!(guard.check(&stamp(2, 10, 1_000)), Ok(()));
    assert_eq!(guard.len(), 2);
}

#[test]
fn replay_window_shift_is_exact_across_words() {
    let mut w = SessionWindow::first(&stamp(1, 0, 0));
    for seq in (1..2_000).step_by(3) {
        w.accept(&stamp(1, seq, 0), 30_000).unwrap();
    }
    let max = (1..2_000).step_by(3).last().unwrap();
    for behind in 0..REPLAY_WINDOW_SEQS {
        let seq = max - behind;
        let was_sent = seq % 3 == 1;
        let result = w.clone().accept(&stamp(1, seq, 0), 30_000);
        let expected = if was_sent {
            Err(OpenError::Replayed)
        } else {
            Ok(())
        };
        assert_eq!(result, expected, "seq {seq}");
    }
}

#[test]
fn replay_guard_memory_is_bounded_under_a_flood_of_sessions() {
    let guard = ReplayGuard::new(ReplayConfig {
        max_sessions: 256,
        window: Duration::from_secs(30),
    });
    assert_eq!(guard.capacity(), 256);
    guard.check(&stamp(u64::MAX, 5, 0)).unwrap();
    for session in 0..100_000u64 {
        guard.check(&stamp(session, 0, 0)).unwrap();
        // A live session that keeps sending stays remembered.
        if session % 64 == 0 {
            guard.check(&stamp(u64::MAX, 6 + session, 0)).unwrap();
        }
        assert!(guard.len() <= guard.capacity());
    }
    assert_eq!(guard.len(), 256);
    let last = 6 + 99_968;
    assert_eq!(
        guard.check(&stamp(u64::MAX, last, 0)),
        Err(OpenError::Replayed)
    );
    assert_eq!(guard.check(&stamp(u64::MAX, last - 1, 0)), Ok(()));
    // The newest flood sessions are remembered, the oldest evicted.
    assert_eq!(guard.check(&stamp(99_999, 0, 0)), Err(OpenError::Replayed));
    assert_eq!(guard.check(&stamp(0, 0, 0)), Ok(()));
}

#[test]
fn context_rejects_a_replayed_datagram() {
    let handle = KeyringHandle::new(Keyring::new(key(1)));
    let a = SealContext::new(handle.clone(), "prod", KeyedMode::Required);
    let b = SealContext::new(handle, "prod", KeyedMode::Required);
    let mut d = b"syn".to_vec();
    a.seal_in_place(&mut d).unwrap();
    let recorded = d.clone();
    assert!(matches!(b.classify(&mut d), Received::Sealed(_)));
    assert_eq!(
        b.classify(&mut recorded.clone()),
        Received::Rejected(Reject::Open(OpenError::Replayed))
    );
    // Tampered copies never reach the guard: it only holds authentic sessions.
    assert_eq!(b.replay_guard().len(), 1);
}

fn chitchat_syn() -> Vec<u8> {
    crate::wire::encode_envelope(&crate::ChitchatEnvelope {
        version: crate::ProtocolVersion::V0,
        message: crate::ChitchatMessage::Syn {
            cluster_id: "prod".to_string(),
            digest: Default::default(),
        },
    })
    .unwrap()
}

#[test]
fn plaintext_is_refused_when_required_and_accepted_while_migrating() {
    let handle = KeyringHandle::new(Keyring::new(key(1)));
    let ctx = SealContext::new(handle, "prod", KeyedMode::default());
    assert_eq!(ctx.mode(), KeyedMode::Required);
    let syn = chitchat_syn();
    assert_eq!(syn[..2], CHITCHAT_MAGIC);
    assert_eq!(
        ctx.classify(&mut syn.clone()),
        Received::Rejected(Reject::PlaintextRefused)
    );
    ctx.set_mode(KeyedMode::AcceptPlaintext);
    assert_eq!(ctx.classify(&mut syn.clone()), Received::Plaintext);
    // Sending stays sealed while migrating.
    let mut out = syn.clone();
    ctx.seal_in_place(&mut out).unwrap();
    assert_eq!(out[..2], SEAL_MAGIC);
    // Neither chitchat nor sealed: foreign in both modes.
    assert_eq!(
        ctx.classify(&mut b"GET / HTTP/1.1".to_vec()),
        Received::Rejected(Reject::Foreign)
    );
    ctx.set_mode(KeyedMode::Required);
    assert_eq!(
        ctx.classify(&mut syn.clone()),
        Received::Rejected(Reject::PlaintextRefused)
    );
}

#[test]
fn shared_types_are_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<SealContext>();
    shareable::<KeyringHandle>();
    shareable::<ReplayGuard>();
    // One context used from several threads at once: every datagram opens exactly once.
    let ctx = Arc::new(SealContext::new(
        KeyringHandle::new(Keyring::new(key(1))),
        "prod",
        KeyedMode::Required,
    ));
    let datagrams: Vec<Vec<u8>> = (0..200)
        .map(|_| {
            let mut d = b"x".to_vec();
            ctx.seal_in_place(&mut d).unwrap();
            d
        })
        .collect();
    let opened: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let ctx = &ctx;
                let datagrams = &datagrams;
                s.spawn(move || {
                    datagrams
                        .iter()
                        .filter(|d| matches!(ctx.classify(&mut d.to_vec()), Received::Sealed(_)))
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(
        opened,
        datagrams.len(),
        "each datagram accepted once over all workers"
    );
}

#[test]
fn reject_kinds_are_stable_labels() {
    let kinds: Vec<&str> = [
        Reject::Open(OpenError::NotSealed),
        Reject::Open(OpenError::BadVersion(9)),
        Reject::Open(OpenError::Truncated),
        Reject::Open(OpenError::UnknownKey),
        Reject::Open(OpenError::BadTag),
        Reject::Open(OpenError::Replayed),
        Reject::Open(OpenError::TooOld),
        Reject::PlaintextRefused,
        Reject::Foreign,
    ]
    .iter()
    .map(Reject::kind)
    .collect();
    assert_eq!(
        kinds,
        [
            "not_sealed",
            "bad_version",
            "truncated",
            "unknown_key",
            "bad_tag",
            "replayed",
            "too_old",
            "plaintext_refused",
            "foreign"
        ]
    );
}

proptest! {
    #[test]
    fn open_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        sealed_prefix in any::<bool>(),
        mode_plain in any::<bool>(),
    ) {
        let handle = KeyringHandle::new(Keyring::new(key(1)));
        let ctx = SealContext::new(handle.clone(), "prod", if mode_plain {
            KeyedMode::AcceptPlaintext
        } else {
            KeyedMode::Required
        });
        let mut buf = bytes.clone();
        if sealed_prefix && buf.len() >= OFF_SESSION {
            buf[..2].copy_from_slice(&SEAL_MAGIC);
            buf[OFF_VERSION] = SEAL_VERSION;
            buf[OFF_KEY_ID..OFF_SESSION].copy_from_slice(&key(1).id().0);
        }
        let len = buf.len();
        let result = ctx.classify(&mut buf);
        prop_assert_eq!(buf.len(), len);
        prop_assert!(!matches!(result, Received::Sealed(_)));
        if sealed_prefix && len >= SEAL_OVERHEAD {
            prop_assert_eq!(result, Received::Rejected(Reject::Open(OpenError::BadTag)));
        }
        let _ = handle.load().open_in_place(ctx.label(), &mut bytes.clone());
    }
}
