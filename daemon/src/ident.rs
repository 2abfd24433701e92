//! Who is acting: this daemon instance's id, and the OS user behind a CLI command.

/// `<hostname>-<pid>`: names this process in `claimed_by` and the audit trail.
pub(crate) fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Whether a daemon run id (`<hostname>-<pid>#<nonce>`) names a process of this host that no
/// longer runs payoutd: a crashed or killed earlier life of a daemon here. Conservative: any
/// other host, or a pid that runs payoutd (possibly reused), counts as alive.
pub(crate) fn owner_gone(run_id: &str) -> bool {
    let Some((instance, _nonce)) = run_id.split_once('#') else { return false };
    let Some((host, pid)) = instance.rsplit_once('-') else { return false };
    let Ok(pid) = pid.parse::<u32>() else { return false };
    let here = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if host != here || pid == std::process::id() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => comm.trim() != "payoutd",
        Err(_) => true,
    }
}

/// The OS user running the CLI (the invoking user under sudo), for the audit trail.
pub(crate) fn os_user() -> String {
    for var in ["SUDO_USER", "USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return v;
            }
        }
    }
    // No login variables (e.g. under systemd): fall back to the numeric uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|uid| format!("uid:{uid}")))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_local_process_that_is_gone_counts_as_gone() {
        let me = format!("{}#0000abcd", instance_id());
        assert!(!owner_gone(&me), "this process is alive");
        assert!(!owner_gone("some-other-host-12#0000abcd"));
        assert!(!owner_gone("not a run id"));
        let host = instance_id().rsplit_once('-').map(|(h, _)| h.to_owned()).unwrap();
        // pid_max is at most 2^22 on Linux: this pid cannot exist.
        assert!(owner_gone(&format!("{host}-99999999#0000abcd")));
    }
}
