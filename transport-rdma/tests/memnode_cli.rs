//! `rdmem-memnode`'s refusals that need no RDMA device (they come before it is opened): a node
//! without a token, a pool size that is not whole pages, a pool larger than the free memory.

use std::process::{Command, Output};

fn memnode(args: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rdmem-memnode"));
    command.args(["--listen", "127.0.0.1:0"]).args(args).env_remove("RDMEM_TOKEN").env_remove("RDMEM_TOKEN_FILE");
    if let Some(token) = token {
        command.env("RDMEM_TOKEN", token);
    }
    command.output().expect("start rdmem-memnode")
}

fn refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
}

#[test]
fn a_node_without_a_token_refuses_to_start_unless_told_it_is_insecure() {
    refused(&memnode(&["--pool-size", "2M"], None), "--insecure-no-token");
    refused(&memnode(&["--pool-size", "2M", "--insecure-no-token"], Some("secret")), "drop one of them");
}

#[test]
fn a_pool_size_that_is_not_whole_pages_is_refused_not_rounded() {
    refused(&memnode(&["--pool-size", "1000", "--insecure-no-token"], None), "not a whole number of Huge2M pages");
    refused(&memnode(&["--pool-size", "1000", "--page-size", "none"], Some("t")), "e.g. 4096 bytes");
}

#[test]
fn a_pool_larger_than_free_memory_is_refused() {
    // 64 TiB: more than any machine this runs on has free.
    refused(&memnode(&["--pool-size", "65536G", "--page-size", "none"], Some("t")), "more than this machine has free");
}
