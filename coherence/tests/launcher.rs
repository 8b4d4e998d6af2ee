//! `rdmem-run` end to end, without an RDMA device: every run names a memory node with
//! `--memnode 127.0.0.1:1`, so none is started, and the ranks are shell one-liners that never
//! connect to it. `cargo test -p rdmem-coherence --test launcher`.
#![cfg(feature = "rdma")]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;
use common::alive;

/// Runs `rdmem-run -n <ranks> --memnode 127.0.0.1:1 <program...>` and collects its output.
fn run(ranks: u32, program: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rdmem-run"))
        .args(["-n", &ranks.to_string(), "--memnode", "127.0.0.1:1"])
        .args(program)
        .env_remove("RDMEM_MEMNODES")
        .env_remove("RDMEM_CONFIG")
        .output()
        .expect("start rdmem-run")
}

/// `sh -c script`, as rdmem-run's program.
fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// How many lines of `output` are exactly `line`.
fn count(output: &str, line: &str) -> usize {
    output.lines().filter(|l| *l == line).count()
}

#[test]
fn every_rank_runs_once_with_its_environment() {
    let out = run(4, &sh("echo rank=$RDMEM_RANK size=$RDMEM_SIZE memnodes=$RDMEM_MEMNODES"));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{}: {stderr}", out.status);
    for rank in 0..4 {
        let line = format!("[{rank}] rank={rank} size=4 memnodes=127.0.0.1:1");
        assert_eq!(count(&stdout, &line), 1, "{line:?} in:\n{stdout}");
    }
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    // On success the summary is all rdmem-run itself prints.
    let summary: Vec<_> = stderr.lines().collect();
    assert_eq!(summary.len(), 1, "{stderr}");
    assert!(summary[0].starts_with("rdmem-run: 4 ranks finished in ") && summary[0].ends_with(" s"), "{stderr}");
}

#[test]
fn stderr_is_prefixed_and_lines_stay_whole() {
    // Each rank writes 200 long lines to each stream, and a last one without a newline.
    let script = "i=0; while [ $i -lt 200 ]; do \
                  echo \"out $RDMEM_RANK $i aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"; \
                  echo \"err $RDMEM_RANK $i bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\" >&2; \
                  i=$((i + 1)); done; printf 'last %s' $RDMEM_RANK >&2";
    let out = run(3, &sh(script));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{}: {stderr}", out.status);
    for rank in 0..3 {
        for i in 0..200 {
            let out_line = format!("[{rank}] out {rank} {i} {}", "a".repeat(82));
            let err_line = format!("[{rank}] err {rank} {i} {}", "b".repeat(82));
            assert_eq!(count(&stdout, &out_line), 1, "{out_line:?}");
            assert_eq!(count(&stderr, &err_line), 1, "{err_line:?}");
        }
        assert_eq!(count(&stderr, &format!("[{rank}] last {rank}")), 1, "{stderr}");
    }
    // Nothing else: no line split or merged with another rank's.
    assert_eq!(stdout.lines().count(), 3 * 200, "{stdout}");
    assert_eq!(stderr.lines().count(), 3 * 201 + 1, "{stderr}");
}

#[test]
fn program_arguments_starting_with_a_dash_pass_through() {
    let out = run(2, &["sh", "-c", "echo \"$0 $*\"", "-n", "--memnode", "-x"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for rank in 0..2 {
        assert_eq!(count(&stdout, &format!("[{rank}] -n --memnode -x")), 1, "{stdout}");
    }
}

#[test]
fn a_failed_rank_fails_the_run() {
    // Ranks 1 and 2 exit with their rank; rank 0 succeeds.
    let out = run(3, &sh("exit $RDMEM_RANK"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rdmem-run: rank 1 failed: exit status: 1")
            || stderr.contains("rdmem-run: rank 2 failed: exit status: 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("rank 0 failed"), "{stderr}");
    assert!(!stderr.contains("finished in"), "{stderr}");
}

#[test]
fn a_rank_killed_by_a_signal_fails_the_run() {
    let out = run(2, &sh("if [ $RDMEM_RANK = 1 ]; then kill -9 $$; fi"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rdmem-run: rank 1 failed: signal: 9 (SIGKILL)"), "{stderr}");
}

#[test]
fn a_failure_stops_the_other_ranks() {
    // The brief's shape: the surviving ranks are shells waiting on a `sleep 600` child. A run
    // that waited for them would take 10 minutes: far past a bound no slow machine reaches.
    let began = Instant::now();
    let out = run(3, &sh("if [ $RDMEM_RANK = 1 ]; then echo giving up >&2; exit 3; fi; sleep 600"));
    let elapsed = began.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(300), "took {elapsed:?}: the other ranks were not stopped");
    assert!(stderr.contains("[1] giving up"), "the failed rank's output is kept:\n{stderr}");
    assert_eq!(count(&stderr, "rdmem-run: rank 1 failed: exit status: 3"), 1, "{stderr}");
    // Ranks rdmem-run killed are not reported as failures of their own.
    assert!(!stderr.contains("rank 0 failed") && !stderr.contains("rank 2 failed"), "{stderr}");
}

#[test]
fn a_failure_kills_the_other_ranks() {
    // The surviving ranks become `sleep` (exec), print their pid first, and must be gone
    // (killed and reaped) when rdmem-run returns.
    let out = run(3, &sh("if [ $RDMEM_RANK = 2 ]; then sleep 0.5; exit 5; fi; echo pid=$$; exec sleep 30"));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rdmem-run: rank 2 failed: exit status: 5"), "{stderr}");
    let pids: Vec<&str> = stdout.lines().filter_map(|l| l.split_once("] pid=").map(|(_, pid)| pid)).collect();
    assert_eq!(pids.len(), 2, "{stdout}");
    for pid in pids {
        // (A reused pid would belong to some other program; the check then reports it.)
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!cmdline.starts_with(b"sleep\x0030"), "rank with pid {pid} is still running");
    }
}

#[test]
fn a_missing_program_is_named() {
    let out = run(2, &["rdmem-no-such-program", "--flag"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("rdmem-run: error: program \"rdmem-no-such-program\" not found"), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = run(1, &["./no/such/dir/program"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("./no/such/dir/program not found"), "{stderr}");
}

#[test]
fn zero_ranks_is_a_usage_error() {
    let out = run(0, &["true"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid value '0'") && stderr.contains("--ranks"), "{stderr}");
}

/// SIGTERM, SIGINT or SIGHUP to rdmem-run (Slurm, systemd, `timeout`) stops every rank it
/// started, one that ignores the signal too (killed after the grace period), and exits 128+sig.
#[test]
fn a_stop_signal_to_the_launcher_stops_every_rank() {
    for (signal, name, code) in
        [(rustix::process::Signal::TERM, "SIGTERM", 143), (rustix::process::Signal::HUP, "SIGHUP", 129)]
    {
        let dir = std::env::temp_dir().join(format!("rdmem-run-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Rank 1 ignores the signal (inherited across exec): it must be killed. Rank 2 is a
        // shell waiting for a child: the child must stop too (it is in the rank's group).
        let script = format!(
            "if [ $RDMEM_RANK = 2 ]; then sleep 600 & echo $! > {dir}/child.pid; fi; \
             echo $$ > {dir}/rank$RDMEM_RANK.tmp && mv {dir}/rank$RDMEM_RANK.tmp {dir}/rank$RDMEM_RANK.pid; \
             if [ $RDMEM_RANK = 1 ]; then trap '' TERM HUP; fi; \
             if [ $RDMEM_RANK = 2 ]; then wait; else exec sleep 600; fi",
            dir = dir.display()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_rdmem-run"))
            .args(["-n", "3", "--memnode", "127.0.0.1:1", "sh", "-c", &script])
            .env_remove("RDMEM_MEMNODES")
            .env_remove("RDMEM_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start rdmem-run");
        let pid_file = |rank: u32| dir.join(format!("rank{rank}.pid"));
        let began = Instant::now();
        while !(0..3).all(|r| pid_file(r).exists()) {
            assert!(began.elapsed() < Duration::from_secs(300), "the ranks never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let read_pid =
            |path: std::path::PathBuf| -> u32 { std::fs::read_to_string(path).unwrap().trim().parse().unwrap() };
        let mut pids: Vec<u32> = (0..3).map(|r| read_pid(pid_file(r))).collect();
        pids.push(read_pid(dir.join("child.pid")));
        assert!(pids.iter().all(|&p| alive(p)), "the ranks run");
        rustix::process::kill_process(rustix::process::Pid::from_raw(child.id() as i32).unwrap(), signal).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{name}: {stderr}");
        assert!(stderr.contains(&format!("stopped by {name}")), "{stderr}");
        assert!(!stderr.contains("failed"), "ranks it stopped are not failures: {stderr}");
        for (i, pid) in pids.into_iter().enumerate() {
            let what = if i < 3 { format!("rank {i}") } else { "rank 2's child".into() };
            assert!(!alive(pid), "{name}: {what} (pid {pid}) is still running");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
