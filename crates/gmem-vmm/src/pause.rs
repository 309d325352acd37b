//! The pause of every vCPU at once, for a migration's stop-and-copy or a
//! snapshot: the pausing thread (the migration's, or the vCPU that takes
//! the snapshot) asks ([`Rendezvous::pause_all`]); each vCPU, at its next
//! exit, completes its I/O, saves its registers and parks
//! ([`Rendezvous::park`]); when all have parked the devices are quiet and
//! the pausing thread saves the machine; then one verdict
//! ([`AllPaused::decide`]) sends every vCPU on or ends the run. One pause
//! at a time: a second is refused while one is under way.
//!
//! Bounded: a vCPU that ends, fails to save itself, or a run that ends
//! calls the pause off, and the parked vCPUs run on; the thread that holds
//! every vCPU paused decides within its own I/O timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::state::VcpuSnapshot;

/// What the pausing thread tells the paused vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The run ends here (the destination runs the guest, or the snapshot
    /// was to stop it).
    End,
    /// The guest runs on here.
    Resume,
}

/// How long a wait sleeps before it looks at the run again.
const POLL: Duration = Duration::from_millis(5);

/// Waits between two kicks of the vCPUs that have not parked yet.
const KICK_EVERY: u32 = 20;

/// The longest a pause waits for every vCPU to park (a vCPU whose
/// instruction keeps exiting, a `rep movs` over a device, moves on only
/// an element at a time): then it is called off, and the guest runs on.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pause was called off.
#[derive(Debug)]
pub(crate) struct Refused {
    /// Another pause was under way (a caller that is not a vCPU may try
    /// again).
    pub(crate) busy: bool,
    /// Why, for the report.
    pub(crate) why: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Where the vCPUs meet to pause; one per machine.
pub(crate) struct Rendezvous {
    state: Mutex<State>,
    cv: Condvar,
    /// A pause is asked for: the vCPUs look at it between two exits.
    wanted: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The pause under way, by generation.
    asked: Option<u64>,
    /// The last generation asked for.
    generation: u64,
    /// The vCPUs parked in the pause under way: index and saved state.
    parked: Vec<(usize, Result<VcpuSnapshot, String>)>,
    /// When the first one parked (`Instant`, and `CLOCK_MONOTONIC` ns).
    first: Option<(Instant, u64)>,
    /// The last verdict, and the generation it was given on.
    decided: Option<(u64, Verdict)>,
    /// vCPU threads that have ended.
    ended: usize,
}

/// Every vCPU, paused, until [`decide`](Self::decide) (or drop, which
/// resumes them).
pub(crate) struct AllPaused<'a> {
    rv: &'a Rendezvous,
    generation: u64,
    /// Their saved states, with their indices, by index.
    pub(crate) vcpus: Vec<(usize, VcpuSnapshot)>,
    /// When the first paused.
    pub(crate) at: Instant,
    /// The same, as `CLOCK_MONOTONIC` ns.
    pub(crate) at_ns: u64,
}

impl AllPaused<'_> {
    /// Gives the verdict: every parked vCPU wakes with it. The first
    /// verdict stands.
    pub(crate) fn decide(&self, verdict: Verdict) {
        self.rv.decide(self.generation, verdict);
    }
}

impl Drop for AllPaused<'_> {
    fn drop(&mut self) {
        // No verdict yet (an error path): the guest runs on here.
        self.rv.decide(self.generation, Verdict::Resume);
    }
}

impl Rendezvous {
    pub(crate) fn new() -> Rendezvous {
        Rendezvous {
            state: Mutex::default(),
            cv: Condvar::new(),
            wanted: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a pause is asked for (cheap: the vCPU loop's check).
    pub(crate) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Whether a vCPU thread has ended (no pause can gather them all).
    pub(crate) fn any_ended(&self) -> bool {
        self.lock().ended > 0
    }

    /// A vCPU thread has ended: a pause under way cannot gather them all.
    pub(crate) fn vcpu_ended(&self) {
        self.lock().ended += 1;
        self.cv.notify_all();
    }

    /// Asks every vCPU to pause, calls `kick` (to get them out of
    /// `KVM_RUN`; again every 100 ms), and waits until all `count` have
    /// parked, at most [`PAUSE_TIMEOUT`].
    ///
    /// # Errors
    /// Why the pause was called off (the parked vCPUs run on): another
    /// pause under way (`busy`), a vCPU that has ended or could not save
    /// its state, `run_over()`, or the deadline.
    pub(crate) fn pause_all(
        &self,
        count: usize,
        kick: impl Fn(),
        run_over: impl Fn() -> bool,
    ) -> Result<AllPaused<'_>, Refused> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let generation = {
            let mut s = self.lock();
            if s.asked.is_some() {
                return Err(Refused {
                    busy: true,
                    why: "another pause of the vCPUs is under way".to_owned(),
                });
            }
            s.generation += 1;
            s.asked = Some(s.generation);
            s.parked.clear();
            s.first = None;
            s.generation
        };
        self.wanted.store(true, Ordering::Release);
        kick();
        let mut s = self.lock();
        let mut waits = 0u32;
        let why = loop {
            if let Some((index, Err(why))) = s.parked.iter().find(|(_, r)| r.is_err()) {
                break format!("vCPU {index}'s state could not be saved: {why}");
            }
            if s.ended > 0 {
                break "a vCPU has ended: a pause needs every vCPU running".to_owned();
            }
            if run_over() {
                break "the guest ended before every vCPU paused".to_owned();
            }
            if Instant::now() >= deadline {
                break format!(
                    "{} of {count} vCPUs paused within {} s",
                    s.parked.len(),
                    PAUSE_TIMEOUT.as_secs()
                );
            }
            if s.parked.len() >= count {
                let mut parked = std::mem::take(&mut s.parked);
                parked.sort_by_key(|(index, _)| *index);
                let (at, at_ns) = s.first.unwrap_or_else(|| (Instant::now(), 0));
                drop(s);
                return Ok(AllPaused {
                    rv: self,
                    generation,
                    vcpus: parked
                        .into_iter()
                        .filter_map(|(i, r)| r.ok().map(|v| (i, v)))
                        .collect(),
                    at,
                    at_ns,
                });
            }
            waits += 1;
            if waits.is_multiple_of(KICK_EVERY) {
                // A vCPU between exits when the first kick came.
                kick();
            }
            s = self
                .cv
                .wait_timeout(s, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(s);
        self.decide(generation, Verdict::Resume);
        Err(Refused { busy: false, why })
    }

    /// vCPU `index` parks with its saved state (`at`: when it stopped, in
    /// both clocks) and waits for the verdict. `None` if no pause is under
    /// way (it was called off meanwhile): the vCPU runs on.
    pub(crate) fn park(
        &self,
        index: usize,
        saved: Result<VcpuSnapshot, String>,
        at: (Instant, u64),
    ) -> Option<Verdict> {
        let mut s = self.lock();
        let generation = s.asked?;
        if s.parked.iter().any(|(i, _)| *i == index) {
            return None;
        }
        s.parked.push((index, saved));
        s.first.get_or_insert(at);
        self.cv.notify_all();
        loop {
            if let Some((g, v)) = s.decided
                && g >= generation
            {
                return Some(v);
            }
            // Bounded: the pausing thread decides on every path (drop
            // resumes), within its I/O timeout.
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The verdict on `generation`, unless one was given already.
    fn decide(&self, generation: u64, verdict: Verdict) {
        let mut s = self.lock();
        if s.decided.is_some_and(|(g, _)| g >= generation) {
            return;
        }
        s.decided = Some((generation, verdict));
        if s.asked == Some(generation) {
            s.asked = None;
            s.parked.clear();
            self.wanted.store(false, Ordering::Release);
        }
        drop(s);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A vCPU thread that parks once the pause is wanted, with `regs.rip
    /// = index` so the order can be checked; its verdict.
    fn vcpu(rv: &Arc<Rendezvous>, index: usize) -> std::thread::JoinHandle<Option<Verdict>> {
        let rv = Arc::clone(rv);
        std::thread::spawn(move || {
            while !rv.wanted() {
                std::thread::yield_now();
            }
            let mut v = VcpuSnapshot::default();
            v.regs.rip = index as u64;
            rv.park(index, Ok(v), (Instant::now(), 0))
        })
    }

    #[test]
    fn every_vcpu_parks_and_takes_the_one_verdict() {
        let rv = Arc::new(Rendezvous::new());
        let threads: Vec<_> = [2, 0, 1].iter().map(|&i| vcpu(&rv, i)).collect();
        let kicks = AtomicUsize::new(0);
        let all = rv
            .pause_all(
                3,
                || {
                    kicks.fetch_add(1, Ordering::Relaxed);
                },
                || false,
            )
            .unwrap();
        assert!(kicks.load(Ordering::Relaxed) >= 1);
        let order: Vec<_> = all.vcpus.iter().map(|(i, v)| (*i, v.regs.rip)).collect();
        assert_eq!(order, [(0, 0), (1, 1), (2, 2)]);
        // A second pause meanwhile is refused.
        assert!(rv.pause_all(3, || {}, || false).err().unwrap().busy);
        all.decide(Verdict::End);
        // The first verdict stands: the drop's Resume changes nothing.
        drop(all);
        for t in threads {
            assert_eq!(t.join().unwrap(), Some(Verdict::End));
        }
        assert!(!rv.wanted());
    }

    #[test]
    fn a_pause_dropped_undecided_resumes_every_vcpu() {
        let rv = Arc::new(Rendezvous::new());
        let threads: Vec<_> = (0..2).map(|i| vcpu(&rv, i)).collect();
        drop(rv.pause_all(2, || {}, || false).unwrap());
        for t in threads {
            assert_eq!(t.join().unwrap(), Some(Verdict::Resume));
        }
        // The next pause is a new one.
        let t = vcpu(&rv, 0);
        rv.pause_all(1, || {}, || false)
            .unwrap()
            .decide(Verdict::End);
        assert_eq!(t.join().unwrap(), Some(Verdict::End));
    }

    #[test]
    fn an_ended_vcpu_a_failed_save_or_the_run_ending_call_the_pause_off() {
        let rv = Arc::new(Rendezvous::new());
        let parked = vcpu(&rv, 0);
        let ended = {
            let rv = Arc::clone(&rv);
            std::thread::spawn(move || {
                while !rv.wanted() {
                    std::thread::yield_now();
                }
                rv.vcpu_ended();
            })
        };
        let why = rv.pause_all(2, || {}, || false).err().unwrap().why;
        assert!(why.contains("ended"), "{why}");
        ended.join().unwrap();
        // The vCPU that had parked runs on (or found no pause to join).
        assert_ne!(parked.join().unwrap(), Some(Verdict::End));

        let rv = Arc::new(Rendezvous::new());
        let failed = {
            let rv = Arc::clone(&rv);
            std::thread::spawn(move || {
                while !rv.wanted() {
                    std::thread::yield_now();
                }
                rv.park(1, Err("KVM_GET_REGS: EIO".into()), (Instant::now(), 0))
            })
        };
        let why = rv.pause_all(2, || {}, || false).err().unwrap().why;
        assert!(why.contains("vCPU 1") && why.contains("EIO"), "{why}");
        assert_eq!(failed.join().unwrap(), Some(Verdict::Resume));

        let rv = Rendezvous::new();
        let why = rv.pause_all(1, || {}, || true).err().unwrap().why;
        assert!(why.contains("guest ended"), "{why}");
        // No pause under way: a vCPU that comes late runs on.
        assert_eq!(
            rv.park(0, Ok(VcpuSnapshot::default()), (Instant::now(), 0)),
            None
        );
    }
}
