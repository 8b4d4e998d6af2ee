//! The fair reader-writer lock on the loopback transport: exact counters, untorn records,
//! FIFO order checked from a recorded history, sharing, resets past the threshold, leases.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdmem_coherence::sync::rwlock::{Mode, RwWord, Section, check_history};
use rdmem_coherence::{LockError, RwLock};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};

const LEASE: Duration = Duration::from_secs(2);

fn at(offset: u64) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset).unwrap()
}

/// Runs `threads` threads of `rounds` acquisitions each; thread `t`'s acquisition `i` is a
/// write when `(t * 7 + i * 3) % 10 < 10 - read_tenths`. Writers bump a counter with a READ then
/// a WRITE and rewrite a 4-word record; readers check the record is not torn. Returns the history.
fn run(transport: &LoopbackTransport, lock: RwLock, threads: u64, rounds: u64, read_tenths: u64) -> Vec<Section> {
    let (clock, counter, record) = (at(1024), at(2048), at(3072));
    let histories: Vec<Vec<Section>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut ep = transport.endpoint().unwrap();
                    let mut history = Vec::new();
                    for i in 0..rounds {
                        let mode = if (t * 7 + i * 3) % 10 < 10 - read_tenths { Mode::Write } else { Mode::Read };
                        let mut g = lock.lock(&mut ep, mode).unwrap();
                        let ticket = g.ticket();
                        let ep = g.endpoint();
                        let enter = ep.faa(clock, 1).unwrap();
                        // Widens the section so that a protocol bug shows up as an overlap.
                        std::thread::yield_now();
                        if mode == Mode::Write {
                            let n = ep.read_u64(counter).unwrap();
                            ep.write_u64(counter, n + 1).unwrap();
                            for w in 0..4 {
                                ep.write_u64(record.checked_add(8 * w).unwrap(), n + 1).unwrap();
                            }
                        } else {
                            let mut words = [0u8; 32];
                            ep.read(record, &mut words).unwrap();
                            assert!(words.chunks(8).all(|w| w == &words[..8]), "torn record: {words:?}");
                        }
                        let exit = ep.faa(clock, 1).unwrap();
                        g.unlock().unwrap();
                        history.push(Section {
                            mode,
                            generation: ticket.generation,
                            position: ticket.position(),
                            enter,
                            exit,
                        });
                    }
                    history
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let history: Vec<Section> = histories.into_iter().flatten().collect();
    let writes = history.iter().filter(|e| e.mode == Mode::Write).count() as u64;
    assert_eq!(transport.endpoint().unwrap().read_u64(counter).unwrap(), writes, "lost increments");
    history
}

fn check_fifo(history: &[Section]) {
    if let Err(e) = check_history(history) {
        panic!("{e}");
    }
}

#[test]
fn mixed_readers_and_writers_keep_exact_counters_fifo_order_and_untorn_records() {
    for read_tenths in [0, 5, 9] {
        let transport = LoopbackTransport::new(&[1 << 20]);
        let lock = RwLock::new(at(4096), LEASE).unwrap();
        let history = run(&transport, lock, 4, 150, read_tenths);
        check_fifo(&history);
    }
}

#[test]
fn fifo_holds_across_many_resets_past_the_threshold() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let lock = RwLock::new(at(4096), LEASE).unwrap().with_reset_threshold(8);
    let history = run(&transport, lock, 4, 100, 5);
    check_fifo(&history);
    let generations: std::collections::HashSet<u8> = history.iter().map(|e| e.generation).collect();
    assert!(generations.len() >= 20, "only {} generations for 400 tickets at threshold 8", generations.len());
    let word = RwWord(transport.endpoint().unwrap().read_u64(at(4096)).unwrap());
    assert!(word.is_idle(), "idle at the end: {word:?}");
    assert!(word.max_x() <= 8 + 4 && word.max_s() <= 8 + 4, "a counter ran past threshold + participants");
}

#[test]
fn readers_share_and_a_writer_waits_for_them_then_readers_wait_for_the_writer() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let word = at(4096);
    let lock = RwLock::new(word, LEASE).unwrap();
    let (mut ep1, mut ep2) = (transport.endpoint().unwrap(), transport.endpoint().unwrap());
    let peek = || RwWord(transport.endpoint().unwrap().read_u64(word).unwrap());
    let r1 = lock.read(&mut ep1).unwrap();
    let r2 = lock.read(&mut ep2).unwrap(); // would hang if readers did not share
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut ep = transport.endpoint().unwrap();
            let g = lock.write(&mut ep).unwrap();
            let seen = peek();
            g.unlock().unwrap();
            seen
        });
        // The writer has its ticket once max_x moved; it must still be waiting.
        while peek().max_x() == 0 {
            std::thread::yield_now();
        }
        assert_eq!(peek().n_s(), 0, "no reader released yet");
        assert!(!writer.is_finished());
        // A reader arriving after the writer queues behind it (FIFO), so it must wait too.
        let late_reader = s.spawn(|| {
            let mut ep = transport.endpoint().unwrap();
            let g = lock.read(&mut ep).unwrap();
            let seen = peek();
            g.unlock().unwrap();
            seen
        });
        while peek().max_s() < 3 {
            std::thread::yield_now();
        }
        assert!(!late_reader.is_finished() && !writer.is_finished());
        r1.unlock().unwrap();
        r2.unlock().unwrap();
        let in_writer = writer.join().unwrap();
        assert_eq!(in_writer.n_s(), 2, "the writer entered after both readers released");
        let in_reader = late_reader.join().unwrap();
        assert_eq!(in_reader.n_x(), 1, "the late reader entered after the writer released");
    });
    assert!(peek().is_idle());
}

#[test]
fn a_ticket_past_the_threshold_is_given_back_and_taken_again_in_the_next_generation() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let word = at(4096);
    let lock = RwLock::new(word, LEASE).unwrap().with_reset_threshold(2);
    let mut ep = transport.endpoint().unwrap();
    let peek = |ep: &mut rdmem_core::LoopbackEndpoint| RwWord(ep.read_u64(word).unwrap());
    lock.write(&mut ep).unwrap().unlock().unwrap();
    let w = peek(&mut ep);
    assert_eq!((w.generation(), w.max_x(), w.n_x()), (0, 1, 1));
    // The second writer ticket brings max_x to the threshold; its release leaves the word idle
    // past it, so the release itself resets the word to the next generation.
    lock.write(&mut ep).unwrap().unlock().unwrap();
    assert_eq!(peek(&mut ep), RwWord(1 << 56), "reset to generation 1 with zero counters");
    // Generation 1: one writer done, one holding (max_x reaches 2); a newcomer's ticket is then
    // past the threshold: it gives it back and waits for the reset, never entering.
    lock.write(&mut ep).unwrap().unlock().unwrap();
    let mut ep2 = transport.endpoint().unwrap();
    let holder = lock.write(&mut ep2).unwrap();
    assert_eq!(holder.ticket().position(), 1);
    std::thread::scope(|s| {
        let newcomer = s.spawn(|| {
            let mut ep = transport.endpoint().unwrap();
            let g = lock.read(&mut ep).unwrap();
            let t = g.ticket();
            g.unlock().unwrap();
            t
        });
        holder.unlock().unwrap();
        let t = newcomer.join().unwrap();
        assert_eq!((t.generation, t.position()), (2, 0), "it entered with the first ticket of the next generation");
    });
    let w = peek(&mut ep);
    assert_eq!((w.generation(), w.max_s(), w.n_s(), w.max_x()), (2, 1, 1, 0), "{w:?}");
}

#[test]
fn a_crashed_holder_delays_others_by_about_a_lease_and_its_late_release_is_harmless() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let lease = Duration::from_millis(200);
    let word = at(4096);
    let lock = RwLock::new(word, lease).unwrap();
    let mut slow_ep = transport.endpoint().unwrap();
    let slow = lock.write(&mut slow_ep).unwrap(); // stalls past its lease
    let mut ep = transport.endpoint().unwrap();
    let started = Instant::now();
    let g = lock.read(&mut ep).unwrap();
    let waited = started.elapsed();
    assert!(waited >= lease, "entered after {waited:?}, before the lease ran out");
    // A bound no slow machine reaches: without the takeover the wait would never end.
    assert!(waited < Duration::from_secs(300), "took {waited:?}: the lease did not end the wait");
    assert_eq!(g.ticket().generation, 1, "the reset moved to the next generation");
    // The stalled writer's release comes late: detected, and it changes nothing.
    let before = transport.endpoint().unwrap().read_u64(word).unwrap();
    let err = slow.unlock().unwrap_err();
    assert!(matches!(err, LockError::LeaseLost { .. }), "{err}");
    assert_eq!(transport.endpoint().unwrap().read_u64(word).unwrap(), before, "the late release changed the word");
    g.unlock().unwrap();
    let w = RwWord(transport.endpoint().unwrap().read_u64(word).unwrap());
    assert!(w.is_idle(), "{w:?}");
}

/// Lease time from a clock the test moves (`with_clock`): see `tests/loopback.rs`.
static FAKE_MS: AtomicU64 = AtomicU64::new(0);
static FAKE_BASE: OnceLock<Instant> = OnceLock::new();

fn fake_now() -> Instant {
    *FAKE_BASE.get_or_init(Instant::now) + Duration::from_millis(FAKE_MS.load(Ordering::SeqCst))
}

#[test]
fn renewal_keeps_the_lease() {
    // The writer renews every half lease of the fake clock, for four leases: the reader never
    // sees the word unchanged for a lease, so it never resets it, however the threads run.
    let transport = LoopbackTransport::new(&[1 << 20]);
    let lease = Duration::from_secs(1);
    let word = at(4096);
    let lock = RwLock::new(word, lease).unwrap().with_clock(fake_now);
    let mut ep = transport.endpoint().unwrap();
    let mut g = lock.write(&mut ep).unwrap();
    let polled = |n: u64, done: &dyn Fn() -> bool| {
        let before = transport.operations();
        while transport.operations() < before + n && !done() {
            std::thread::yield_now();
        }
    };
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut ep = transport.endpoint().unwrap();
            let r = lock.read(&mut ep).unwrap();
            assert_eq!(r.ticket().generation, 0, "no reset: the holder renewed");
            r.unlock().unwrap();
        });
        polled(10, &|| h.is_finished());
        for _ in 0..8 {
            FAKE_MS.fetch_add(lease.as_millis() as u64 / 2, Ordering::SeqCst);
            polled(3, &|| h.is_finished());
            g.renew().expect("the reader reset a renewed lock");
        }
        g.unlock().unwrap();
        h.join().unwrap();
    });
}

#[test]
fn a_misaligned_word_is_an_error() {
    assert!(matches!(RwLock::new(at(4100), LEASE), Err(LockError::Misaligned { .. })));
}
