//! An idle driver that sleeps through the executor's reactor ([`AsyncEndpoint::with_reactor`])
//! instead of a helper thread, on the loopback transport: tokio's reactor (`TokioReactor`) wakes
//! it, no thread is started, futures dropped while it sleeps hand the driving over, and a
//! reactor that refuses or fails makes an error or plain polling, never a hang or a panic.
//!
//! Loopback completions show up only after `async_reaps` polls, so with `spin: 0` the driver
//! sleeps (its idle check's timer, 100 ms, wakes it: loopback has no completion channel).
//! Every test of this file uses the reactor, so no helper thread of the async face may appear.

use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, Reactor, Readable, TokioReactor, block_on};
use rdmem_core::{Error, GlobalAddr, LoopbackOptions, LoopbackTransport, NodeId, Transport};

fn slow_transport(reaps: u32) -> LoopbackTransport {
    LoopbackTransport::with_options(&[1 << 20], LoopbackOptions { async_reaps: reaps, ..LoopbackOptions::default() })
}

fn sleepy() -> AsyncOptions {
    AsyncOptions { spin: Duration::ZERO, ..AsyncOptions::default() }
}

fn word(offset: u64) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset).unwrap()
}

/// Threads of this process named as the async face's helper thread.
fn helper_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "rdmem-aio-idle")
        .count()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_io().build().expect("tokio runtime")
}

#[test]
fn tokio_tasks_sleep_in_its_reactor_and_lose_nothing() {
    let transport = slow_transport(300);
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    for round in 0..3u64 {
        let ep = {
            let _in = rt.enter();
            Rc::new(AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor).unwrap())
        };
        assert_eq!(helper_threads(), 0, "with a reactor, no helper thread is started");
        local.block_on(&rt, async {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let ep = Rc::clone(&ep);
                    tokio::task::spawn_local(async move {
                        for _ in 0..10 {
                            ep.faa(word(0), 1).await.expect("FAA");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
            assert_eq!(ep.read_u64(word(0)).await.unwrap(), 80 * (round + 1), "lost a FAA");
        });
        assert!(ep.sleeps() > 0, "the driver never slept with spin 0 and slow completions");
        assert_eq!(ep.event_wakes(), 0, "loopback has no completion channel: only idle checks wake");
        assert_eq!(helper_threads(), 0);
    }
}

#[test]
fn a_future_dropped_while_it_sleeps_hands_the_driving_over() {
    let transport = slow_transport(300);
    let rt = runtime();
    let _in = rt.enter();
    let ep = AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor).unwrap();
    rt.block_on(async {
        ep.write_u64(word(8), 0).await.unwrap();
        for round in 1..=10u64 {
            // Poll one FAA until its driver sleeps, then drop it mid-flight.
            let mut first = Box::pin(ep.faa(word(8), 1));
            let slept = ep.sleeps();
            std::future::poll_fn(|cx| {
                if first.as_mut().poll(cx).is_ready() || ep.sleeps() > slept { Poll::Ready(()) } else { Poll::Pending }
            })
            .await;
            drop(first);
            // The next operation drives (the dropped one's reactor registration had its waker).
            // The dropped FAA was posted before its driver slept, so it took effect (loopback
            // applies an operation when it is posted).
            let old = ep.faa(word(8), 1).await.expect("FAA after the sleeping driver was dropped");
            assert_eq!(old, 2 * round - 1, "round {round}");
            assert_eq!(ep.read_u64(word(8)).await.unwrap(), 2 * round);
        }
    });
    assert!(ep.sleeps() >= 10);
}

#[test]
fn tokio_without_a_runtime_or_without_io_is_refused() {
    let transport = slow_transport(0);
    match AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor) {
        Err(Error::Config(msg)) => assert!(msg.contains("no tokio runtime"), "{msg}"),
        other => panic!("outside a runtime: {:?}", other.err()),
    }
    let no_io = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let _in = no_io.enter();
    match AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor) {
        Err(Error::Config(msg)) => assert!(msg.contains("enable_io"), "{msg}"),
        other => panic!("a runtime without IO: {:?}", other.err()),
    }
}

/// A reactor that refuses to watch anything.
struct Refusing;

impl Reactor for Refusing {
    fn watch(&self, _fd: OwnedFd) -> io::Result<Box<dyn Readable>> {
        Err(io::Error::other("this reactor watches nothing"))
    }
}

/// A reactor whose watchers fail every poll.
struct Failing;

struct FailingWatch(#[allow(dead_code)] OwnedFd);

impl Readable for FailingWatch {
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::other("broken reactor")))
    }
}

impl Reactor for Failing {
    fn watch(&self, fd: OwnedFd) -> io::Result<Box<dyn Readable>> {
        Ok(Box::new(FailingWatch(fd)))
    }
}

#[test]
fn a_reactor_that_refuses_or_fails_gives_an_error_or_polling_not_a_hang() {
    let transport = slow_transport(300);
    match AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &Refusing) {
        Err(Error::Config(msg)) => assert!(msg.contains("watches nothing"), "{msg}"),
        other => panic!("a refusing reactor: {:?}", other.err()),
    }
    // Failing watchers: the driver cannot sleep, so it keeps polling, and everything completes.
    let ep = AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &Failing).unwrap();
    block_on(async {
        for _ in 0..20 {
            ep.faa(word(16), 1).await.unwrap();
        }
        assert_eq!(ep.read_u64(word(16)).await.unwrap(), 20);
    });
    assert_eq!(ep.sleeps(), 0, "a driver whose reactor fails must not sleep");
}

#[test]
fn an_endpoint_that_outlives_its_runtime_polls_instead_of_sleeping() {
    let transport = slow_transport(300);
    let rt = runtime();
    let ep = {
        let _in = rt.enter();
        AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor).unwrap()
    };
    rt.block_on(async { ep.write_u64(word(24), 5).await.unwrap() });
    drop(rt);
    // The reactor is gone: its watchers fail, so the driver polls, and nothing hangs.
    let old = block_on(ep.faa(word(24), 1)).expect("FAA with the runtime gone");
    assert_eq!(old, 5);
    drop(ep); // deregistering from a reactor that is gone does not panic either
}

#[test]
fn futures_awaited_outside_the_endpoints_runtime_poll_instead_of_hanging() {
    let transport = slow_transport(300);
    let rt = runtime(); // alive, but not running while block_on below polls
    let ep = {
        let _in = rt.enter();
        AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor).unwrap()
    };
    // Nobody drives the runtime's reactor here: a driver asleep in it would never wake.
    block_on(async {
        for _ in 0..5 {
            ep.faa(word(32), 1).await.expect("FAA outside the runtime");
        }
        assert_eq!(ep.read_u64(word(32)).await.unwrap(), 5);
    });
    assert_eq!(ep.sleeps(), 0, "outside its runtime the driver must poll, not sleep");
}
