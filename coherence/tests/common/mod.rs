//! Helpers shared by the test binaries that watch processes.

/// Whether process `pid` is still alive (not gone, not a zombie), from /proc.
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}
