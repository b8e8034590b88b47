//! Each worker's share of a CPU, from its thread's CPU clock: what `spread = "pack"` decides
//! on.

use std::time::{Duration, Instant};

/// Each worker's share of a CPU over the last interval, from its thread's CPU clock.
pub struct CpuShares {
    /// Each worker's CPU time at the last look; `None` if it had none (its thread not yet seen,
    /// or gone), so the time a thread used before it was first seen is not one interval's.
    before: Vec<Option<Duration>>,
    last: Instant,
}

impl CpuShares {
    pub fn new(workers: usize, now: Instant) -> CpuShares {
        CpuShares { before: vec![None; workers], last: now }
    }

    /// Takes each worker's CPU time now (`None`: no thread yet, or it has exited) and returns
    /// the share of a CPU each used since the last call: 0 for a worker without a reading at
    /// both calls.
    pub fn update(&mut self, now: Instant, used: impl IntoIterator<Item = Option<Duration>>) -> Vec<f64> {
        // At least 1 ms: a tick that comes at once must not turn a little CPU into a spike.
        let wall = now.saturating_duration_since(self.last).as_secs_f64().max(1e-3);
        self.last = now;
        self.before
            .iter_mut()
            .zip(used)
            .map(|(before, used)| {
                let share = match (*before, used) {
                    (Some(before), Some(used)) => used.saturating_sub(before).as_secs_f64() / wall,
                    _ => 0.0,
                };
                *before = used;
                share
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_shares_need_two_readings_and_survive_a_thread_going_away() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut shares = CpuShares::new(3, start);
        // First look: worker 0 had used 5 s before it was seen; worker 2 has no thread yet.
        assert_eq!(shares.update(start + ms(250), [Some(ms(5000)), Some(ms(10)), None]), [0.0, 0.0, 0.0]);
        // 250 ms later: worker 0 used 200 ms (80%), worker 1 none; worker 2 is first seen.
        let busy = shares.update(start + ms(500), [Some(ms(5200)), Some(ms(10)), Some(ms(1))]);
        assert!((busy[0] - 0.8).abs() < 1e-9 && busy[1] == 0.0 && busy[2] == 0.0, "{busy:?}");
        // Worker 0 has no reading for a look: 0 then, and 0 at the next (one reading is not
        // an interval), then its share again.
        let busy = shares.update(start + ms(750), [None, Some(ms(135)), Some(ms(51))]);
        assert!(busy[0] == 0.0 && (busy[1] - 0.5).abs() < 1e-9 && (busy[2] - 0.2).abs() < 1e-9, "{busy:?}");
        let busy = shares.update(start + ms(1000), [Some(ms(5300)), Some(ms(135)), Some(ms(51))]);
        assert_eq!(busy[0], 0.0, "{busy:?}");
        let busy = shares.update(start + ms(1250), [Some(ms(5350)), Some(ms(135)), Some(ms(51))]);
        assert!((busy[0] - 0.2).abs() < 1e-9, "{busy:?}");
        // Two looks at the same instant: the wall time counts as 1 ms, not 0.
        let busy = shares.update(start + ms(1250), [Some(ms(5350)), Some(ms(136)), Some(ms(51))]);
        assert!((busy[1] - 1.0).abs() < 1e-9, "{busy:?}");
    }
}
