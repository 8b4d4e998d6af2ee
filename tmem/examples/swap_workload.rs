//! A workload that needs more memory than it is allowed: it fills MIB MiB with data it can
//! check (half of it compressible, half random), reads it all back twice and checks every
//! word. Run under a cgroup's `memory.max` smaller than MIB, the kernel swaps part of it out
//! and in again; any page lost or mixed up fails the check.
//!
//! ```sh
//! swap_workload 192 [--cgroup /sys/fs/cgroup/swaptest] [--pause]
//! ```
//! `--cgroup DIR` moves this process into that cgroup first. `--pause` prints `filled` after
//! the first check and waits for a line on stdin before the second (so a test can look at the
//! swap meanwhile, or kill it). Prints `ok MIB MiB, N major faults, S s` at the end and exits
//! 0; exits 1 on the first wrong word.

use std::io::BufRead;
use std::time::Instant;

fn word(i: u64) -> u64 {
    // Even 4 KiB pages compress (small numbers), odd ones do not (a xorshift of the index).
    if (i / 512) % 2 == 0 {
        i % 1000
    } else {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn major_faults() -> u64 {
    // Field 12 of /proc/self/stat, after the parenthesised command name.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(9)?.parse().ok()).unwrap_or(0)
}

fn check(words: &[u64], pass: u32) -> Result<(), String> {
    for (i, w) in words.iter().enumerate() {
        if *w != word(i as u64) {
            return Err(format!("pass {pass}: word {i} (page {}) is {w:#x}, expected {:#x}", i / 512, word(i as u64)));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = match args.first().and_then(|a| a.parse().ok()) {
        Some(m) if m > 0 => m,
        _ => {
            eprintln!("usage: swap_workload MIB [--cgroup DIR] [--pause]");
            std::process::exit(2);
        }
    };
    if let Some(i) = args.iter().position(|a| a == "--cgroup") {
        let Some(dir) = args.get(i + 1) else {
            eprintln!("swap_workload: --cgroup needs a directory");
            std::process::exit(2);
        };
        if let Err(e) = std::fs::write(format!("{dir}/cgroup.procs"), std::process::id().to_string()) {
            eprintln!("swap_workload: cannot join cgroup {dir}: {e}");
            std::process::exit(2);
        }
    }
    let pause = args.iter().any(|a| a == "--pause");
    let started = Instant::now();
    let n = (mib << 20) / 8;
    let mut words = vec![0u64; n as usize];
    for (i, w) in words.iter_mut().enumerate() {
        *w = word(i as u64);
    }
    let mut result = check(&words, 1);
    if result.is_ok() && pause {
        println!("filled");
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }
    if result.is_ok() {
        result = check(&words, 2);
    }
    match result {
        Ok(()) => println!("ok {mib} MiB, {} major faults, {:.2} s", major_faults(), started.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("swap_workload: {e}");
            std::process::exit(1);
        }
    }
}
