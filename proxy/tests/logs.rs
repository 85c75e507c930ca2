//! The binary's logs as an operator's log collector gets them: plain text without
//! terminal escape codes when stderr is not a terminal, or JSON lines on request.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CONFIG: &str =
    "listen = \"127.0.0.1:0\"\n[[route]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9\"\n";

/// Starts corral with `env` and returns its first stderr line that mentions `needle`
/// (within a deadline), then stops it.
fn first_log_line(env: &[(&str, &str)], needle: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_corral"));
    command.arg("--config").arg(&path).stderr(Stdio::piped());
    command.env_remove("RUST_LOG").env_remove("LOG_FORMAT");
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, found) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let needle = needle.to_string();
    let line = loop {
        match found.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains(&needle) => break line,
            Ok(_) => continue,
            Err(err) => {
                stop(&mut child);
                panic!("no log line with {needle:?}: {err}");
            }
        }
    };
    stop(&mut child);
    line
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn logs_to_a_pipe_are_plain_text_without_escape_codes() {
    let line = first_log_line(&[], "corral listening");
    assert!(!line.contains('\u{1b}'), "escape codes in {line:?}");
    assert!(line.contains("INFO"), "{line}");
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let line = first_log_line(&[("LOG_FORMAT", "json")], "corral listening");
    assert!(
        line.starts_with('{') && line.ends_with('}'),
        "not a JSON object: {line}"
    );
    assert!(line.contains("\"level\":\"INFO\""), "{line}");
    assert!(line.contains("\"message\":\"corral listening\""), "{line}");
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["check", "/nonexistent.toml"])
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_FORMAT=\"xml\""));
}
