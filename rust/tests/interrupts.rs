//! The stop flag shared by concurrent kernel calls. A binary of its own: setting the
//! flag would make kernels running in other tests of the same process stop early.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bnrs::parallel::{run_in_pool, run_interruptible, stop_requested, Outcome};

/// Wait (at most 10 s) until a stop is requested.
fn until_stopped() -> bool {
    let start = Instant::now();
    while !stop_requested() {
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn a_short_job_that_overlaps_an_interrupt_is_not_reported_done() {
    // A long call is interrupted by its own poll while a short call runs; the short one
    // sees the stop (kernels return early on it), so its result must be discarded.
    static SHORT_STARTED: AtomicBool = AtomicBool::new(false);
    let long = std::thread::spawn(|| {
        let outcome = run_interruptible(until_stopped, Duration::from_millis(2), || {
            SHORT_STARTED
                .load(Ordering::SeqCst)
                .then(|| Box::new("ctrl-c") as Box<dyn std::any::Any + Send>)
        });
        matches!(outcome, Outcome::Interrupted(Some(_)))
    });
    let short = run_in_pool(|| {
        SHORT_STARTED.store(true, Ordering::SeqCst);
        until_stopped()
    });
    assert!(matches!(short, Outcome::Interrupted(None)));
    assert!(long.join().expect("no panic"));
    // Once no job runs, the stop is cleared and jobs complete again.
    assert!(!stop_requested());
    assert!(matches!(run_in_pool(|| 7), Outcome::Done(7)));
}
