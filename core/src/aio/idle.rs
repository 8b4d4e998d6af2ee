//! How an idle driver sleeps: on a helper thread of the endpoint that waits on the completion
//! channel (the default), or through the executor's own reactor ([`Reactor`], given to
//! [`AsyncEndpoint::with_reactor`](super::AsyncEndpoint::with_reactor)), which then watches the
//! channel's descriptor and a timer for the idle checks, and no thread is started.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

use super::{IDLE_CHECK, Wait};
use crate::error::{Error, Result};

/// Readiness of one file descriptor, as an executor's reactor reports it (tokio's `AsyncFd`,
/// async-io's `Async`, ...). Built by a [`Reactor`].
pub trait Readable: Send {
    /// `Ready` when the descriptor has become readable since this last returned `Ready` (the
    /// readiness is consumed: the endpoint then reads until the descriptor would block, so a
    /// spurious `Ready` is harmless); otherwise `Pending`, with `cx`'s waker kept to be woken at
    /// the next readiness. An error makes the endpoint poll instead of sleeping.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// An executor's reactor as [`AsyncEndpoint::with_reactor`](super::AsyncEndpoint::with_reactor)
/// uses it: it watches descriptors for readability. Implement it for your runtime (a few lines:
/// see `TokioReactor`, behind this crate's `tokio` feature) or use the default helper thread
/// ([`AsyncEndpoint::new`](super::AsyncEndpoint::new)).
pub trait Reactor {
    /// Registers `fd` (non-blocking, owned by the returned watcher from now on) for read
    /// readiness. Called when the endpoint is made, in the executor's context if it needs one.
    fn watch(&self, fd: OwnedFd) -> io::Result<Box<dyn Readable>>;
}

/// The reactor of the tokio runtime the endpoint is made in (`tokio` feature): watches
/// through `tokio::io::unix::AsyncFd`. The runtime needs its IO driver (`enable_io` or
/// `enable_all`); made outside a runtime, or in one without IO, the endpoint is refused with
/// [`Error::Config`]. (Without IO, tokio itself panics; that panic is caught, but the panic hook
/// still prints tokio's message, and a program built with `panic = "abort"` aborts.)
///
/// Await the endpoint's futures inside that runtime. Polled elsewhere (another executor, or
/// that runtime not running on this thread), a driver cannot sleep in a reactor nobody drives:
/// it busy-polls instead, which works but costs a core.
#[cfg(feature = "tokio")]
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioReactor;

#[cfg(feature = "tokio")]
impl Reactor for TokioReactor {
    fn watch(&self, fd: OwnedFd) -> io::Result<Box<dyn Readable>> {
        use tokio::io::Interest;
        use tokio::io::unix::AsyncFd;

        /// The registration, and the runtime whose reactor it is in.
        struct Watch(AsyncFd<OwnedFd>, tokio::runtime::Id);
        impl Readable for Watch {
            fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                // Polled outside that runtime (another executor, or that runtime not running
                // here), its reactor may never wake this task: poll instead of sleeping.
                if tokio::runtime::Handle::try_current().map_or(true, |h| h.id() != self.1) {
                    return Poll::Ready(Err(io::Error::other(
                        "polled outside the tokio runtime the async endpoint was made in",
                    )));
                }
                match self.0.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        guard.clear_ready();
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }

        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(io::Error::other("no tokio runtime here: make the endpoint inside one"));
        };
        // tokio panics (instead of failing) in a runtime built without its IO driver.
        let registered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            #[allow(unsafe_code, reason = "tokio's registration asks the caller to own the descriptor")]
            // SAFETY: the watcher owns `fd`, which stays open, and the same, while it lives.
            unsafe {
                AsyncFd::register_with_interest(fd, Interest::READABLE)
            }
        }));
        match registered {
            Ok(Ok(fd)) => Ok(Box::new(Watch(fd, runtime.id()))),
            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
            Err(_) => {
                Err(io::Error::other("the tokio runtime has no IO driver: build it with enable_io or enable_all"))
            }
        }
    }
}

/// Where an idle driver sleeps.
pub(super) enum Idle {
    Thread(IdleThread),
    Reactor(RefCell<ReactorIdle>),
}

impl Idle {
    /// Sleeps until the armed completion queue signals or the idle check is due, when `waker`
    /// is woken. False when it could not sleep (readiness already there, consumed now: the
    /// caller looks at the completion queue again, and arms it again before it sleeps).
    pub(super) fn sleep(&self, waker: &Waker) -> bool {
        match self {
            Idle::Thread(thread) => {
                thread.sleep(waker.clone());
                true
            }
            Idle::Reactor(reactor) => reactor.borrow_mut().sleep(waker),
        }
    }

    /// The driver runs again after a sleep: a reactor's readiness is consumed (the helper
    /// thread consumed its event itself).
    pub(super) fn woken(&self, waker: &Waker) {
        if let Idle::Reactor(reactor) = self {
            reactor.borrow_mut().woken(&mut Context::from_waker(waker));
        }
    }

    /// Sleeps that a completion event ended (the others ended at an idle check).
    pub(super) fn event_wakes(&self) -> u64 {
        match self {
            Idle::Thread(thread) => thread.shared.event_wakes.load(Ordering::Relaxed),
            Idle::Reactor(reactor) => reactor.borrow().event_wakes,
        }
    }
}

/// The helper thread that sleeps on the completion channel for an idle driver.
pub(super) struct IdleThread {
    shared: Arc<IdleShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct IdleShared {
    state: Mutex<IdleState>,
    ready: Condvar,
    event_wakes: AtomicU64,
}

#[derive(Default)]
struct IdleState {
    waker: Option<Waker>,
    stop: bool,
}

impl IdleThread {
    pub(super) fn start(mut waiter: impl Wait) -> Result<IdleThread> {
        let shared = Arc::new(IdleShared::default());
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("rdmem-aio-idle".into())
            .spawn(move || {
                loop {
                    {
                        let mut state = theirs.state.lock().unwrap_or_else(|p| p.into_inner());
                        while state.waker.is_none() && !state.stop {
                            state = theirs.ready.wait(state).unwrap_or_else(|p| p.into_inner());
                        }
                        if state.stop {
                            return;
                        }
                    }
                    if waiter.wait(IDLE_CHECK) {
                        theirs.event_wakes.fetch_add(1, Ordering::Relaxed);
                    }
                    // The newest sleeper: a driver may have handed over while this waited.
                    let waker = theirs.state.lock().unwrap_or_else(|p| p.into_inner()).waker.take();
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
            })
            .map_err(|e| Error::transport("starting the async endpoint's helper thread", e))?;
        Ok(IdleThread { shared, thread: Some(thread) })
    }

    fn sleep(&self, waker: Waker) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).waker = Some(waker);
        self.shared.ready.notify_one();
    }
}

impl Drop for IdleThread {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sleeping through the executor's reactor: it watches the completion channel (where the
/// transport has one) and a timer armed for the idle check.
pub(super) struct ReactorIdle {
    // Declared (so dropped) before the descriptors they watch are closed.
    channel: Option<Box<dyn Readable>>,
    timer_watch: Box<dyn Readable>,
    timer: OwnedFd,
    waiter: Box<dyn Wait>,
    event_wakes: u64,
    /// A watcher's failure was logged (once per endpoint).
    warned: bool,
}

impl ReactorIdle {
    pub(super) fn new(waiter: impl Wait, reactor: &dyn Reactor) -> Result<ReactorIdle> {
        let refused = |what: &str, e: io::Error| Error::Config(format!("the reactor cannot watch {what}: {e}"));
        let channel = match waiter.fd() {
            Some(fd) => {
                let fd =
                    fd.try_clone_to_owned().map_err(|e| Error::transport("duplicating the completion channel", e))?;
                Some(reactor.watch(fd).map_err(|e| refused("the completion channel", e))?)
            }
            None => None,
        };
        let timer =
            rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)
                .map_err(|e| Error::transport("creating the idle check's timer", io::Error::from(e)))?;
        let theirs = timer.try_clone().map_err(|e| Error::transport("duplicating the idle check's timer", e))?;
        let timer_watch = reactor.watch(theirs).map_err(|e| refused("a timer", e))?;
        Ok(ReactorIdle { channel, timer_watch, timer, waiter: Box::new(waiter), event_wakes: 0, warned: false })
    }

    fn sleep(&mut self, waker: &Waker) -> bool {
        if !self.set_timer(IDLE_CHECK) {
            return false; // no idle check: keep polling
        }
        let mut cx = Context::from_waker(waker);
        self.consume(&mut cx).is_none()
    }

    /// After a sleep: takes the readiness that ended it (counting a completion event the
    /// reactor reported) and disarms the idle check.
    fn woken(&mut self, cx: &mut Context<'_>) {
        if self.consume(cx) == Some(true) {
            self.event_wakes += 1;
        }
        self.set_timer(Duration::ZERO);
    }

    /// Arms the timer to expire once after `after` (zero disarms it); false if that failed.
    fn set_timer(&mut self, after: Duration) -> bool {
        let at = Timespec { tv_sec: after.as_secs() as _, tv_nsec: after.subsec_nanos() as _ };
        let once = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: at };
        rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &once).is_ok()
    }

    /// Polls both watchers (registering `cx`'s waker); if either was ready (or failed), reads
    /// what is there (completion events, timer expirations) until it would block. `None` when
    /// neither was ready; otherwise whether the reactor reported the channel ready with a
    /// completion event there.
    fn consume(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let channel = self.channel.as_mut().map_or(Poll::Pending, |c| c.poll_readable(cx));
        let timer = self.timer_watch.poll_readable(cx);
        if channel.is_pending() && timer.is_pending() {
            return None;
        }
        for failed in [&channel, &timer] {
            if let Poll::Ready(Err(e)) = failed {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!("async endpoint: the reactor failed ({e}); the driver polls instead of sleeping");
                }
            }
        }
        let mut events = 0;
        while self.waiter.wait(Duration::ZERO) {
            events += 1;
        }
        let mut expirations = [0u8; 8];
        let _ = rustix::io::read(self.timer.as_fd(), &mut expirations); // EAGAIN when not expired
        Some(matches!(channel, Poll::Ready(Ok(()))) && events > 0)
    }
}
