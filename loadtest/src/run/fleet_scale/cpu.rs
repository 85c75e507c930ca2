//! CPU time of processes, read from `/proc/<pid>/stat` (user + system), so a phase can
//! say what a miss cost corral's own processes and Redis, apart from the clients and
//! the origin that share the machine.

use std::process::Command;
use std::sync::OnceLock;

/// Milliseconds of CPU the processes `pids` have used so far (0 for one not readable:
/// not Linux, or gone).
pub(super) fn used_ms(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| ticks(pid)).sum::<u64>() as f64 * 1000.0 / ticks_per_s()
}

fn ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the command name (which may hold spaces, in parentheses): fields 3.., of
    // which utime and stime are the 14th and 15th.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 when unknown).
fn ticks_per_s() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_time() {
        let me = std::process::id();
        let before = used_ms(&[me]);
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(used_ms(&[me]) > before, "CPU time grows while spinning");
        assert_eq!(used_ms(&[u32::MAX]), 0.0);
    }
}
