//! Codec throughput: digests (V0/V1) and deltas at 100 and 1 000 nodes.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use chitchat_uring::message::{
    ChitchatEnvelope, ChitchatMessage, Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest,
    ProtocolVersion,
};
use chitchat_uring::types::{ChitchatId, DeletionStatusMutation, Heartbeat};
use chitchat_uring::wire::{Decoder, Encoder, delta_mtu};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const KEYS_PER_NODE: u64 = 10;

fn node_id(i: u32) -> ChitchatId {
    let addr = SocketAddr::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 7280);
    ChitchatId::new(
        format!("indexer-{i:05}"),
        1_700_000_000 + u64::from(i),
        addr,
    )
}

fn digest(num_nodes: u32) -> Digest {
    let mut digest = Digest::default();
    for i in 0..num_nodes {
        let i64 = u64::from(i);
        digest.add_node(
            node_id(i),
            NodeDigest::new(Heartbeat::from(10_000 + i64 * 13), i64 % 5, 1_000 + i64),
        );
    }
    digest
}

/// A 32-byte value that is not trivially compressible.
fn value(node: u32, key: u64) -> String {
    let x = (u64::from(node) << 32 | key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{x:016x}{:016x}", x.rotate_left(29) ^ 0x5555_aaaa_5555_aaaa)
}

fn delta(num_nodes: u32) -> Delta {
    let node_deltas = (0..num_nodes)
        .map(|i| NodeDelta {
            chitchat_id: node_id(i),
            from_version_excluded: 0,
            last_gc_version: 0,
            max_version: KEYS_PER_NODE,
            key_values: (1..=KEYS_PER_NODE)
                .map(|version| KeyValueUpdate {
                    key: format!("key-{version:02}"),
                    value: value(i, version),
                    version,
                    status: DeletionStatusMutation::Set,
                })
                .collect(),
        })
        .collect();
    Delta { node_deltas }
}

fn bench_digest(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest");
    for num_nodes in [100, 1_000] {
        let digest = digest(num_nodes);
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let label = format!("{version:?}/{num_nodes}");
            let mut encoder = Encoder::new();
            let mut out = Vec::with_capacity(1 << 16);
            group.bench_function(BenchmarkId::new("encode", &label), |b| {
                b.iter(|| {
                    out.clear();
                    let entries = digest.node_digests.iter().map(|(id, nd)| (id, *nd));
                    black_box(encoder.encode_digest(version, entries, usize::MAX, &mut out))
                })
            });
            let syn = ChitchatEnvelope {
                version,
                message: ChitchatMessage::Syn {
                    cluster_id: "quickwit-default-cluster".to_string(),
                    digest: digest.clone(),
                },
            };
            let mut bytes = Vec::new();
            encoder.encode_envelope(&syn, &mut bytes).unwrap();
            let mut decoder = Decoder::new();
            group.bench_function(BenchmarkId::new("decode_syn", &label), |b| {
                b.iter(|| black_box(decoder.decode_envelope(black_box(&bytes)).unwrap()))
            });
        }
    }
    group.finish();
}

fn write_delta(encoder: &mut Encoder, delta: &Delta, mtu: usize, out: &mut Vec<u8>) -> usize {
    let mut writer = encoder.delta_writer(out, mtu);
    'nodes: for nd in &delta.node_deltas {
        if !writer.try_add_node(
            &nd.chitchat_id,
            nd.last_gc_version,
            nd.from_version_excluded,
        ) {
            break;
        }
        for kv in &nd.key_values {
            if !writer.try_add_kv(&kv.key, &kv.value, kv.version, kv.status) {
                break 'nodes;
            }
        }
    }
    writer.finish()
}

fn bench_delta(c: &mut Criterion) {
    let mut group = c.benchmark_group("delta");
    for num_nodes in [100, 1_000] {
        let delta = delta(num_nodes);
        let mut encoder = Encoder::new();
        let mut out = Vec::with_capacity(1 << 20);
        for (mtu_label, mtu) in [("unbounded", usize::MAX), ("datagram", delta_mtu(0))] {
            group.bench_function(
                BenchmarkId::new(format!("encode_{mtu_label}"), num_nodes),
                |b| {
                    b.iter(|| {
                        out.clear();
                        black_box(write_delta(&mut encoder, &delta, mtu, &mut out))
                    })
                },
            );
        }
        let ack = ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Ack { delta },
        };
        let mut bytes = Vec::new();
        encoder.encode_envelope(&ack, &mut bytes).unwrap();
        let mut decoder = Decoder::new();
        group.bench_function(BenchmarkId::new("decode_ack", num_nodes), |b| {
            b.iter(|| black_box(decoder.decode_envelope(black_box(&bytes)).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_digest, bench_delta);
criterion_main!(benches);
