//! What the benchmark reads from `/proc` (Linux only): CPU seconds and peak RSS of a process, the
//! machine's CPU use, memory and load.

use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 on Linux).
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of a `stat` file after the command name; index 0 is field 3 (`state`).
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: cut after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn cpu_secs_of(path: &str) -> Option<f64> {
    let f = stat_fields(path)?;
    // Fields 14 (utime) and 15 (stime).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// User + system CPU seconds a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_secs_of(&format!("/proc/{pid}/stat"))
}

/// User + system CPU seconds of this process (the bench, and an in-process money-sim).
pub fn self_cpu_secs() -> Option<f64> {
    cpu_secs_of("/proc/self/stat")
}

/// Peak resident set size (`VmHWM`) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|k| k as f64 / 1024.0)
}

/// Current resident set size (`VmRSS`) of a process, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:").map(|k| k as f64 / 1024.0)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The MariaDB (or MySQL) server process on this machine: `pidof mariadbd`, else `mysqld`.
pub fn mariadb_pid() -> Option<u32> {
    ["mariadbd", "mysqld"].iter().find_map(|name| {
        let out = Command::new("pidof").arg(name).output().ok()?;
        String::from_utf8(out.stdout).ok()?.split_whitespace().next()?.parse().ok()
    })
}

/// The aggregate `cpu` line of `/proc/stat`: busy and total ticks over all cores.
#[derive(Debug, Clone, Copy)]
pub struct SystemCpu {
    busy: u64,
    total: u64,
    /// Time the hypervisor ran something else while this machine wanted to run.
    steal: u64,
}

impl SystemCpu {
    pub fn now() -> Option<SystemCpu> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        let steal = v.get(7).copied().unwrap_or(0);
        Some(SystemCpu { busy: total.saturating_sub(idle), total, steal })
    }

    /// CPU seconds all cores spent busy since `earlier` (every process on the machine).
    pub fn busy_secs_since(&self, earlier: &SystemCpu) -> f64 {
        self.busy.saturating_sub(earlier.busy) as f64 / clk_tck()
    }

    /// CPU seconds the hypervisor took from this machine since `earlier` (a virtual machine
    /// that waits for its host: every process here stalls at once).
    pub fn steal_secs_since(&self, earlier: &SystemCpu) -> f64 {
        self.steal.saturating_sub(earlier.steal) as f64 / clk_tck()
    }

    /// Share of all cores' time that was busy since `earlier`, in percent.
    pub fn busy_pct_since(&self, earlier: &SystemCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 * 100.0 / total as f64
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().filter_map(|x| x.parse::<f64>().ok());
    Some([it.next()?, it.next()?, it.next()?])
}

/// `MemTotal` in MiB.
pub fn mem_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line["MemTotal:".len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024)
}

/// The CPU model name of the first core.
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

/// Cores this process may use.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_time_and_a_peak_rss() {
        let pid = std::process::id();
        assert!(self_cpu_secs().is_some_and(|s| s >= 0.0));
        assert!(cpu_secs(pid).is_some());
        assert!(peak_rss_mib(pid).is_some_and(|m| m > 0.0));
        assert!(SystemCpu::now().is_some());
        assert!(loadavg().is_some());
        assert!(mem_total_mib().is_some_and(|m| m > 0));
    }
}
