//! Metrics over a real Prometheus scrape: one test binary, because a process installs its
//! global `metrics` recorder once. The exporter serves HTTP on 127.0.0.1; the test reads
//! `GET /metrics` with a plain TCP client and checks each family follows the traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use chitchat_uring::{SpawnOptions, UdpTransport, spawn_chitchat_with};
use metrics_exporter_prometheus::PrometheusBuilder;
use test_support::{free_port, wait_until};

const WAIT: Duration = Duration::from_secs(10);

fn node_config(port: u16, seeds: &[SocketAddr]) -> chitchat_uring::ChitchatConfig {
    let mut config = chitchat_uring::ChitchatConfig::for_test(port);
    config.chitchat_id =
        chitchat_uring::ChitchatId::new(format!("node-{port}"), 1, ([127, 0, 0, 1], port).into());
    config.cluster_id = "metrics-cluster".to_string();
    config.gossip_interval = Duration::from_millis(50);
    config.seed_nodes = seeds.iter().map(ToString::to_string).collect();
    config
}

/// One `GET /metrics` over HTTP/1.0 (the server closes after the body); the body, or "".
fn scrape(addr: SocketAddr) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200") => {
            body.to_string()
        }
        _ => String::new(),
    }
}

/// The value of the sample whose name-and-labels line starts with `series` (exact series).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_follows_the_traffic() {
    // Pick a free TCP port for the exporter (bound, read, released).
    let http_addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    PrometheusBuilder::new()
        .with_http_listener(http_addr)
        .install()
        .expect("install the Prometheus recorder");

    let port_a = free_port();
    let port_b = free_port();
    let addr_a: SocketAddr = ([127, 0, 0, 1], port_a).into();
    let transport = UdpTransport::DEFAULT;
    let a = spawn_chitchat_with(
        node_config(port_a, &[]),
        Vec::new(),
        &transport,
        SpawnOptions::default().with_metrics_label("a"),
    )
    .await
    .unwrap();
    let b = spawn_chitchat_with(
        node_config(port_b, &[addr_a]),
        Vec::new(),
        &transport,
        SpawnOptions::default().with_metrics_label("b"),
    )
    .await
    .unwrap();

    // Two live nodes, on both nodes' gauges.
    let mut body = String::new();
    let both_live = wait_until(WAIT, || {
        body = scrape(http_addr);
        sample(&body, "chitchat_live_nodes{node=\"a\"}") == Some(2.0)
            && sample(&body, "chitchat_live_nodes{node=\"b\"}") == Some(2.0)
    })
    .await;
    assert!(
        both_live,
        "never saw 2 live nodes on both; last scrape:\n{body}"
    );
    assert_eq!(a.metrics().live_nodes, 2);

    // Messages flow both ways: Syns, SynAcks and Acks counted on each side, bytes too.
    for node in ["a", "b"] {
        for family in ["received", "sent"] {
            for ty in ["syn", "synack", "ack"] {
                let series =
                    format!("chitchat_messages_{family}_total{{node=\"{node}\",type=\"{ty}\"}}");
                let seen = wait_until(WAIT, || {
                    body = scrape(http_addr);
                    sample(&body, &series).is_some_and(|v| v > 0.0)
                })
                .await;
                assert!(seen, "{series} never rose; last scrape:\n{body}");
            }
        }
        for series in [
            format!("chitchat_bytes_received_total{{node=\"{node}\"}}"),
            format!("chitchat_bytes_sent_total{{node=\"{node}\"}}"),
            format!("chitchat_message_handling_seconds_count{{node=\"{node}\"}}"),
            format!("chitchat_gossip_round_seconds_count{{node=\"{node}\"}}"),
        ] {
            assert!(
                sample(&body, &series).is_some_and(|v| v > 0.0),
                "{series} has no samples:\n{body}"
            );
        }
        assert!(
            body.lines()
                .any(|l| l.starts_with("chitchat_transport_info{")
                    && l.contains(&format!("node=\"{node}\""))
                    && l.ends_with(" 1")),
            "no transport info for {node}:\n{body}"
        );
    }
    assert_eq!(
        sample(
            &body,
            "chitchat_datagrams_dropped_total{node=\"a\",reason=\"malformed_bad_magic\"}"
        ),
        Some(0.0),
        "drops before any junk:\n{body}"
    );

    // A junk datagram: counted as malformed by its decode-error kind, on node a only.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.send_to(b"\xff\xffnot chitchat", addr_a).unwrap();
    let dropped = wait_until(WAIT, || {
        body = scrape(http_addr);
        sample(
            &body,
            "chitchat_datagrams_dropped_total{node=\"a\",reason=\"malformed_bad_magic\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(dropped, "the junk datagram was not counted:\n{body}");
    assert_eq!(
        sample(
            &body,
            "chitchat_datagrams_dropped_total{node=\"b\",reason=\"malformed_bad_magic\"}"
        ),
        Some(0.0)
    );
    assert_eq!(a.metrics().dropped["malformed_bad_magic"], 1);
    if let Ok(path) = std::env::var("CHITCHAT_METRICS_SCRAPE_OUT") {
        std::fs::write(path, &body).unwrap();
    }

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
