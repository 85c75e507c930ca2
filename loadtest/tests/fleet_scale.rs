//! A tiny fleet-scale run end to end: real origin, Redis and corral processes, the
//! three phases and their figures.

mod support;

use serde_json::Value;

/// A figure of a run by its name (figures are `[name, value]` pairs; `null` is NaN,
/// a figure that does not apply to the run).
fn figure<'a>(run: &'a Value, name: &str) -> &'a Value {
    let figures = run["figures"].as_array().unwrap();
    let found = figures.iter().find(|f| f[0] == name);
    &found.unwrap_or_else(|| panic!("no figure {name:?}"))[1]
}

/// Runs a tiny fleet-scale scenario on `redis` and gives its report.
fn tiny_run(redis: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, report) = support::run_tiny(
        dir.path(),
        "name = \"tiny\"\nkind = \"fleet-scale\"\ninstances = 2\nconcurrency = 4\nduration = \"1s\"\nupstream_delay = \"0ms\"\nkeys = 2\nherd = 10\nherd_delay = \"100ms\"\n",
        &["--redis", redis],
    );
    assert!(stdout.contains("Fleet miss throughput"), "{stdout}");
    report
}

#[test]
fn tiny_fleet_scale_reports_throughput_round_trips_and_messages_per_phase() {
    let report = tiny_run("single");
    let runs = report["runs"].as_array().unwrap();
    let phases: Vec<&str> = runs.iter().map(|r| r["phase"].as_str().unwrap()).collect();
    assert_eq!(phases.len(), 3, "{phases:?}");
    assert_eq!(
        runs.iter().map(|r| &r["instances"]).collect::<Vec<_>>(),
        [1, 2, 2]
    );
    for run in runs {
        assert_eq!(run["failed_requests"], 0, "{}", run["phase"]);
    }
    let (a, b, c) = (&runs[0], &runs[1], &runs[2]);
    assert_eq!(
        a["client_requests"], a["upstream_requests"],
        "every request a miss"
    );
    assert!(figure(a, "misses/s").as_f64().unwrap() > 0.0);
    assert!(figure(a, "Redis round trips / miss").is_null(), "no Redis");
    assert!(figure(b, "x one instance").as_f64().unwrap() > 0.0);
    assert!(figure(b, "Redis round trips / miss").as_f64().unwrap() >= 1.0);
    assert!(figure(b, "Redis commands / miss").as_f64().unwrap() >= 1.0);
    assert!(figure(b, "messages / fill").as_f64().is_some());
    assert_eq!(c["client_requests"], 20);
    assert_eq!(
        c["upstream_requests"], 2,
        "one upstream request per hot key"
    );
    assert!(figure(c, "misses/s").is_null(), "no throughput for herds");
    assert!(figure(c, "other instances waiting / key")
        .as_f64()
        .is_some());
    assert!(figure(a, "corral CPU µs / miss").as_f64().is_some());
    assert!(figure(b, "Redis CPU µs / miss").as_f64().is_some());
    assert!(
        figure(c, "corral CPU µs / miss").is_null(),
        "no per-miss CPU for herds"
    );
    assert_eq!(report["summary"].as_array().unwrap().len(), 5);
}

#[test]
fn tiny_fleet_scale_runs_on_a_redis_cluster() {
    let report = tiny_run("cluster");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let (b, c) = (&runs[1], &runs[2]);
    assert_eq!(b["failed_requests"], 0);
    assert!(
        figure(b, "Redis round trips / miss").as_f64().unwrap() >= 1.0,
        "counted on the cluster"
    );
    assert!(
        figure(b, "Redis commands / miss").as_f64().unwrap() >= 1.0,
        "commandstats summed over the masters"
    );
    assert_eq!(
        c["upstream_requests"], 2,
        "one upstream request per hot key"
    );
}
