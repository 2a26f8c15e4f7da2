//! Keyed-cluster cost per datagram: seal and open (XChaCha20-Poly1305) at 1 KB and at the sealed
//! budget (65 436 B), the cost of rejecting a forged datagram (header check + one tag check), and
//! a full `SealContext::classify` (open + replay guard).

use std::hint::black_box;

use chitchat_uring::transport::seal::{
    ClusterLabel, Key, KeyedMode, Keyring, KeyringHandle, MAX_SEALED_PLAINTEXT, Received,
    SealContext, SendSession, reserve_header,
};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SIZES: [(&str, usize); 2] = [("1KB", 1024), ("64KB", MAX_SEALED_PLAINTEXT)];

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn bench(c: &mut Criterion) {
    let ring = Keyring::new(Key::from_bytes([7; 32]));
    let label = ClusterLabel::new("bench-cluster");
    let session = SendSession::new();
    let mut group = c.benchmark_group("seal");
    for (name, len) in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let body = plaintext(len);
        let mut buf = Vec::with_capacity(len + 128);
        group.bench_function(BenchmarkId::new("seal_reserved", name), |b| {
            b.iter(|| {
                reserve_header(&mut buf);
                buf.extend_from_slice(&body);
                ring.seal_reserved(&label, session.next_stamp(), &mut buf)
                    .unwrap();
                black_box(buf.len())
            })
        });
        let mut sealed = body.clone();
        ring.seal_in_place(&label, session.next_stamp(), &mut sealed)
            .unwrap();
        group.bench_function(BenchmarkId::new("open", name), |b| {
            b.iter_batched_ref(
                || sealed.clone(),
                |d| black_box(ring.open_in_place(&label, d).unwrap().plaintext.len()),
                BatchSize::LargeInput,
            )
        });
        let mut forged = sealed.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        group.bench_function(BenchmarkId::new("reject_bad_tag", name), |b| {
            b.iter_batched_ref(
                || forged.clone(),
                |d| black_box(ring.open_in_place(&label, d).is_err()),
                BatchSize::LargeInput,
            )
        });
        let sender = SealContext::new(
            KeyringHandle::new(ring.clone()),
            "bench-cluster",
            KeyedMode::Required,
        );
        let receiver = SealContext::new(
            KeyringHandle::new(ring.clone()),
            "bench-cluster",
            KeyedMode::Required,
        );
        group.bench_function(BenchmarkId::new("classify_with_replay_guard", name), |b| {
            b.iter_batched_ref(
                || {
                    let mut d = body.clone();
                    sender.seal_in_place(&mut d).unwrap();
                    d
                },
                |d| black_box(matches!(receiver.classify(d), Received::Sealed(_))),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
