//! Partition test over real network namespaces (`scripts/netns-cluster.sh`). Runs only as root
//! with `ip` available and netns creation allowed; otherwise it says why it skipped and passes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn skip(reason: &str) {
    eprintln!("netns partition test skipped: {reason}");
}

#[test]
fn partition_and_heal_in_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not running as root");
    }
    let has_ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_ip {
        return skip("the `ip` command is not available");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns-cluster.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args([
            "--nodes",
            "4",
            "--bin",
            env!("CARGO_BIN_EXE_chitchat-uring"),
        ])
        .spawn()
        .expect("running scripts/netns-cluster.sh");
    // The script bounds each wait; this bounds the whole (its own waits add up to ~5 min).
    let deadline = Instant::now() + Duration::from_secs(360);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the script") {
            break status;
        }
        if Instant::now() >= deadline {
            // SIGTERM lets the script's trap remove the namespaces.
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!("scripts/netns-cluster.sh did not finish within 6 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    match status.code() {
        Some(0) => {}
        Some(77) => skip("the script could not set up namespaces here (see its SKIP line)"),
        other => panic!("scripts/netns-cluster.sh failed: exit {other:?}"),
    }
}
