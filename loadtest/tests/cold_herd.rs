//! A tiny cold-herd run end to end: real origin, Redis and corral processes.

mod support;

use std::process::Command;

#[test]
fn tiny_cold_herd_reports_one_upstream_request_per_key_with_protection() {
    let dir = tempfile::tempdir().unwrap();
    let (_, report) = support::run_tiny(
        dir.path(),
        "name = \"tiny\"\nkind = \"cold-herd\"\ninstances = 2\nkeys = 3\nconcurrency = 20\nupstream_delay = \"100ms\"\nprotection = \"both\"\n",
        &[],
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let on = &runs[0];
    assert_eq!(on["protection"], true);
    assert_eq!(on["client_requests"], 60);
    assert_eq!(on["failed_requests"], 0);
    assert_eq!(
        on["upstream_requests"], 3,
        "one upstream request per key across 2 instances"
    );
    let off = &runs[1];
    assert_eq!(
        off["upstream_requests"], 60,
        "without protection the herd goes through"
    );
    for file in ["report.md", "upstream-over-time.svg", "latency-cdf.svg"] {
        assert!(
            dir.path().join("tiny").join(file).exists(),
            "{file} written"
        );
    }
}

#[test]
fn target_mode_loads_a_proxy_started_outside_the_tool() {
    let dir = tempfile::tempdir().unwrap();
    let free = || corral_testkit::free_port().unwrap();
    let (origin_port, proxy_port) = (free(), free());
    // A proxy the tool did not start, already pointed at the origin's port.
    let config = dir.path().join("outside.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{proxy_port}\"\n[[route]]\nname = \"outside\"\nupstream = \"http://127.0.0.1:{origin_port}\"\n"),
    )
    .unwrap();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_corral-loadtest"))
        .arg("proxy")
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap();
    corral_testkit::wait_listening(
        ([127, 0, 0, 1], proxy_port).into(),
        corral_testkit::DEADLINE,
        "the outside proxy",
    )
    .unwrap();

    let scenario = dir.path().join("t.toml");
    std::fs::write(&scenario, "name = \"t\"\nkind = \"cold-herd\"\nkeys = 2\nconcurrency = 10\nupstream_delay = \"100ms\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral-loadtest"))
        .arg("run")
        .arg(&scenario)
        .args([
            "--target",
            &format!("127.0.0.1:{proxy_port}"),
            "--origin-port",
            &origin_port.to_string(),
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("t/report.json")).unwrap())
            .unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "one run against the targets");
    assert_eq!(runs[0]["client_requests"], 20);
    assert_eq!(
        runs[0]["upstream_requests"], 2,
        "the outside corral coalesced each key"
    );
}
