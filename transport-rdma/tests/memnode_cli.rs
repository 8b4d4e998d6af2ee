//! `rdmem-memnode`'s refusals that need no RDMA device (they come before it is opened): a node
//! without a token, a pool size that is not whole pages, a pool larger than the free memory, bad
//! tenants.

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
    // 1: refused by the node; 2: a flag clap could not parse.
    assert!(matches!(out.status.code(), Some(1 | 2)), "{:?}: {stderr}", out.status);
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

#[test]
fn bad_tenants_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.token");
    std::fs::write(&good, "a-tenant-token-of-twenty-bytes\n").unwrap();
    let short = dir.path().join("short.token");
    std::fs::write(&short, "short\n").unwrap();
    let good = good.display().to_string();
    let short = short.display().to_string();
    let tenant = |spec: String| vec!["--tenant".to_owned(), spec];
    let run =
        |args: Vec<String>, token: Option<&str>| memnode(&args.iter().map(String::as_str).collect::<Vec<_>>(), token);
    refused(&run(tenant("alice".into()), None), "NAME:SIZE:TOKEN_FILE");
    refused(&run(tenant("alice:1G".into()), None), "NAME:SIZE:TOKEN_FILE");
    refused(&run(tenant(format!("al ice:2M:{good}")), None), "tenant name");
    refused(&run(tenant(format!("alice:12X:{good}")), None), "tenant alice");
    refused(&run(tenant("alice:2M:/nonexistent/token".into()), None), "/nonexistent/token");
    refused(&run(tenant(format!("alice:2M:{short}")), None), "at least 16");
    refused(&run(tenant(format!("alice:1000:{good}")), None), "not a whole number");
    let twice = [tenant(format!("alice:2M:{good}")), tenant(format!("alice:2M:{good}"))].concat();
    refused(&run(twice, None), "given twice");
    let named_default = tenant(format!("default:2M:{good}"));
    refused(&run(named_default, Some("the-default-tenants-token")), "given twice");
    // Without a token of its own the node has no default pool, so a pool size for it is a
    // mistake; and checkpoints are of the default pool.
    let sized = [tenant(format!("alice:2M:{good}")), vec!["--pool-size".into(), "2M".into()]].concat();
    refused(&run(sized, None), "drop --pool-size");
    let open = [tenant(format!("alice:2M:{good}")), vec!["--insecure-no-token".into()]].concat();
    refused(&run(open, None), "open to anyone");
    let checkpointed = [tenant(format!("alice:2M:{good}")), vec!["--checkpoint-dir".into(), "/tmp/x".into()]].concat();
    refused(&run(checkpointed, None), "default tenant's pool");
}
