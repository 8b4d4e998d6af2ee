//! Heartbeats: how a participant shows that it is alive without anyone's CPU on the memory
//! node. A [`Heartbeat`] is a thread that adds 1 to a remote word every `interval`; someone who
//! reads the word twice and sees it move knows its owner was alive in between
//! ([`beats_within`]). A word that stays put for many intervals belongs to a participant that
//! died, hung, or was cut off: the layers above take over what it held (the allocator's dead
//! clients, the DSM's dead jobs).
//!
//! Liveness judged this way is a lease: a participant stalled for longer than the window the
//! observer waits is taken for dead. Observers wait several intervals for that reason.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::addr::GlobalAddr;
use crate::endpoint::{Endpoint, Transport};
use crate::error::Result;

/// A background thread beating a remote word until dropped (or [`Heartbeat::stop`]ped).
pub struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating `word` (an 8-aligned word; fetch-and-add 1) every `interval`, through an
    /// endpoint of its own. The first beat happens at once, before this returns. A failed beat
    /// is logged and retried at the next interval on a new endpoint.
    pub fn start<T: Transport + 'static>(transport: Arc<T>, word: GlobalAddr, interval: Duration) -> Result<Self> {
        let mut ep = transport.endpoint()?;
        ep.faa(word, 1)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("heartbeat {word}"))
            .spawn(move || {
                let mut ep = Some(ep);
                let (lock, wake) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let deadline = Instant::now() + interval;
                    while !*stopped {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        stopped = wake.wait_timeout(stopped, left).unwrap_or_else(|p| p.into_inner()).0;
                    }
                    if *stopped {
                        return;
                    }
                    let beat = match ep.take() {
                        Some(e) => Ok(e),
                        None => transport.endpoint(),
                    }
                    .and_then(|mut e| e.faa(word, 1).map(|_| e));
                    match beat {
                        Ok(e) => ep = Some(e),
                        Err(e) => tracing::warn!("heartbeat on {word} failed ({e}); retrying in {interval:?}"),
                    }
                }
            })
            .map_err(|e| crate::Error::Config(format!("cannot start a heartbeat thread: {e}")))?;
        Ok(Heartbeat { stop, thread: Some(thread) })
    }

    /// Stops beating (the word stays where it is) and waits for the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Whether the heartbeat word `word` moves within `window`: reads it, then polls (every
/// `window / 64`, at least 1 ms) until it changes (`Ok(true)`, as soon as it does) or the
/// window has passed with no change (`Ok(false)`).
pub fn beats_within<E: Endpoint>(ep: &mut E, word: GlobalAddr, window: Duration) -> Result<bool> {
    let first = ep.read_u64(word)?;
    let started = Instant::now();
    let pause = (window / 64).max(Duration::from_millis(1));
    while started.elapsed() < window {
        std::thread::sleep(pause);
        if ep.read_u64(word)? != first {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoopbackTransport, NodeId};

    #[test]
    fn a_heartbeat_moves_its_word_until_stopped() {
        let transport = Arc::new(LoopbackTransport::new(&[1 << 16]));
        let word = GlobalAddr::new(NodeId(0), 64).unwrap();
        let mut ep = transport.endpoint().unwrap();
        let beat = Heartbeat::start(Arc::clone(&transport), word, Duration::from_millis(1)).unwrap();
        assert!(ep.read_u64(word).unwrap() >= 1, "the first beat comes before start returns");
        // A live heartbeat is seen to move (the window is a bound no slow machine reaches).
        assert!(beats_within(&mut ep, word, Duration::from_secs(300)).unwrap());
        beat.stop();
        let after = ep.read_u64(word).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ep.read_u64(word).unwrap(), after, "a stopped heartbeat stays put");
        assert!(!beats_within(&mut ep, word, Duration::from_millis(20)).unwrap());
    }
}
