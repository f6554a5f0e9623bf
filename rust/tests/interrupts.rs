//! Stop tokens: an interrupt stops the call it was meant for and no other call running in
//! the same pool at the same time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bnrs::parallel::{run_in_pool, run_interruptible, set_local_threads, stop_token, Outcome};
use rayon::prelude::*;

/// Chunks of a parallel loop, each waiting 1 ms unless `stop` is set; as a kernel does,
/// the token is taken before the loop and captured by its closure. Returns how many
/// chunks saw the stop.
fn chunks_seeing_a_stop(chunks: usize, until: impl Fn() -> bool + Sync) -> usize {
    let stop = stop_token();
    let seen = AtomicUsize::new(0);
    (0..chunks).into_par_iter().with_max_len(1).for_each(|_| {
        if stop.is_set() {
            seen.fetch_add(1, Ordering::SeqCst);
        } else if !until() {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    seen.into_inner()
}

#[test]
fn an_interrupt_stops_only_the_call_it_was_meant_for() {
    // Enough threads for both calls, whatever BNRS_NUM_THREADS says; the two callers use
    // the same pool, so their chunks may run on the same pool threads.
    static OTHER_STARTED: AtomicBool = AtomicBool::new(false);
    static STOPPED: AtomicBool = AtomicBool::new(false);
    let interrupted = std::thread::spawn(|| {
        set_local_threads(Some(4)).expect("4 threads");
        let outcome = run_interruptible(
            || {
                let start = Instant::now();
                let stop = stop_token();
                while !stop.is_set() && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                STOPPED.store(stop.is_set(), Ordering::SeqCst);
                chunks_seeing_a_stop(64, || false)
            },
            Duration::from_millis(2),
            || {
                OTHER_STARTED
                    .load(Ordering::SeqCst)
                    .then(|| Box::new("ctrl-c") as Box<dyn std::any::Any + Send>)
            },
        );
        matches!(outcome, Outcome::Interrupted(_))
    });
    set_local_threads(Some(4)).expect("4 threads");
    // The other call starts, then goes on for 200 chunks after the interrupt.
    let seen = run_in_pool(|| {
        OTHER_STARTED.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while !STOPPED.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        chunks_seeing_a_stop(200, || false)
    });
    assert!(
        interrupted.join().expect("no panic"),
        "the poll's interrupt is reported"
    );
    assert!(
        STOPPED.load(Ordering::SeqCst),
        "the interrupted call saw its stop"
    );
    assert_eq!(seen, 0, "another call's chunks saw the interrupt");
    // An interruptible call whose own poll never fires is not disturbed either.
    let outcome = run_interruptible(
        || chunks_seeing_a_stop(16, || false),
        Duration::from_millis(1),
        || None,
    );
    assert!(matches!(outcome, Outcome::Done(0)));
}

#[test]
fn a_call_after_an_interrupt_starts_unstopped() {
    let outcome = run_interruptible(
        || chunks_seeing_a_stop(1000, || false),
        Duration::from_millis(1),
        || Some(Box::new("ctrl-c") as Box<dyn std::any::Any + Send>),
    );
    assert!(matches!(outcome, Outcome::Interrupted(_)));
    assert!(!stop_token().is_set(), "outside a call nothing is stopped");
    assert_eq!(run_in_pool(|| chunks_seeing_a_stop(8, || true)), 0);
}

#[test]
fn a_local_thread_count_is_the_calling_threads_own() {
    let default = bnrs::parallel::num_threads();
    let other = if default == 3 { 2 } else { 3 };
    let previous = set_local_threads(Some(other)).expect("threads");
    assert_eq!(previous, None);
    assert_eq!(bnrs::parallel::num_threads(), other);
    assert_eq!(run_in_pool(rayon::current_num_threads), other);
    let elsewhere = std::thread::spawn(|| {
        (
            bnrs::parallel::num_threads(),
            run_in_pool(rayon::current_num_threads),
        )
    })
    .join()
    .expect("no panic");
    assert_eq!(elsewhere, (default, default));
    assert_eq!(set_local_threads(previous), Ok(Some(other)));
    assert_eq!(run_in_pool(rayon::current_num_threads), default);
}
