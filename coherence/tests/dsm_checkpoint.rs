//! `Dsm::checkpoint` on the loopback transport: every rank gets the same sequence number, even
//! when the memory nodes take longer than the barrier timeout to write their snapshots.

use std::sync::Arc;
use std::time::Duration;

use rdmem_coherence::dsm::{Dsm, DsmOptions};
use rdmem_core::{Checkpoint, LoopbackEndpoint, LoopbackTransport, NodeId, NodeInfo, Result, Transport};

/// Loopback memory nodes whose snapshots take `delay` each (a big pool on a slow disk).
struct SlowSnapshots {
    inner: LoopbackTransport,
    delay: Duration,
}

impl Transport for SlowSnapshots {
    type Endpoint = LoopbackEndpoint;

    fn endpoint(&self) -> Result<LoopbackEndpoint> {
        self.inner.endpoint()
    }

    fn nodes(&self) -> &[NodeInfo] {
        self.inner.nodes()
    }

    fn checkpoint(&self, node: NodeId, seq: Option<u64>, full: bool) -> Result<Checkpoint> {
        std::thread::sleep(self.delay);
        self.inner.checkpoint(node, seq, full)
    }

    fn newest_checkpoint(&self, node: NodeId) -> Result<u64> {
        self.inner.newest_checkpoint(node)
    }
}

#[test]
fn every_rank_gets_the_number_even_when_snapshots_outlast_the_barrier_timeout() {
    let transport = Arc::new(SlowSnapshots {
        inner: LoopbackTransport::new(&[8 << 20, 8 << 20]),
        delay: Duration::from_millis(1500),
    });
    let seqs: Vec<u64> = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                let transport = Arc::clone(&transport);
                s.spawn(move || {
                    let options =
                        DsmOptions { barrier_timeout: Duration::from_millis(500), ..DsmOptions::new(rank, 3) };
                    let dsm = Dsm::join_with(transport, options).unwrap();
                    let word = dsm.alloc(8).unwrap();
                    let mut seqs = Vec::new();
                    for round in 0..2u64 {
                        if dsm.rank() == 0 {
                            dsm.set(word, &round).unwrap();
                        }
                        seqs.push(dsm.checkpoint().unwrap());
                    }
                    dsm.leave().unwrap();
                    seqs
                })
            })
            .collect();
        ranks.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(seqs, vec![1, 2, 1, 2, 1, 2], "rank by rank");
    assert_eq!(transport.inner.newest_checkpoint(NodeId(1)).unwrap(), 2);
}

#[test]
fn a_thread_holding_a_lock_cannot_checkpoint() {
    let transport = Arc::new(LoopbackTransport::new(&[8 << 20]));
    let dsm = Dsm::join_with(transport, DsmOptions::new(0, 1)).unwrap();
    dsm.lock(3).unwrap();
    let e = dsm.checkpoint().unwrap_err();
    assert!(e.to_string().contains("holds lock 3"), "{e}");
    dsm.unlock(3).unwrap();
    assert_eq!(dsm.checkpoint().unwrap(), 1);
    dsm.leave().unwrap();
}
