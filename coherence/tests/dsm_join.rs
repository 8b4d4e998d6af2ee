//! `Dsm::join` over RDMA keeps the typed cause of a failed connection (no device here, or no
//! memory node listening in the VM): a `DsmError::Transport` a program can match on, not a
//! string. The only test of this binary, because it sets the environment.
#![cfg(feature = "rdma")]

use rdmem_coherence::dsm::{Dsm, DsmError, DsmOptions};

#[test]
fn a_failed_connection_keeps_its_typed_cause() {
    // SAFETY: this binary has this one test, so no other thread reads the environment now.
    unsafe {
        std::env::set_var("RDMEM_MEMNODES", "127.0.0.1:1");
        std::env::set_var("RDMEM_TOKEN", "not-used-by-this-test-0123");
        std::env::remove_var("RDMEM_CONFIG");
    }
    match Dsm::join(DsmOptions::new(0, 1)) {
        Err(DsmError::Transport(e)) => {
            // No RDMA device (a setup error with its source), or nobody at port 1.
            assert!(matches!(e, rdmem_core::Error::Transport { .. } | rdmem_core::Error::Connect { .. }), "{e:?}");
        }
        Err(e) => panic!("not a transport error: {e:?}"),
        Ok(_) => panic!("joined a job on a memory node that does not exist"),
    }
}
