//! A tiny cold-herd run end to end: real origin, Redis and corral processes.

use std::process::Command;

#[test]
fn tiny_cold_herd_reports_one_upstream_request_per_key_with_protection() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("tiny.toml");
    std::fs::write(
        &scenario,
        "name = \"tiny\"\nkind = \"cold-herd\"\ninstances = 2\nkeys = 3\nconcurrency = 20\nupstream_delay = \"100ms\"\nprotection = \"both\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral-loadtest"))
        .arg("run")
        .arg(&scenario)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tiny/report.json")).unwrap(),
    )
    .unwrap();
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
