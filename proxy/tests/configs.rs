//! Every example config loads, and `corral check` reports bad ones with file, line and key.

use std::path::Path;
use std::process::Command;

use corral::config::Config;

#[test]
fn every_example_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected the example configs in {}",
        dir.display()
    );
}

#[test]
fn embedded_demo_config_is_the_file() {
    let file =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml"))
            .unwrap();
    assert_eq!(corral::demo::DEMO_CONFIG, file);
}

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "bad.toml");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

const ROUTE: &str = "[[route]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9000\"\n";

#[test]
fn check_prints_resolved_routes() {
    let (ok, stdout, _) = check(&format!(
        "listen = \"127.0.0.1:8080\"\n{ROUTE}ttl = \"90s\"\n"
    ));
    assert!(ok);
    assert!(
        stdout.contains("api") && stdout.contains("1m 30s"),
        "{stdout}"
    );
}

#[test]
fn check_names_file_line_and_key_of_each_error() {
    let cases = [
        ("listen = \"127.0.0.1:8080\"\n[[route]]\nname = \"api\"\nupstream = \n", "bad.toml:4:"),
        (&format!("listen = \"127.0.0.1:8080\"\n{ROUTE}tll = \"5s\"\n"), "bad.toml:5:1: route[0].tll: unknown field"),
        (&format!("listen = \"127.0.0.1:8080\"\n{ROUTE}ttl = \"0s\"\n"), "bad.toml:5:7: route[0].ttl: must be greater than zero"),
        (&format!("listen = \"127.0.0.1:8080\"\n{ROUTE}stale_if_error = \"ten minutes\"\n"), "bad.toml:5:18: route[0].stale_if_error: invalid duration"),
        (&format!("listen = \"127.0.0.1:8080\"\n[cache]\nmax_bytes = \"lots\"\n{ROUTE}"), "bad.toml:3:13: cache.max_bytes: invalid byte size"),
        (&format!("listen = \"nowhere\"\n{ROUTE}"), "bad.toml:1:10: listen: invalid address"),
        (&format!("listen = \"127.0.0.1:8080\"\n{ROUTE}{ROUTE}"), "bad.toml:6:8: route[1].name: route name \"api\" is used twice"),
        (
            &format!("listen = \"127.0.0.1:8080\"\n{ROUTE}[[route]]\nname = \"b\"\nupstream = \"http://x\"\n"),
            "bad.toml:5:1: route[1]: route \"b\" matches the same host and path_prefix as route \"api\"",
        ),
        // A missing key is named where it is missing.
        ("listen = \"127.0.0.1:8080\"\n[[route]]\nname = \"api\"\n", "bad.toml:2:1: route[0].upstream: is required and missing"),
        (ROUTE, "bad.toml:1:1: listen: is required and missing"),
    ];
    for (text, expected) in cases {
        let (ok, _, stderr) = check(text);
        assert!(!ok, "{text} should be refused");
        assert!(
            stderr.contains(expected),
            "for:\n{text}\nexpected {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn missing_file_is_reported_once_on_one_line_without_a_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["check", "/nonexistent/corral.toml"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "Error: /nonexistent/corral.toml: cannot read the config file: No such file or directory (os error 2)",
        "one line: no repeated cause, no backtrace"
    );
}
