//! Running the load tool end to end on a tiny scenario, for the tests.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs the scenario `text` (named "tiny") with `args`, writing its report under `dir`;
/// gives its stdout and its parsed `report.json`. Panics, with stderr, when it fails.
pub fn run_tiny(dir: &Path, text: &str, args: &[&str]) -> (String, Value) {
    let scenario = dir.join("tiny.toml");
    std::fs::write(&scenario, text).unwrap();
    // The tool's scratch space (its instances' configs), to see it cleaned up.
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral-loadtest"))
        .env("TMPDIR", scratch.path())
        .arg("run")
        .arg(&scenario)
        .args(args)
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the run left {left:?} in its temporary directory"
    );
    let report = std::fs::read_to_string(dir.join("tiny/report.json")).unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        serde_json::from_str(&report).unwrap(),
    )
}
