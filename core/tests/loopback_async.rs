//! The loopback transport's async face against the shared conformance checks, plus its fault
//! injection and several threads each with their own async endpoint.

use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, block_on};
use rdmem_core::conformance::{self, SCRATCH_BYTES};
use rdmem_core::{Error, GlobalAddr, LoopbackOptions, LoopbackTransport, NodeId, Transport};

fn scratch(node: u16) -> GlobalAddr {
    GlobalAddr::new(NodeId(node), SCRATCH_BYTES).unwrap()
}

#[test]
fn async_face_has_the_sync_semantics() {
    conformance::async_semantics(&LoopbackTransport::new(&[1 << 20, 1 << 16]), scratch(0));
}

#[test]
fn thousands_of_futures_in_flight_from_one_thread() {
    conformance::async_many_in_flight(&LoopbackTransport::new(&[1 << 20]), scratch(0), 5000);
}

#[test]
fn dropped_futures_lose_no_slot_and_touch_no_memory() {
    conformance::async_cancellation(&LoopbackTransport::new(&[1 << 20]), scratch(0), 60);
}

#[test]
fn threads_with_their_own_async_endpoints_lose_no_fetch_and_add() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let word = scratch(0);
    for round in 0..20 {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
                    let futs = (0..200).map(|_| Box::pin(ep.faa(word, 1)) as _).collect();
                    for old in block_on(conformance::join_all::<rdmem_core::Result<u64>>(futs)) {
                        old.unwrap();
                    }
                });
            }
        });
        let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
        assert_eq!(block_on(ep.read_u64(word)).unwrap(), (round + 1) * 800, "round {round}");
    }
}

#[test]
fn a_failed_operation_breaks_its_node_for_later_ones() {
    let transport =
        LoopbackTransport::with_options(&[1 << 20], LoopbackOptions { fail_every: Some(3), ..Default::default() });
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    let word = scratch(0);
    block_on(async {
        ep.faa(word, 1).await.unwrap();
        ep.faa(word, 1).await.unwrap();
        assert!(matches!(ep.faa(word, 1).await, Err(Error::Injected { .. })));
        assert!(matches!(ep.faa(word, 1).await, Err(Error::Broken { node: NodeId(0) })));
    });
}

#[test]
fn a_downed_node_fails_its_operations_and_leaves_the_others() {
    let transport = LoopbackTransport::new(&[1 << 20, 1 << 20]);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    transport.set_node_down(NodeId(1), true);
    block_on(async {
        assert!(matches!(ep.faa(scratch(1), 1).await, Err(Error::NodeGone { .. })));
        assert_eq!(ep.faa(scratch(0), 1).await.unwrap(), 0, "node 0 still serves");
    });
}

#[test]
fn bad_options_are_refused() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    for options in [
        rdmem_core::aio::AsyncOptions { slots: 0, ..Default::default() },
        rdmem_core::aio::AsyncOptions { slots: 129, ..Default::default() },
        rdmem_core::aio::AsyncOptions { slot_bytes: 4, ..Default::default() },
    ] {
        let r = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options.clone());
        assert!(matches!(r, Err(Error::Config(_))), "{options:?}");
    }
}

/// Completions that show only a few reaps after their doorbell, as on a device.
fn delayed(reaps: u32) -> LoopbackTransport {
    LoopbackTransport::with_options(&[1 << 20], LoopbackOptions { async_reaps: reaps, ..Default::default() })
}

/// A task as an executor keeps it: a waker that remembers it was woken.
struct Task(std::sync::atomic::AtomicBool);

impl std::task::Wake for Task {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Task {
    fn new() -> (std::sync::Arc<Task>, std::task::Waker) {
        let task = std::sync::Arc::new(Task(std::sync::atomic::AtomicBool::new(false)));
        let waker = std::task::Waker::from(std::sync::Arc::clone(&task));
        (task, waker)
    }

    fn poll<F: std::future::Future>(waker: &std::task::Waker, f: &mut std::pin::Pin<Box<F>>) -> Option<F::Output> {
        match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    /// Polls `f` only after a wake, as an executor would, at most `n` times: its output, or
    /// `None` if it stalled (pending, and nobody woke the task).
    fn run<F: std::future::Future>(
        self: &std::sync::Arc<Self>,
        waker: &std::task::Waker,
        f: &mut std::pin::Pin<Box<F>>,
        n: usize,
    ) -> Option<F::Output> {
        for _ in 0..n {
            if !self.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            if let Some(v) = Task::poll(waker, f) {
                return Some(v);
            }
        }
        None
    }
}

/// Polls `f` with a waker that does nothing, at most `n` times; its output if it finished.
fn poll_n<F: std::future::Future>(f: &mut std::pin::Pin<Box<F>>, n: usize) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    (0..n).find_map(|_| match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    })
}

#[test]
fn the_same_semantics_with_completions_that_take_a_while() {
    conformance::async_semantics(&delayed(7), scratch(0));
    conformance::async_many_in_flight(&delayed(3), scratch(0), 3000);
    conformance::async_cancellation(&delayed(5), scratch(0), 40);
}

#[test]
fn a_dropped_driver_hands_over_to_a_future_waiting_for_a_slot() {
    let transport = delayed(1000);
    let options = rdmem_core::aio::AsyncOptions { slots: 1, ..Default::default() };
    let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options).unwrap();
    let mut a = Box::pin(ep.faa(scratch(0), 1));
    assert!(poll_n(&mut a, 5).is_none(), "in flight, and driving");
    let (task, waker) = Task::new();
    let mut b = Box::pin(ep.faa(scratch(0), 1));
    assert!(Task::poll(&waker, &mut b).is_none(), "waiting for the one slot");
    drop(a); // its slot stays in flight as an orphan; only B is left to reap it
    let got = task.run(&waker, &mut b, 100_000).expect("B was woken and took the driving over");
    assert!(got.unwrap() <= 1);
}

#[test]
fn a_driver_its_task_stops_polling_does_not_stall_the_others() {
    let transport = delayed(1000);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    // One task: A and B. A drives, then the task keeps A without polling it again (as after a
    // select that returned the other branch) and awaits B.
    let (task, waker) = Task::new();
    let mut a = Box::pin(ep.faa(scratch(0), 1));
    for _ in 0..3 {
        assert!(Task::poll(&waker, &mut a).is_none(), "in flight, and driving");
    }
    let mut b = Box::pin(ep.faa(scratch(0).checked_add(8).unwrap(), 1));
    task.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = task.run(&waker, &mut b, 100_000).expect("B finished although the task never polled A again");
    assert_eq!(got.unwrap(), 0);
    assert_eq!(poll_n(&mut a, 100_000).expect("A finishes too").unwrap(), 0);
}

#[test]
fn an_unposted_operation_of_a_dropped_future_is_posted_at_once() {
    let transport = delayed(0);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    let mut a = Box::pin(ep.write_u64(scratch(0), 7));
    assert!(poll_n(&mut a, 1).is_none(), "queued, yielding before its doorbell");
    drop(a);
    // Posted by the drop, so another endpoint sees it without this one doing anything else.
    let other = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    assert_eq!(block_on(other.read_u64(scratch(0))).unwrap(), 7);
}

/// A waker that counts its wakes.
struct Counter(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Counter {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn futures_polled_in_one_pass_share_one_doorbell() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    for (coalesce, doorbells) in [(true, 1), (false, 16)] {
        let options = AsyncOptions { coalesce, ..AsyncOptions::default() };
        let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options).unwrap();
        let futs = (0..16).map(|k| Box::pin(ep.faa(scratch(0).checked_add(8 * k).unwrap(), 1)) as _).collect();
        for old in block_on(conformance::join_all::<rdmem_core::Result<u64>>(futs)) {
            old.unwrap();
        }
        assert_eq!(ep.doorbells(), doorbells, "coalesce: {coalesce}");
    }
}

#[test]
fn a_lone_operation_wakes_its_task_only_to_yield() {
    // The driver sees its own completion while it polls: being woken for it too would cost an
    // executor pass per operation.
    let transport = LoopbackTransport::new(&[1 << 20]);
    for (coalesce, wakes) in [(true, 1), (false, 0)] {
        let options = AsyncOptions { coalesce, ..AsyncOptions::default() };
        let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options).unwrap();
        for round in 0..3 {
            let counter = std::sync::Arc::new(Counter(std::sync::atomic::AtomicUsize::new(0)));
            let waker = std::task::Waker::from(std::sync::Arc::clone(&counter));
            let mut f = Box::pin(ep.faa(scratch(0), 1));
            let polls = (1..=4).find(|_| Task::poll(&waker, &mut f).is_some()).expect("done within 4 polls");
            assert_eq!(polls, 1 + wakes, "coalesce: {coalesce}, round {round}");
            assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), wakes, "coalesce: {coalesce}");
        }
    }
}

#[test]
fn lone_operations_stop_yielding_and_bursts_coalesce_again() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    let counter = std::sync::Arc::new(Counter(std::sync::atomic::AtomicUsize::new(0)));
    let waker = std::task::Waker::from(std::sync::Arc::clone(&counter));
    let wakes = || counter.0.load(std::sync::atomic::Ordering::SeqCst);
    let lone = |n: usize| {
        for _ in 0..n {
            let mut f = Box::pin(ep.faa(scratch(0), 1));
            (1..=4).find(|_| Task::poll(&waker, &mut f).is_some()).expect("done within 4 polls");
        }
    };
    // One operation at a time: at first each yields once (its task is woken to post it)...
    lone(16);
    assert_eq!(wakes(), 16);
    // ...then yields that never gathered anyone are skipped, but for a probe now and then.
    lone(256);
    let probes = wakes() - 16;
    assert!((2..=20).contains(&probes), "{probes} yields in 256 lone operations (about 8 expected)");
    // A burst finds company at a probe, and bursts share one doorbell again from then on.
    let burst = || {
        let futs = (0..16).map(|k| Box::pin(ep.faa(scratch(0).checked_add(8 * k).unwrap(), 1)) as _).collect();
        for old in block_on(conformance::join_all::<rdmem_core::Result<u64>>(futs)) {
            old.unwrap();
        }
    };
    let shared = (0..20).find(|_| {
        let before = ep.doorbells();
        burst();
        ep.doorbells() - before == 1
    });
    assert!(shared.is_some(), "20 bursts of 16 and none shared a doorbell");
    let before = ep.doorbells();
    burst();
    assert_eq!(ep.doorbells() - before, 1, "the burst after it coalesces too");
}

#[test]
fn a_lone_operation_still_in_flight_after_its_first_poll_finishes_later() {
    // Without the coalescing yield, a lone operation is posted and polled for in its first poll
    // (Submit::run_lone); when its completion is slower than that, it waits like any other.
    let transport = delayed(1000);
    let options = AsyncOptions { coalesce: false, slots: 1, ..AsyncOptions::default() };
    let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options).unwrap();
    let mut a = Box::pin(ep.faa(scratch(0), 5));
    assert!(poll_n(&mut a, 1).is_none(), "posted, and still in flight");
    assert_eq!(poll_n(&mut a, 100_000).expect("it finishes").unwrap(), 0);
    // Dropped in flight: its one slot comes back, the FAA took effect once.
    let mut b = Box::pin(ep.faa(scratch(0), 5));
    assert!(poll_n(&mut b, 1).is_none());
    drop(b);
    assert_eq!(block_on(ep.read_u64(scratch(0))).unwrap(), 10);
}
