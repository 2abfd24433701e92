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
