//! The `chitchat-uring` binary: cluster summary, two nodes gossiping through stdin commands and
//! JSON status lines, clear errors, the load generator, and every `--help`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_chitchat-uring");

/// Runs the binary to completion, killing it after `timeout`.
fn run(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{args:?} did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A running `node` whose stdout lines arrive on a channel; killed on drop.
struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

impl Node {
    fn start(name: &str, port: u16, extra: &[&str]) -> Node {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "node",
            "--listen",
            &listen,
            "--id",
            name,
            "--gossip-ms",
            "50",
            "--status-every-ms",
            "100",
            "--generation",
            "1",
        ];
        args.extend_from_slice(extra);
        let mut child = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node {
            stdin: child.stdin.take(),
            child,
            lines,
            addr: listen.parse().unwrap(),
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// The first status line (parsed) satisfying `pred` within `timeout`.
    fn wait_status(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                return None;
            };
            let status: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("status line is not JSON ({e}): {line}"));
            if pred(&status) {
                return Some(status);
            }
        }
        None
    }

    /// Sends `quit` and waits for a clean exit.
    fn quit(mut self) {
        self.send("quit");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "node exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "node did not quit within 15 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn live_count(status: &Value) -> usize {
    status["live_nodes"].as_array().map_or(0, Vec::len)
}

/// The value of `key` in the state of node `node_id`, in a status line.
fn value_of<'a>(status: &'a Value, node_id: &str, key: &str) -> Option<&'a str> {
    status["cluster_state"]["node_states"]
        .as_array()?
        .iter()
        .find(|state| state["chitchat_id"]["node_id"] == node_id)?["key_values"][key]["value"]
        .as_str()
}

#[test]
fn cluster_prints_a_json_summary_showing_convergence() {
    let output = run(
        &["cluster", "--nodes", "5", "--for-secs", "1", "--json"],
        Duration::from_secs(90),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr:\n{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected, got:\n{stdout}");
    let summary: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(summary["outcome"], "complete", "{summary}");
    assert_eq!(summary["nodes"], 5);
    assert_eq!(summary["converged_nodes"], 5);
    assert!(summary["convergence_secs"].as_f64().unwrap() > 0.0);
    assert!(summary["update_propagation_secs"].as_f64().is_some());
    assert!(summary["messages_per_sec_per_node"].as_f64().unwrap() > 0.0);
    assert!(summary["bytes_per_sec_per_node"].as_f64().unwrap() > 0.0);
    assert!(summary["cpu_ms_per_node_per_sec"].as_f64().is_some());
    assert!(summary["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(summary["transport"].as_str().is_some());
}

#[test]
fn cluster_table_names_the_transport() {
    let output = run(
        &[
            "cluster",
            "--nodes",
            "3",
            "--for-secs",
            "0.5",
            "--transport",
            "epoll",
        ],
        Duration::from_secs(90),
    );
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("transport"), "{stdout}");
    assert!(stdout.contains("epoll"), "{stdout}");
    assert!(stdout.contains("full convergence"), "{stdout}");
}

#[test]
fn cluster_runs_on_the_portable_backend() {
    let output = run(
        &[
            "cluster",
            "--nodes",
            "3",
            "--for-secs",
            "0.5",
            "--transport",
            "portable",
        ],
        Duration::from_secs(90),
    );
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("portable"), "{stdout}");
    assert!(stdout.contains("full convergence"), "{stdout}");
}

#[test]
fn two_nodes_converge_and_a_set_reaches_the_other() {
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Node::start("node-a", port_a, &["--kv", "role=seed"]);
    let seed = a.addr.to_string();
    let b = Node::start("node-b", port_b, &["--seed", &seed]);
    let wait = Duration::from_secs(20);
    let converged = b
        .wait_status(wait, |s| {
            live_count(s) == 2 && value_of(s, "node-a", "role") == Some("seed")
        })
        .expect("node-b never saw node-a alive with its key");
    let ids: Vec<&str> = converged["live_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id["node_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"node-a") && ids.contains(&"node-b"),
        "{ids:?}"
    );
    // chitchat's ChitchatId shape.
    let id = &converged["live_nodes"][0];
    assert!(id["generation_id"].is_u64() && id["gossip_advertise_addr"].is_string());
    assert!(converged["dead_nodes"].is_array());
    assert!(converged["cluster_state"]["seed_addrs"].is_array());

    // A bad command is reported, and the node keeps running.
    a.send("frobnicate now");
    a.send_bytes(b"set \xff\xfe oops\n");
    a.send("set color blue sky");
    b.wait_status(wait, |s| value_of(s, "node-a", "color") == Some("blue sky"))
        .expect("the value set on node-a never reached node-b");
    a.send("delete color");
    b.wait_status(wait, |s| {
        let state = s["cluster_state"]["node_states"]
            .as_array()
            .and_then(|states| {
                states
                    .iter()
                    .find(|st| st["chitchat_id"]["node_id"] == "node-a")
            });
        state.is_some_and(|st| st["key_values"]["color"]["status"] == "Delete")
    })
    .expect("the deletion never reached node-b");
    a.quit();
    b.quit();
}

#[test]
fn node_ends_after_for_secs() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let output = run(
        &[
            "node",
            "--listen",
            &listen,
            "--id",
            "n",
            "--for-secs",
            "0.5",
        ],
        Duration::from_secs(20),
    );
    assert!(output.status.success());
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn node_with_a_bad_address_fails_clearly() {
    let output = run(
        &["node", "--listen", "not-an-address", "--id", "n"],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains("not-an-address"),
        "{stderr}"
    );

    let output = run(
        &["node", "--listen", "0.0.0.0:7000", "--id", "n"],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--advertise"), "{stderr}");

    let output = run(
        &[
            "node",
            "--listen",
            "127.0.0.1:0",
            "--advertise",
            "127.0.0.1:7001",
            "--id",
            "n",
            "--seed",
            "nope",
        ],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--seed"), "{stderr}");
}

#[test]
fn node_on_a_port_in_use_fails_clearly() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run(
        &["node", "--listen", &addr, "--id", "n"],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains(&addr),
        "{stderr}"
    );

    // Another chitchat-uring node (SO_REUSEPORT sockets) counts as in use too.
    let port = free_port();
    let first = Node::start("first", port, &[]);
    first
        .wait_status(Duration::from_secs(10), |_| true)
        .expect("first node never printed a status");
    let listen = format!("127.0.0.1:{port}");
    let output = run(
        &["node", "--listen", &listen, "--id", "second"],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&listen), "{stderr}");
    first.quit();
}

#[test]
fn load_against_a_running_node_reports_replies() {
    let port = free_port();
    // The load's senders are no members: without limits every Syn is answered.
    let node = Node::start(
        "loaded",
        port,
        &["--kv", "k=v", "--no-amplification-limits"],
    );
    node.wait_status(Duration::from_secs(10), |_| true)
        .expect("node never printed a status");
    let target = node.addr.to_string();
    for digest in ["empty", "up-to-date"] {
        let output = run(
            &[
                "load",
                "--target",
                &target,
                "--senders",
                "4",
                "--for-secs",
                "1",
                "--digest",
                digest,
                "--json",
            ],
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{digest}: {stderr}");
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(report["replies"].as_u64().unwrap() > 0, "{report}");
        // A Syn still in flight when the run ends may count as lost: allow 1 % of them.
        let (sent, lost) = (
            report["syns_sent"].as_u64().unwrap(),
            report["lost"].as_u64().unwrap(),
        );
        assert!(
            lost * 100 <= sent,
            "{digest}: {lost} of {sent} Syns unanswered: {report}"
        );
        assert!(report["latency"]["p50_us"].as_f64().unwrap() > 0.0);
        assert!(
            report["latency"]["max_us"].as_f64().unwrap()
                >= report["latency"]["p99_us"].as_f64().unwrap()
        );
    }

    // A wrong cluster id is reported as such.
    let output = run(
        &[
            "load",
            "--target",
            &target,
            "--for-secs",
            "1",
            "--cluster",
            "other",
        ],
        Duration::from_secs(30),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BadCluster"), "{stderr}");
    node.quit();
}

#[test]
fn load_simulates_the_rest_of_a_cluster() {
    let port = free_port();
    let node = Node::start("one-host", port, &[]);
    node.wait_status(Duration::from_secs(10), |_| true)
        .expect("node never printed a status");
    let target = node.addr.to_string();
    let pid = node.child.id().to_string();
    let output = run(
        &[
            "load",
            "--target",
            &target,
            "--cluster-size",
            "100",
            "--gossip-interval-ms",
            "50",
            "--for-secs",
            "1",
            "--node-pid",
            &pid,
            "--json",
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["knowledge"]["peers_known"], 99, "{report}");
    let traffic = &report["traffic"];
    assert!(
        traffic["syn_acks_received"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        traffic["syns_received"].as_u64().unwrap() > 0,
        "the node gossips to the simulated peers: {report}"
    );
    assert!(
        report["node_cpu_ms_per_sec"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    node.quit();
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["cluster", "--help"],
        vec!["node", "--help"],
        vec!["load", "--help"],
    ] {
        let output = run(&args, Duration::from_secs(10));
        assert!(output.status.success(), "{args:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(stdout.contains("Usage"), "{args:?}: {stdout}");
    }
    let output = run(&["cluster", "--nodes", "zero"], Duration::from_secs(10));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--nodes"));
}

#[test]
fn node_joins_a_chitchat_0_13_node_and_they_exchange_keys() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let theirs_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = chitchat::ChitchatConfig {
        chitchat_id: chitchat::ChitchatId::new("chitchat-node", 1, theirs_addr),
        cluster_id: "testing".to_string(),
        gossip_interval: Duration::from_millis(50),
        listen_addr: theirs_addr,
        seed_nodes: vec![],
        failure_detector_config: chitchat::FailureDetectorConfig {
            initial_interval: Duration::from_millis(100),
            ..chitchat::FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3_600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    };
    let theirs = rt
        .block_on(chitchat::spawn_chitchat(
            config,
            vec![("from".to_string(), "chitchat".to_string())],
            &chitchat::transport::UdpTransport,
        ))
        .unwrap();
    let seed = theirs_addr.to_string();
    let mut ours = Node::start("ours", free_port(), &["--seed", &seed, "--protocol", "v0"]);
    ours.wait_status(Duration::from_secs(20), |s| {
        live_count(s) == 2 && value_of(s, "chitchat-node", "from") == Some("chitchat")
    })
    .expect("our node never saw the chitchat node alive with its key");
    ours.send("set from chitchat-uring");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = rt.block_on(theirs.with_chitchat(|c| {
            c.live_nodes().count() == 2
                && c.node_states().iter().any(|(id, state)| {
                    &*id.node_id == "ours" && state.get("from") == Some("chitchat-uring")
                })
        }));
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the chitchat node never saw our node alive with its key"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ours.quit();
    rt.block_on(theirs.shutdown()).unwrap();
}

/// A key file of `n` fresh keys, base64 one per line.
fn key_file(name: &str, n: usize) -> std::path::PathBuf {
    use chitchat_uring::transport::seal::Key;
    let path =
        std::env::temp_dir().join(format!("chitchat-uring-{name}-{}.keys", std::process::id()));
    let lines: Vec<String> = (0..n)
        .map(|_| Key::generate().unwrap().to_base64())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn keyed_cluster_converges_and_says_it_is_keyed() {
    let keys = key_file("cluster", 2);
    let output = run(
        &[
            "cluster",
            "--nodes",
            "4",
            "--for-secs",
            "0.5",
            "--json",
            "--key-file",
            keys.to_str().unwrap(),
        ],
        Duration::from_secs(90),
    );
    let _ = std::fs::remove_file(&keys);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr:\n{stderr}");
    let summary: Value =
        serde_json::from_str(String::from_utf8(output.stdout).unwrap().trim()).unwrap();
    assert_eq!(summary["outcome"], "complete", "{summary}");
    assert!(
        summary["transport"]
            .as_str()
            .unwrap()
            .contains("keyed (XChaCha20-Poly1305)"),
        "{summary}"
    );
}

#[test]
fn bad_key_files_fail_naming_the_flag_and_line() {
    let path = std::env::temp_dir().join(format!("chitchat-uring-bad-{}.keys", std::process::id()));
    std::fs::write(&path, "# a comment\nnot-a-key\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let output = run(
        &[
            "node",
            "--listen",
            &listen,
            "--id",
            "n",
            "--key-file",
            path.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    let _ = std::fs::remove_file(&path);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--key-file") && stderr.contains("line 2"),
        "{stderr}"
    );

    let output = run(
        &[
            "node",
            "--listen",
            &listen,
            "--id",
            "n",
            "--accept-plaintext",
        ],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--accept-plaintext needs --key-file"),
        "{stderr}"
    );
}

/// One `GET /metrics` over HTTP/1.0; the body of a 200 answer, or "".
fn scrape(addr: SocketAddr) -> String {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
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
        Some((head, body)) if head.contains(" 200") => body.to_string(),
        _ => String::new(),
    }
}

#[test]
fn node_serves_prometheus_metrics_that_follow_the_traffic() {
    let http_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let metrics_addr = http_addr.to_string();
    let (port_a, port_b) = (free_port(), free_port());
    let a = Node::start("node-a", port_a, &["--metrics-addr", &metrics_addr]);
    let seed = a.addr.to_string();
    let b = Node::start("node-b", port_b, &["--seed", &seed]);
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut junk_sent = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut body = String::new();
    let ok = |body: &str| {
        body.lines().any(|l| l == "chitchat_live_nodes 2")
            && body
                .lines()
                .any(|l| l == "chitchat_datagrams_dropped_total{reason=\"malformed_bad_magic\"} 1")
            && body.lines().any(|l| {
                l.starts_with("chitchat_messages_received_total{type=\"synack\"}")
                    && !l.ends_with(" 0")
            })
    };
    while Instant::now() < deadline {
        body = scrape(http_addr);
        if ok(&body) {
            break;
        }
        // Once the node is up and gossiping, one junk datagram.
        if !junk_sent && body.lines().any(|l| l == "chitchat_live_nodes 2") {
            junk.send_to(b"\xff\xffjunk", a.addr).unwrap();
            junk_sent = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok(&body), "the scrape never showed the traffic:\n{body}");
    assert!(body.contains("chitchat_message_handling_seconds"), "{body}");
    assert!(body.contains("chitchat_transport_info{"), "{body}");
    a.quit();
    b.quit();
}
