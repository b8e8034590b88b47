//! How many workers take new connections, and which hand connections on to which: the
//! decisions of `spread = "pack"`, as pure functions of each worker's CPU share and open
//! connections (the control thread and the workers feed them; see [`super`]).

use std::time::Duration;

/// How often the control thread looks at the workers' load.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// A worker using this share of a CPU...
pub const GROW_AT: f64 = 0.75;
/// ...for this many intervals in a row asks for another worker (one busy interval is often
/// a burst of new connections).
pub const HOT_INTERVALS: u32 = 2;
/// When growing, enough workers to keep each near this share of a CPU.
pub const TARGET: f64 = 0.5;
/// One worker fewer once all workers together use less than this share of what they used
/// when the last worker came into use...
pub const FELL_TO: f64 = 0.8;
/// ...or less than this share of a CPU per worker that would remain...
pub const SHRINK_BELOW: f64 = 0.4;
/// ...for this many intervals in a row (2 s).
pub const QUIET_INTERVALS: u32 = 8;
/// A worker brought back into use within this many intervals (8 s) of being taken out of use
/// under a load that was not light doubles the quiet spell the next shrink needs...
pub const REGROW_WINDOW: u64 = 32;
/// ...up to this many intervals (64 s). Bringing a worker back later, or after the load had
/// gone light, resets it. (Intervals here are the packer's updates: none while the workers in
/// use are held.)
pub const MAX_QUIET_INTERVALS: u32 = 256;

/// Decides how many workers are in use (the first ones, by index).
#[derive(Debug)]
pub struct Packer {
    in_use: usize,
    workers: usize,
    hot: u32,
    quiet: u32,
    /// Quiet intervals in a row the next shrink needs: QUIET_INTERVALS, doubled after each
    /// flap (a grow soon after a shrink).
    quiet_needed: u32,
    /// Intervals seen.
    ticks: u64,
    /// The last shrink since the last grow: its interval, and whether the load was light.
    shrunk: Option<(u64, bool)>,
    /// For each worker brought into use, all workers' CPU use (shares of a CPU) just before.
    grown_at: Vec<f64>,
}

impl Packer {
    /// Starts with one worker in use.
    pub fn new(workers: usize) -> Packer {
        Packer {
            in_use: 1,
            workers: workers.max(1),
            hot: 0,
            quiet: 0,
            quiet_needed: QUIET_INTERVALS,
            ticks: 0,
            shrunk: None,
            grown_at: Vec::new(),
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Takes each worker's share of a CPU over the last interval, and its open connections
    /// against its share of `max_connections` (`cap`); returns the workers in use. A worker in
    /// use that is [`crowded`] brings the next into use at once, and the workers in use go
    /// down only if the connections fit the rest at 80% of their shares.
    ///
    /// A load whose cost changes with the number of workers (at 99% of one worker, 72% over
    /// two, as a copy relay of 4 bulk transfers measured) passes the rules both ways; each
    /// time a shrink is undone within [`REGROW_WINDOW`], the next needs twice as long a quiet
    /// spell, so such a load settles on the larger number instead of moving its connections
    /// back and forth every few seconds. Once the load falls below [`SHRINK_BELOW`] a CPU per
    /// remaining worker, the usual spell applies again.
    pub fn update(&mut self, busy: &[f64], counts: &[u64], cap: u64) -> usize {
        self.ticks += 1;
        let total: f64 = busy.iter().sum();
        let hot = busy.iter().any(|&b| b >= GROW_AT);
        // A hot worker asks for more only if the work would spread over more workers than are
        // in use at TARGET each: one connection that keeps a worker busy does not.
        let more_would_help = total / TARGET > self.in_use as f64;
        self.hot = if hot && more_would_help { self.hot + 1 } else { 0 };
        let fewer = self.in_use.saturating_sub(1);
        let fits_fewer = counts.iter().sum::<u64>() * 10 < cap.saturating_mul(8 * fewer as u64);
        let fell = self.grown_at.last().is_some_and(|&before| total < before * FELL_TO);
        let light = total < SHRINK_BELOW * fewer as f64;
        if self.in_use < self.workers && (self.hot >= HOT_INTERVALS || crowded(self.in_use, counts, cap)) {
            let wanted = ((total / TARGET).ceil() as usize).max(self.in_use + 1).min(self.workers);
            self.grown_at.resize(wanted - 1, total);
            self.in_use = wanted;
            self.hot = 0;
            self.quiet = 0;
            // Only a grow that undoes a shrink counts; one that adds to a level that stayed
            // leaves the back-off as it is.
            match self.shrunk.take() {
                Some((at, false)) if self.ticks - at <= REGROW_WINDOW => {
                    self.quiet_needed = (self.quiet_needed * 2).min(MAX_QUIET_INTERVALS);
                }
                Some(_) => self.quiet_needed = QUIET_INTERVALS,
                None => {}
            }
        } else if !hot && fewer > 0 && fits_fewer && (fell || light) {
            self.quiet += 1;
            // The back-off holds only while the load is still more than a light one: once it
            // has gone, the workers go after the usual spell.
            let needed = if light { QUIET_INTERVALS } else { self.quiet_needed };
            if self.quiet >= needed {
                self.in_use = fewer;
                self.grown_at.truncate(fewer - 1);
                self.quiet = 0;
                self.shrunk = Some((self.ticks, light));
            }
        } else {
            self.quiet = 0;
        }
        self.in_use
    }
}

/// How many of its connections worker `index` should hand on, given the workers in use and
/// every worker's open connections: all of them when it is out of use; when in use, what it
/// holds beyond a fair share plus some slack (a quarter, at least 4), so that the counts the
/// workers see a moment apart, and the ups and downs of random steering, do not send
/// connections back and forth.
pub fn excess(index: usize, in_use: usize, counts: &[u64]) -> u64 {
    let own = counts.get(index).copied().unwrap_or(0);
    if index >= in_use {
        return own;
    }
    let total: u64 = counts.iter().sum();
    let fair = total.div_ceil(in_use.max(1) as u64);
    own.saturating_sub(fair + (fair / 4).max(4))
}

/// The worker in use with the fewest connections, other than `index` and below `cap` (each
/// worker's share of `max_connections`), if handing it one evens things out.
pub fn destination(index: usize, in_use: usize, counts: &[u64], cap: u64) -> Option<usize> {
    let own = counts.get(index).copied().unwrap_or(0);
    let (to, &fewest) =
        counts.iter().enumerate().take(in_use).filter(|&(j, &c)| j != index && c < cap).min_by_key(|&(_, c)| *c)?;
    (index >= in_use || fewest + 1 < own).then_some(to)
}

/// How many connections worker `index` should start handing on now: its [`excess`], if
/// there is a [`destination`] for them.
pub fn to_hand_on(index: usize, in_use: usize, counts: &[u64], cap: u64) -> u64 {
    match destination(index, in_use, counts, cap) {
        Some(_) => excess(index, in_use, counts),
        None => 0,
    }
}

/// When the control thread wakes a worker to hand connections on: every interval while its
/// count changes and for 3 more, then only every [`Asking::EVERY`]th, so a worker whose
/// remaining connections cannot move (half closed, or never idle) is not woken four times a
/// second for nothing.
#[derive(Debug, Default)]
pub struct Asking {
    last_count: Option<u64>,
    unchanged: u32,
}

impl Asking {
    pub const EVERY: u32 = 8;

    /// Whether to wake the worker, which should hand on `wanted` of its `count` connections.
    pub fn should_ask(&mut self, wanted: u64, count: u64) -> bool {
        if wanted == 0 {
            *self = Asking::default();
            return false;
        }
        if self.last_count == Some(count) {
            self.unchanged += 1;
        } else {
            self.last_count = Some(count);
            self.unchanged = 0;
        }
        self.unchanged < 4 || self.unchanged.is_multiple_of(Self::EVERY)
    }
}

/// Whether a worker in use holds 90% of its share of `max_connections`: then the next worker
/// comes into use, whatever the CPU says.
pub fn crowded(in_use: usize, counts: &[u64], cap: u64) -> bool {
    counts.iter().take(in_use).any(|&c| c * 10 >= cap * 9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_that_flaps_backs_off() {
        // One worker at 99% asks for a second; over two the same load uses 37% + 35%, less than
        // 80% of the 99% that brought the second in, so the second goes again.
        let mut packer = Packer::new(2);
        let mut shrinks = Vec::new();
        for tick in 0..1000u32 {
            let busy: &[f64] = if packer.in_use() == 1 { &[0.99, 0.0] } else { &[0.37, 0.35] };
            let before = packer.in_use();
            if packer.update(busy, &[2, 2], 1000) < before {
                shrinks.push(tick);
            }
        }
        // Two hot intervals bring the second worker in; it goes after the quiet spell, 8
        // intervals, then 16, 32, ... up to 256, as every shrink is undone 2 intervals later.
        // Without the back-off: one shrink every 10 intervals.
        assert_eq!(shrinks, [9, 27, 61, 127, 257, 515, 773]);

        // A flap: a shrink under a load that is not light, undone at once. The next shrink
        // needs twice the spell...
        let mut calm = Packer::new(2);
        feed(&mut calm, HOT_INTERVALS, &[0.99, 0.0]);
        assert_eq!(feed(&mut calm, QUIET_INTERVALS, &[0.37, 0.35]), 1);
        assert_eq!(feed(&mut calm, HOT_INTERVALS, &[0.99, 0.0]), 2);
        assert_eq!(feed(&mut calm, 2 * QUIET_INTERVALS - 1, &[0.37, 0.35]), 2, "backed off");
        assert_eq!(feed(&mut calm, 1, &[0.37, 0.35]), 1);
        // ...unless the load has become a light one.
        assert_eq!(feed(&mut calm, HOT_INTERVALS, &[0.99, 0.0]), 2);
        assert_eq!(feed(&mut calm, QUIET_INTERVALS, &[0.1, 0.1]), 1, "a light load: the usual spell");
        // A load back after it had gone light starts from the usual spell.
        assert_eq!(feed(&mut calm, HOT_INTERVALS, &[0.99, 0.0]), 2);
        assert_eq!(feed(&mut calm, QUIET_INTERVALS, &[0.37, 0.35]), 1, "reset after a light spell");
        // So does one back long after the last shrink.
        feed(&mut calm, REGROW_WINDOW as u32 + 1, &[0.5, 0.0]);
        assert_eq!(feed(&mut calm, HOT_INTERVALS, &[0.99, 0.0]), 2);
        assert_eq!(feed(&mut calm, QUIET_INTERVALS, &[0.37, 0.35]), 1, "reset after a long time");

        // A grow that brings no worker back (a third, after the second came back) neither
        // doubles the spell again nor resets it.
        let mut three = Packer::new(3);
        feed(&mut three, HOT_INTERVALS, &[0.99, 0.0, 0.0]);
        assert_eq!(feed(&mut three, QUIET_INTERVALS, &[0.37, 0.35, 0.0]), 1);
        assert_eq!(feed(&mut three, HOT_INTERVALS, &[0.99, 0.0, 0.0]), 2);
        assert_eq!(feed(&mut three, HOT_INTERVALS, &[0.9, 0.9, 0.0]), 3);
        // 3 -> 2 under a load that is not light (1.4 < 80% of 1.8) takes 16 intervals, not 32.
        assert_eq!(feed(&mut three, 2 * QUIET_INTERVALS - 1, &[0.5, 0.5, 0.4]), 3);
        assert_eq!(feed(&mut three, 1, &[0.5, 0.5, 0.4]), 2);

        // After the flapping load above, its end still takes workers out after the usual spell.
        assert_eq!(feed(&mut packer, QUIET_INTERVALS, &[0.0, 0.0]), 1);
    }

    /// Feeds the packer the same figures `n` times; returns the workers in use after.
    fn feed(packer: &mut Packer, n: u32, busy: &[f64]) -> usize {
        for _ in 1..n {
            packer.update(busy, &[0; 4], 1000);
        }
        packer.update(busy, &[0; 4], 1000)
    }

    #[test]
    fn packer_grows_when_a_worker_stays_busy() {
        let mut packer = Packer::new(4);
        assert_eq!(feed(&mut packer, 10, &[0.5, 0.0, 0.0, 0.0]), 1, "half a CPU is fine for one");
        assert_eq!(feed(&mut packer, 1, &[0.8, 0.0, 0.0, 0.0]), 1, "one busy interval is not enough");
        assert_eq!(feed(&mut packer, 1, &[0.5, 0.0, 0.0, 0.0]), 1);
        assert_eq!(feed(&mut packer, 1, &[0.8, 0.0, 0.0, 0.0]), 1);
        assert_eq!(feed(&mut packer, 1, &[0.8, 0.0, 0.0, 0.0]), 2, "two in a row: one more");
        assert_eq!(feed(&mut packer, 2, &[0.9, 0.9, 0.0, 0.0]), 4, "enough to keep each near half a CPU");
        assert_eq!(feed(&mut packer, 4, &[1.0, 1.0, 1.0, 1.0]), 4, "never more than there are");
        let mut two = Packer::new(2);
        assert_eq!(feed(&mut two, 2, &[3.0, 0.0]), 2);
    }

    #[test]
    fn packer_shrinks_after_a_quiet_spell() {
        let mut packer = Packer::new(2);
        feed(&mut packer, HOT_INTERVALS, &[0.9, 0.0]);
        assert_eq!(packer.in_use(), 2);
        assert_eq!(feed(&mut packer, QUIET_INTERVALS - 1, &[0.1, 0.1]), 2);
        // A busy interval starts the count again.
        assert_eq!(feed(&mut packer, 1, &[0.5, 0.5]), 2);
        assert_eq!(feed(&mut packer, QUIET_INTERVALS - 1, &[0.1, 0.1]), 2);
        assert_eq!(feed(&mut packer, 1, &[0.1, 0.1]), 1);
        assert_eq!(feed(&mut packer, 20, &[0.0, 0.0]), 1, "never fewer than one");
    }

    #[test]
    fn load_that_needed_another_worker_does_not_flap() {
        // 0.8 of a CPU on one worker spreads; as 0.45 + 0.45 on two (the wake-ups cost extra)
        // it stays spread: it is more than before, and one worker would be back at the
        // threshold.
        let mut packer = Packer::new(2);
        feed(&mut packer, HOT_INTERVALS, &[0.8, 0.0]);
        assert_eq!(feed(&mut packer, 3 * QUIET_INTERVALS, &[0.45, 0.45]), 2);
        // Once the load falls well below what brought the second worker in, one is enough.
        assert_eq!(feed(&mut packer, QUIET_INTERVALS, &[0.3, 0.3]), 1);
    }

    #[test]
    fn one_busy_connection_does_not_flap() {
        // One bulk connection keeps worker 0 at 0.9 of a CPU: a second worker takes the new
        // connections, more would not help, and none is given back while it stays hot.
        let mut packer = Packer::new(4);
        assert_eq!(feed(&mut packer, HOT_INTERVALS, &[0.9, 0.0, 0.0, 0.0]), 2);
        assert_eq!(feed(&mut packer, 10 * QUIET_INTERVALS, &[0.9, 0.0, 0.0, 0.0]), 2);
        // Hot because the connections are uneven, not because there is much work: no growth.
        let mut two = Packer::new(4);
        feed(&mut two, HOT_INTERVALS, &[0.8, 0.0, 0.0, 0.0]);
        assert_eq!(feed(&mut two, 10 * QUIET_INTERVALS, &[0.8, 0.1, 0.0, 0.0]), 2);
    }

    #[test]
    fn each_level_remembers_what_brought_it() {
        let mut packer = Packer::new(4);
        feed(&mut packer, HOT_INTERVALS, &[0.8, 0.0, 0.0, 0.0]);
        feed(&mut packer, HOT_INTERVALS, &[0.9, 0.7, 0.0, 0.0]);
        assert_eq!(packer.in_use(), 4, "1.6 of a CPU wants 4 near half a CPU each");
        // Below 80% of 1.6 but not of 0.8: down to 3, then to 2, but not to 1.
        assert_eq!(feed(&mut packer, QUIET_INTERVALS, &[0.3, 0.3, 0.3, 0.3]), 3);
        assert_eq!(feed(&mut packer, QUIET_INTERVALS, &[0.3, 0.3, 0.3, 0.3]), 2);
        assert_eq!(feed(&mut packer, 3 * QUIET_INTERVALS, &[0.4, 0.4, 0.0, 0.0]), 2);
    }

    #[test]
    fn workers_out_of_use_hand_on_everything() {
        assert_eq!(excess(1, 1, &[10, 7]), 7);
        assert_eq!(excess(0, 1, &[10, 7]), 0, "the only worker in use keeps its own");
        assert_eq!(destination(1, 1, &[10, 7], 100), Some(0));
        assert_eq!(destination(0, 1, &[10, 7], 100), None, "no other worker in use");
        assert_eq!(destination(1, 1, &[100, 7], 100), None, "the worker in use is full");
    }

    #[test]
    fn workers_in_use_even_out_beyond_the_slack() {
        // A pool of 100 opened while one worker was in use.
        assert_eq!(excess(0, 2, &[100, 0]), 100 - 50 - 12);
        assert_eq!(destination(0, 2, &[100, 0], 1000), Some(1));
        assert_eq!(excess(1, 2, &[100, 0]), 0);
        // Close to even: nothing moves.
        assert_eq!(excess(0, 2, &[60, 40]), 0);
        assert_eq!(excess(0, 2, &[64, 36]), 64 - 50 - 12);
        assert_eq!(excess(0, 2, &[3, 0]), 0, "a few connections never move");
        assert_eq!(destination(0, 2, &[5, 5], 1000), None, "no worker has fewer");
        // Connections still on a worker out of use count toward the shares.
        assert_eq!(excess(0, 2, &[80, 0, 40]), 80 - 60 - 15);
        assert_eq!(destination(2, 2, &[80, 0, 40], 1000), Some(1));
    }

    #[test]
    fn a_worker_that_cannot_hand_on_is_asked_less_often() {
        let mut asking = Asking::default();
        assert!(!asking.should_ask(0, 10), "nothing to hand on");
        let asked: Vec<bool> = (0..20).map(|_| asking.should_ask(3, 10)).collect();
        assert_eq!(asked.iter().filter(|&&a| a).count(), 4 + 2, "4 at once, then every 8th: {asked:?}");
        assert!(asking.should_ask(3, 9), "the count moved: ask again at once");
        assert!(!asking.should_ask(0, 9));
        assert!(asking.should_ask(3, 9), "a new round starts afresh");
    }

    #[test]
    fn a_full_worker_brings_the_next_into_use() {
        assert!(!crowded(1, &[89, 0], 100));
        assert!(crowded(1, &[90, 0], 100));
        assert!(!crowded(1, &[0, 95], 100), "only workers in use count");
        let mut packer = Packer::new(2);
        assert_eq!(packer.update(&[0.1, 0.0], &[90, 0], 100), 2, "at once");
        // Idle, but the connections would crowd one worker: both stay in use.
        for _ in 0..2 * QUIET_INTERVALS {
            assert_eq!(packer.update(&[0.0, 0.0], &[45, 45], 100), 2);
        }
        for _ in 0..QUIET_INTERVALS {
            packer.update(&[0.0, 0.0], &[30, 30], 100);
        }
        assert_eq!(packer.in_use(), 1, "60 fit one worker's 100");
    }
}
