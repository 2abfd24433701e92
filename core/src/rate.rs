//! The global rate limiter: every grant request of this process takes one permit first.
//!
//! Money counts requests per API key "over any one-second window" and answers 429 above its
//! limit, so no window of one second may ever carry more than `money.rate_limit_per_sec`
//! requests. Two layers keep it so:
//!
//! * **Pacing** (governor's GCRA, one dispatcher task taking permits and handing requests to
//!   senders; many tasks waiting on one limiter would form a thundering herd) spaces requests
//!   evenly at `(limit - reserve) / (1 s + slack)`. A burst worth 40 ms of permits (40 at
//!   1,000/s) lets a dispatcher that wakes up late catch up instead of losing the time: tokio's
//!   timer rounds sleeps up to the next millisecond, and with a burst of 2 the pace lost 0.5 %
//!   (990.4/s against 996/s); with 10 the steady rate is the pace (993.5/s against 994/s), but
//!   a virtual CPU taken by the hypervisor for up to 40 ms still cost 0.2-0.6 % (see
//!   [`CATCH_UP`]). The burst never lets a window carry more: the send log below bounds it.
//! * **An exact send-window log**: right before a request leaves, its sender passes
//!   [`RateLimiter::admit`], which refuses a send while the last `limit - reserve` sends all lie
//!   within `1 s + slack`. Sender tasks can start late on a busy machine and then leave
//!   together; the log makes the cap hold whatever the scheduler does. A request that leaves
//!   more than [`DEPARTURE_TOLERANCE`] after its admission (its connection's task ran late, or
//!   a new connection's handshake came first) has its send moved to when it left
//!   ([`RateLimiter::departed`]): otherwise the sends admitted a window later could go out on
//!   time and share a second on the wire with it. After the log has been empty (a start, or a
//!   pause longer than a window) it holds [`COLD_START_SLACK`] worth of places back for one
//!   window: the first requests also open connections, which spreads their arrivals further.
//!   The log also spaces admissions ([`SPREAD`]): at most [`SPREAD_BURST`] back to back (a
//!   millisecond's worth at high limits, [`SPREAD_BURST_TIME`]), and
//!   no faster than twice the pace in the long run, so that the places a burst frees one
//!   window later are not taken by another burst, window after window.
//!
//! Two settings keep room in every window for what happens after a request leaves payoutd's
//! hands:
//!
//! * `slack` (`money.rate_slack`, default 4 ms) is time kept free in every window for delay that
//!   varies by little for every request: requests that leave evenly can arrive unevenly,
//!   compressing a window by the difference in delay between its first and its last request.
//! * `reserve` (`money.rate_reserve`, default 2 places per [`RESERVE_PER`] of the limit) is
//!   places kept free in every window for single requests held up for longer than the slack.
//!   The departure is noted in the turn that writes the request, right before the write system
//!   call; a thread stopped between the two (a virtual CPU taken by the hypervisor) sends its
//!   request 11-38 ms after it was counted, while the other connections go on sending. Counted
//!   sends fill at most `limit - reserve` places of any `1 s + slack`, so a second at Money goes
//!   over the limit only if more than `reserve` such requests land in it: a one-second window
//!   at Money holds the sends counted within `1 s + slack` of each other plus the late ones.
//!
//! Each millisecond of slack and each place per 1,000 of reserve costs 0.1 % of throughput: at
//! 1,000/s the defaults pace at 998 per 1.004 s, 994/s, which pays 1,000,000 rows in 1,006 s,
//! within the 1,010 s (99 %) the requirements allow, and 200,000 rows at Money's 200 ± 100 ms
//! in 201.6 s, where 6 ms (992/s) took 202.1 s, over the 202.0 s of 99 %: the slack was 8 ms
//! before departures were noted and 6 ms with the reserve beside it; measured since, requests
//! arrive within 2.5 ms of the time they are counted from, stragglers apart (BENCHMARKS.md,
//! session 17). Delays inside payoutd (admission to write)
//! need neither since sends move to their departure: on the 2-core benchmark machine, where
//! payoutd, MariaDB and money-sim share the cores, scheduling stalls hold a request 5-20 ms now
//! and then, and before departures were noted they put 1,001-1,013 arrivals into one second.
//! `payout-bench --transit` measures the rest (requests later than the slack after the time
//! they were counted from, and the most in one second); a packet capture
//! (`scripts/bench-wire.py`, BENCHMARKS.md) measures the wire.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota};

/// The default slack kept free in every window for uneven transit between us and Money.
pub const DEFAULT_SLACK: Duration = Duration::from_millis(4);

/// The default reserve, in places per [`RESERVE_PER`] of the limit (2 at 1,000/s): places kept
/// free in every window for requests held up on their own after payoutd last saw them.
pub const DEFAULT_RESERVE: u32 = 2;

/// The limit a reserve is given for: a reserve of `r` keeps `r × limit / RESERVE_PER` places
/// free (rounded down).
pub const RESERVE_PER: u32 = 1000;

/// A request that leaves later than this after its admission counts as sent when it left;
/// shorter delays are left to the slack (moving every send would cost a second lock per
/// request for nothing).
pub const DEPARTURE_TOLERANCE: Duration = Duration::from_millis(1);

/// How late a dispatcher may wake up without losing the time: tokio's timer rounds every sleep
/// up to the next millisecond and a busy machine adds more, so a burst of one or two permits
/// loses some 0.5 % of the pace (measured: 990.4/s against 996/s). A hypervisor that takes a
/// virtual CPU stops the dispatcher for longer: with 4 % of both CPUs taken in stalls of 1-40 ms
/// (`scripts/bench-stall.py --steal 4 40`), 200,000 rows at 1,000/s reached 98.47-98.86 % of
/// the limit with 10 ms of catch-up and 99.06-99.09 % with 40 ms (BENCHMARKS.md, session 12).
/// Catching up only fills places the send log has free, so no window carries more for it.
pub const CATCH_UP: Duration = Duration::from_millis(40);

/// The most permits a burst holds, whatever the limit: at high limits a dispatcher that wakes up
/// late has a whole batch of requests to hand out anyway.
const MAX_BURST: u64 = 64;

/// How much faster than the pace the send log admits at most, in the long run: `SPREAD` times.
///
/// A window that frees many places at once (the sends of a burst leave it together) would let
/// as many senders waiting on it leave together, and they would fill the next window the same
/// way: every burst would come back once a window for the rest of the campaign, and every
/// stall or catch-up would add one. Measured with the limiter alone
/// (`cargo run --release -p payout-core --example send_shape`): the first window's burst (the
/// pacing's catch-up permits and the cold start's places, freed at once) came back as some 75
/// admissions within 5 ms in every window for as long as it ran; in a 2,000,000-row campaign,
/// where stalls added more, requests in flight peaked above the 128 idle connections kept, and
/// the daemon opened 129,470 connections and peaked at 37.3 MiB (22.6 MiB at 100,000 rows).
/// Spacing admissions to at least half the pacing period (with [`SPREAD_BURST`] back to back)
/// turns such a burst into a run at twice the pace: catching up stays twice as fast as the pace,
/// and requests in flight stay within twice the rate times Money's latency.
pub const SPREAD: u32 = 2;

/// Admissions that may go out back to back before [`SPREAD`] spaces them: tokio's timer wakes a
/// waiting sender on the next millisecond, when two or three places are due at once.
pub const SPREAD_BURST: u32 = 4;

/// At high limits, back to back as many as [`SPREAD`] allows in this much time (more than
/// [`SPREAD_BURST`]): a sender held back sleeps until the next millisecond at least, so with
/// only 4 a wake-up, fast senders would wait for each other.
pub const SPREAD_BURST_TIME: Duration = Duration::from_millis(1);

/// No spread below this spacing (limits above some 50,000/s, the benchmark's "no limit"
/// among them): there, senders are spaced by their own scheduling, and the unlimited benchmark
/// gave 12,800-15,800 rows/s in three runs with a spread, 16,400 in the run right after
/// without it (on a machine that had slowed down: 18,900 two hours before).
pub const SPREAD_MIN: Duration = Duration::from_micros(10);

/// Extra time kept free in the first window after the send log has been empty (a campaign
/// starting, or sending again after a pause of more than a window). Those first requests also
/// open connections, and the handshakes spread their arrivals: starting at 1,000/s with Money
/// answering in 200 ± 100 ms (some 300 connections opened in the first second), admission →
/// arrival took up to 16 ms, twice the slack of then (8 ms), and 22 requests of the window that followed
/// arrived above the limit. Costs `limit × 30 ms` sends once per start (30 at 1,000/s).
pub const COLD_START_SLACK: Duration = Duration::from_millis(30);

/// How permits are spaced for a given limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Time between two permits.
    pub period: Duration,
    /// Permits that may go out back to back after an idle spell.
    pub burst: u32,
    /// The window the send log enforces the limit over: 1 s + slack.
    pub window: Duration,
}

impl Pacing {
    /// The pacing for `limit_per_sec` with `slack` kept free in every window.
    pub fn for_limit(limit_per_sec: NonZeroU32, slack: Duration) -> Pacing {
        let limit = u64::from(limit_per_sec.get());
        let window = Duration::from_secs(1) + slack;
        // Round the period up: rounding down would pace a little above the limit.
        let period_ns = (window.as_nanos() as u64).div_ceil(limit);
        // Enough permits to make up for a dispatcher that wakes up to CATCH_UP late.
        let burst = (CATCH_UP.as_nanos() as u64).div_ceil(period_ns).clamp(2, MAX_BURST);
        Pacing { period: Duration::from_nanos(period_ns), burst: burst as u32, window }
    }

    /// Permits per second this pacing yields in the long run.
    pub fn rate_per_sec(&self) -> f64 {
        1.0 / self.period.as_secs_f64()
    }
}

/// A process-wide limiter whose limit can change at run time (e.g. when several instances share
/// the global limit).
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<RwLock<Arc<Current>>>,
    slack: Duration,
    reserve: u32,
}

struct Current {
    limit: NonZeroU32,
    /// Sends allowed per window: the limit less the reserve's places.
    capacity: NonZeroU32,
    pacing: Pacing,
    limiter: DefaultDirectRateLimiter,
    window: SendWindow,
}

/// The instants of the last `limit` sends.
struct SendWindow {
    limit: usize,
    length: Duration,
    /// Places taken from the first window after the log was empty (see [`COLD_START_SLACK`]).
    cold_start: usize,
    /// How admissions are spaced (see [`SPREAD`]); none at high limits.
    spread: Option<Spread>,
    log: Mutex<SendLog>,
}

/// The spacing of admissions, GCRA-style: `every` apart in the long run, and up to `ahead` of
/// that schedule back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spread {
    every: Duration,
    ahead: Duration,
}

impl Spread {
    /// The spread for a pacing `period`; none where it would space by less than [`SPREAD_MIN`].
    fn for_period(period: Duration) -> Option<Spread> {
        let every = period / SPREAD;
        (every >= SPREAD_MIN)
            .then(|| Spread { every, ahead: (every * (SPREAD_BURST - 1)).max(SPREAD_BURST_TIME) })
    }
}

/// Sends in the current window, oldest first, and the places a cold start holds.
#[derive(Default, Clone)]
struct SendLog {
    /// Grown as sends come, never reserved for the limit: the benchmark's "no limit" is
    /// 1,000,000/s, and a ring buffer reserved for that had its tail walk the whole
    /// reservation, touching 16 MiB of pages while it held a few thousand sends.
    sends: VecDeque<Instant>,
    /// Since when, and how many, places are held for sends that never happen (a count, not
    /// entries: a high limit holds many).
    held: Option<(Instant, usize)>,
    /// When the next admission is due by the spread (a theoretical arrival time, as in GCRA).
    spread_due: Option<Instant>,
}

impl SendLog {
    /// Forgets the sends and held places older than `length` at `now`.
    fn age(&mut self, now: Instant, length: Duration) {
        while self.sends.front().is_some_and(|&t| now.duration_since(t) >= length) {
            self.sends.pop_front();
        }
        if self.held.is_some_and(|(t, _)| now.duration_since(t) >= length) {
            self.held = None;
        }
    }

    /// Places taken in the current window.
    fn taken(&self) -> usize {
        self.sends.len() + self.held.map_or(0, |(_, n)| n)
    }

    /// The oldest place taken: held places are never younger than a send.
    fn oldest(&self) -> Option<Instant> {
        self.held.map(|(t, _)| t).or_else(|| self.sends.front().copied())
    }

    /// Records a send at `at`, keeping the log in time order (a departure can be noted after a
    /// later admission).
    fn record(&mut self, at: Instant) {
        let index = self.sends.partition_point(|&t| t <= at);
        self.sends.insert(index, at);
    }

    /// Moves a send recorded at `admitted` to `departed`. If it has already left the log (it
    /// left more than a window after its admission), the departure is recorded all the same.
    fn move_send(&mut self, admitted: Instant, departed: Instant) {
        let index = self.sends.partition_point(|&t| t < admitted);
        if self.sends.get(index) == Some(&admitted) {
            self.sends.remove(index);
        }
        self.record(departed);
    }
}

impl SendWindow {
    fn lock(&self) -> std::sync::MutexGuard<'_, SendLog> {
        match self.log.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sends within the window at `now`, and how long until the newest leaves it.
    fn recent(&self, now: Instant) -> (usize, Duration) {
        let mut log = self.lock();
        log.age(now, self.length);
        let until = log
            .sends
            .back()
            .map_or(Duration::ZERO, |&t| (t + self.length).saturating_duration_since(now));
        (log.sends.len(), until)
    }

    /// Records a send now if it fits, or says how long to wait.
    fn try_admit(&self, now: Instant) -> Result<(), Duration> {
        let mut log = self.lock();
        log.age(now, self.length);
        if log.taken() == 0 && self.cold_start > 0 {
            // A cold start: hold places for sends that never happen, so the first window
            // carries `cold_start` fewer requests.
            log.held = Some((now, self.cold_start));
        }
        if log.taken() < self.limit {
            if let Some(spread) = self.spread {
                // GCRA: due advances by `every` an admission and may run `ahead` of now.
                let due = log.spread_due.map_or(now, |d| d.max(now));
                if due > now + spread.ahead {
                    return Err(due - spread.ahead - now);
                }
                log.spread_due = Some(due + spread.every);
            }
            log.record(now);
            return Ok(());
        }
        let oldest = log.oldest().unwrap_or(now);
        Err((oldest + self.length).saturating_duration_since(now).max(Duration::from_micros(100)))
    }
}

/// Places of every window a reserve of `reserve` per [`RESERVE_PER`] keeps free at `limit`:
/// rounded down, so a share of the limit never keeps more than its share of the reserve, and at
/// least one place is always left to send in.
fn reserve_places(limit: NonZeroU32, reserve: u32) -> u32 {
    let places = u64::from(limit.get()) * u64::from(reserve) / u64::from(RESERVE_PER);
    u32::try_from(places).unwrap_or(u32::MAX).min(limit.get() - 1)
}

/// Places a cold start holds back: the sends of [`COLD_START_SLACK`] at `limit`, rounded down
/// (none below 34/s, where it would round a window's capacity away).
fn cold_start_places(limit: NonZeroU32) -> usize {
    (u128::from(limit.get()) * COLD_START_SLACK.as_nanos() / 1_000_000_000) as usize
}

impl Current {
    fn new(limit: NonZeroU32, slack: Duration, reserve: u32) -> Current {
        let capacity = NonZeroU32::new(limit.get() - reserve_places(limit, reserve))
            .unwrap_or(NonZeroU32::MIN);
        // Paced at what the send log lets through, so that permits do not queue at the log and
        // leave in clumps when it frees places.
        let pacing = Pacing::for_limit(capacity, slack);
        let quota = Quota::with_period(pacing.period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(pacing.burst).unwrap_or(NonZeroU32::MIN));
        let window = SendWindow {
            limit: capacity.get() as usize,
            length: pacing.window,
            cold_start: cold_start_places(limit),
            spread: Spread::for_period(pacing.period),
            log: Mutex::new(SendLog::default()),
        };
        Current {
            limit,
            capacity,
            pacing,
            limiter: DefaultDirectRateLimiter::direct(quota),
            window,
        }
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cur = self.current();
        f.debug_struct("RateLimiter")
            .field("limit_per_sec", &cur.limit)
            .field("capacity", &cur.capacity)
            .field("pacing", &cur.pacing)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `limit_per_sec` that keeps `slack` of every window and `reserve` places per
    /// [`RESERVE_PER`] of the limit free.
    pub fn new(limit_per_sec: NonZeroU32, slack: Duration, reserve: u32) -> RateLimiter {
        let current = Current::new(limit_per_sec, slack, reserve);
        RateLimiter { inner: Arc::new(RwLock::new(Arc::new(current))), slack, reserve }
    }

    fn current(&self) -> Arc<Current> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn limit_per_sec(&self) -> NonZeroU32 {
        self.current().limit
    }

    pub fn pacing(&self) -> Pacing {
        self.current().pacing
    }

    /// Sends the send log lets through in any window of `1 s + slack`: the limit less the
    /// reserve.
    pub fn capacity(&self) -> NonZeroU32 {
        self.current().capacity
    }

    /// Changes the limit (an instance's share of the global limit follows the partitions it
    /// holds). The send log carries over, so the new limit counts the sends already made in the
    /// current window: lowering the limit holds sends back until the window has room, and no
    /// change ever lets a burst through.
    pub fn set_limit(&self, limit_per_sec: NonZeroU32) {
        let previous = self.current();
        if previous.limit == limit_per_sec {
            return;
        }
        let next = Current::new(limit_per_sec, self.slack, self.reserve);
        *next.window.lock() = previous.window.lock().clone();
        let next = Arc::new(next);
        match self.inner.write() {
            Ok(mut g) => *g = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// Waits for one permit (the dispatcher, before handing a request to a sender).
    pub async fn acquire(&self) {
        let current = self.current();
        current.limiter.until_ready().await;
    }

    /// Waits until one more send keeps every window of `1 s + slack` at or under the
    /// limit, and records the send (the sender, right before the request leaves). Returns the
    /// time it was recorded at, for [`RateLimiter::departed`].
    pub async fn admit(&self) -> Instant {
        let current = self.current();
        loop {
            let now = Instant::now();
            match current.window.try_admit(now) {
                Ok(()) => return now,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// What this process has sent within the last window (`1 s + slack`): the count, and how
    /// long until the newest of those sends leaves the window (zero with none). Other instances
    /// sharing the global limit read it from this process's heartbeat: after a lowered share,
    /// a campaign's end or a move to another campaign, these sends still count at Money.
    pub fn recent_sends(&self) -> (usize, Duration) {
        self.current().window.recent(Instant::now())
    }

    /// Notes that the send admitted at `admitted` left at `departed`. A departure more than
    /// [`DEPARTURE_TOLERANCE`] late moves the send to it, so the windows that follow count it
    /// where it really was. Only the admission's own time is looked for: two sends recorded at
    /// the same instant are the same to the log.
    pub fn departed(&self, admitted: Instant, departed: Instant) {
        if departed.saturating_duration_since(admitted) <= DEPARTURE_TOLERANCE {
            return;
        }
        self.current().window.lock().move_send(admitted, departed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// An empty send log over one second.
    fn window(limit: usize, cold_start: usize) -> SendWindow {
        SendWindow {
            limit,
            length: Duration::from_secs(1),
            cold_start,
            spread: None,
            log: Mutex::new(SendLog::default()),
        }
    }

    #[test]
    fn pacing_keeps_99_percent_of_the_limit_with_the_default_slack_and_reserve() {
        for limit in [1, 10, 200, 1000, 5000, 20_000] {
            let limiter = RateLimiter::new(nz(limit), DEFAULT_SLACK, DEFAULT_RESERVE);
            let share = limiter.pacing().rate_per_sec() / f64::from(limit);
            // 1 / 1.004 with no place reserved (below 500/s), 0.998 / 1.004 from 1,000/s.
            assert!((0.993..=0.997).contains(&share), "limit {limit}: {share}");
            assert!(limiter.pacing().rate_per_sec() <= f64::from(limiter.capacity().get()));
        }
        // At 1,000/s the defaults pace as 6 ms of slack alone would (994/s): enough for 200,000
        // rows at Money's 200 ± 100 ms within 99 % of the limit (BENCHMARKS.md, session 17).
        let limiter = RateLimiter::new(nz(1000), DEFAULT_SLACK, DEFAULT_RESERVE);
        assert_eq!(limiter.capacity().get(), 998);
        assert!(limiter.pacing().rate_per_sec() >= 993.5, "{:?}", limiter.pacing());
        let old = Pacing::for_limit(nz(1000), Duration::from_millis(6)).rate_per_sec();
        assert!((limiter.pacing().rate_per_sec() - old).abs() < 0.05);
    }

    #[test]
    fn the_reserve_scales_with_the_limit_and_leaves_a_place() {
        assert_eq!(reserve_places(nz(1000), 2), 2);
        assert_eq!(reserve_places(nz(5000), 2), 10);
        // Two instances sharing 1,000/s keep one place each; four keep none (rounded down).
        assert_eq!(reserve_places(nz(500), 2), 1);
        assert_eq!(reserve_places(nz(250), 2), 0);
        assert_eq!(reserve_places(nz(1000), 0), 0);
        // Never the whole window.
        assert_eq!(reserve_places(nz(10), 1000), 9);
        assert_eq!(reserve_places(nz(1), 1000), 0);
        assert_eq!(reserve_places(nz(u32::MAX), 1000), u32::MAX - 1);
    }

    /// The most arrivals in any half-open one-second window (Money's count).
    fn densest_second(arrivals: &mut [Duration]) -> usize {
        densest(arrivals, Duration::from_secs(1))
    }

    /// The most of `times` within any `span`.
    fn densest(times: &mut [Duration], span: Duration) -> usize {
        times.sort();
        let mut most = 0;
        let mut first = 0;
        for (last, &at) in times.iter().enumerate() {
            while at - times[first] >= span {
                first += 1;
            }
            most = most.max(last - first + 1);
        }
        most
    }

    /// Sends as fast as the send log allows for five seconds, a window's worth at once (the
    /// worst case for Money's count; no cold start): each arrives 0-6 ms after it was admitted,
    /// except `stragglers` requests of the third second, which arrive 38 ms late.
    fn arrivals_with_stragglers(reserve: u32, stragglers: usize) -> Vec<Duration> {
        let slack = Duration::from_millis(6);
        let mut current = Current::new(nz(1000), slack, reserve);
        current.window.cold_start = 0;
        // Without the spread, which only narrows what a window may carry at once.
        current.window.spread = None;
        let t0 = Instant::now();
        let mut arrivals = Vec::new();
        let mut seed = 12345u64;
        let mut held = 0;
        for step in 0..50_000u64 {
            let now = t0 + Duration::from_micros(step * 100);
            while current.window.try_admit(now).is_ok() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let mut transit = Duration::from_micros((seed >> 33) % 6001);
                if held < stragglers && now - t0 >= Duration::from_secs(2) {
                    held += 1;
                    transit = Duration::from_millis(38);
                }
                arrivals.push(now - t0 + transit);
            }
        }
        assert_eq!(held, stragglers);
        arrivals
    }

    #[test]
    fn reserved_places_absorb_requests_held_up_after_they_left() {
        // Transit within the slack never overfills a second at Money.
        assert_eq!(densest_second(&mut arrivals_with_stragglers(0, 0)), 1000);
        // Without a reserve, one request held up longer than the slack lands in a second that
        // the log filled: Money would answer 429.
        assert!(densest_second(&mut arrivals_with_stragglers(0, 1)) > 1000);
        // Two reserved places absorb up to two such requests in one second, not three.
        assert!(densest_second(&mut arrivals_with_stragglers(2, 1)) <= 1000);
        assert!(densest_second(&mut arrivals_with_stragglers(2, 2)) <= 1000);
        assert!(densest_second(&mut arrivals_with_stragglers(2, 3)) > 1000);
    }

    #[test]
    fn places_freed_at_once_are_taken_at_twice_the_pace_at_most() {
        // Senders that always wait on the log (the worst case: a burst at the start, and the
        // places it frees a window later) get a window's capacity a window, never more than
        // SPREAD_BURST + 2 a millisecond, and the shape does not come back as a burst.
        let mut current = Current::new(nz(1000), DEFAULT_SLACK, DEFAULT_RESERVE);
        current.window.cold_start = 0;
        let period = current.pacing.period;
        let t0 = Instant::now();
        let mut admitted = Vec::new();
        for step in 0..30_120u64 {
            let now = t0 + Duration::from_micros(step * 100);
            while current.window.try_admit(now).is_ok() {
                admitted.push(now - t0);
            }
        }
        // Three windows of 1.004 s: 998 places each.
        assert_eq!(admitted.len(), 3 * 998);
        let spread = current.window.spread.expect("a spread at 1,000/s").every;
        assert_eq!(spread, period / SPREAD);
        assert_eq!(densest(&mut admitted, Duration::from_micros(100)), SPREAD_BURST as usize);
        let per_5ms = densest(&mut admitted, Duration::from_millis(5));
        let bound = SPREAD_BURST as usize
            + (Duration::from_millis(5).as_nanos() / spread.as_nanos()) as usize;
        assert!(per_5ms <= bound, "{per_5ms} admitted within 5 ms, bound {bound}");
        // At a high limit a millisecond's worth goes out back to back; above some 50,000/s
        // there is no spread.
        let mut high = Current::new(nz(20_000), DEFAULT_SLACK, DEFAULT_RESERVE);
        high.window.cold_start = 0;
        let back_to_back = (0..5_000).take_while(|_| high.window.try_admit(t0).is_ok()).count();
        let every = high.window.spread.expect("a spread at 20,000/s").every;
        let expected = (SPREAD_BURST_TIME.as_nanos() / every.as_nanos()) as usize + 1;
        assert_eq!(back_to_back, expected);
        assert!(
            Current::new(nz(1_000_000), DEFAULT_SLACK, DEFAULT_RESERVE).window.spread.is_none()
        );
        // The spread costs nothing when senders come at the pace.
        let mut spread_free = Current::new(nz(1000), DEFAULT_SLACK, DEFAULT_RESERVE);
        spread_free.window.cold_start = 0;
        for n in 0..5_000u32 {
            assert_eq!(spread_free.window.try_admit(t0 + period * n), Ok(()), "send {n}");
        }
    }

    #[test]
    fn the_send_log_refuses_a_send_that_would_overfill_a_window() {
        let w = window(3, 0);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(w.try_admit(ms(0)), Ok(()));
        assert_eq!(w.try_admit(ms(10)), Ok(()));
        assert_eq!(w.try_admit(ms(20)), Ok(()));
        assert_eq!(w.try_admit(ms(500)), Err(Duration::from_millis(500)));
        assert_eq!(w.try_admit(ms(999)), Err(Duration::from_millis(1)));
        assert_eq!(w.try_admit(ms(1000)), Ok(()));
        assert_eq!(w.try_admit(ms(1005)), Err(Duration::from_millis(5)));
    }

    #[test]
    fn a_cold_start_holds_places_back_for_one_window() {
        let w = window(10, 3);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // The first window after an empty log carries 10 - 3 sends.
        for n in 0..7 {
            assert_eq!(w.try_admit(ms(n)), Ok(()), "send {n}");
        }
        assert_eq!(w.try_admit(ms(100)), Err(Duration::from_millis(900)));
        // Once the held places age out with the send at 0 ms, the window is whole again: six
        // sends of 1-6 ms are still in it, so four more fit.
        for n in 0..4 {
            assert_eq!(w.try_admit(ms(1000)), Ok(()), "send {n} after the held places");
        }
        assert!(w.try_admit(ms(1000)).is_err());
        // After a pause longer than the window, the next start is cold again.
        for n in 0..7 {
            assert_eq!(w.try_admit(ms(3000)), Ok(()), "send {n} after a pause");
        }
        assert!(w.try_admit(ms(3000)).is_err());
    }

    #[test]
    fn a_send_that_left_late_counts_from_when_it_left() {
        let w = window(3, 0);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        for n in [0, 10, 20] {
            assert_eq!(w.try_admit(ms(n)), Ok(()));
        }
        // The send admitted at 0 went on the wire at 15: the window is full until 1010, then
        // has room for one until 1015, when the late send ages out.
        w.lock().move_send(ms(0), ms(15));
        assert_eq!(w.try_admit(ms(1000)), Err(Duration::from_millis(10)));
        assert_eq!(w.try_admit(ms(1010)), Ok(()));
        assert_eq!(w.try_admit(ms(1012)), Err(Duration::from_millis(3)));
        assert_eq!(w.try_admit(ms(1015)), Ok(()));
        let log: Vec<_> = w.lock().sends.iter().map(|&t| t - t0).collect();
        assert_eq!(log, [20, 1010, 1015].map(Duration::from_millis));
    }

    #[test]
    fn a_departure_is_recorded_even_after_its_admission_aged_out() {
        let w = window(3, 0);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(w.try_admit(ms(0)), Ok(()));
        assert_eq!(w.try_admit(ms(1500)), Ok(()));
        // Aged out at 1500; it left at 1400, so it still counts in the window.
        w.lock().move_send(ms(0), ms(1400));
        let log: Vec<_> = w.lock().sends.iter().map(|&t| t - t0).collect();
        assert_eq!(log, [1400, 1500].map(Duration::from_millis));
    }

    #[tokio::test]
    async fn only_departures_later_than_the_tolerance_move_a_send() {
        let limiter = RateLimiter::new(nz(10), Duration::ZERO, 0);
        let first = limiter.admit().await;
        let second = limiter.admit().await;
        limiter.departed(first, first + DEPARTURE_TOLERANCE);
        limiter.departed(second, second + Duration::from_millis(5));
        let log: Vec<_> = limiter.current().window.lock().sends.iter().copied().collect();
        assert_eq!(log, [first, second + Duration::from_millis(5)]);
    }

    #[test]
    fn recent_sends_are_counted_until_the_newest_leaves_the_window() {
        let w = window(100, 3);
        let t0 = Instant::now();
        assert_eq!(w.recent(t0), (0, Duration::ZERO));
        for i in 0..5 {
            w.try_admit(t0 + Duration::from_millis(100 * i)).unwrap();
        }
        // Sent at 0, 100, …, 400 ms; the places a cold start holds are not sends.
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(w.recent(ms(500)), (5, Duration::from_millis(900)));
        assert_eq!(w.recent(ms(1200)), (2, Duration::from_millis(200)));
        assert_eq!(w.recent(ms(1400)), (0, Duration::ZERO));
    }

    #[test]
    fn cold_start_places_follow_the_limit() {
        assert_eq!(cold_start_places(nz(1000)), 30);
        assert_eq!(cold_start_places(nz(100)), 3);
        assert_eq!(cold_start_places(nz(33)), 0);
        assert_eq!(cold_start_places(nz(1)), 0);
    }

    #[tokio::test]
    async fn the_send_log_grows_with_the_sends_not_with_the_limit() {
        // Reserving the log for the limit up front would ask for 64 GiB here.
        let limiter = RateLimiter::new(nz(u32::MAX), DEFAULT_SLACK, DEFAULT_RESERVE);
        for _ in 0..1000 {
            limiter.admit().await;
        }
        let capacity = limiter.current().window.lock().sends.capacity();
        assert!((1000..4096).contains(&capacity), "{capacity}");
        limiter.set_limit(nz(u32::MAX - 1));
        let capacity = limiter.current().window.lock().sends.capacity();
        assert!((1000..4096).contains(&capacity), "after a new limit: {capacity}");
    }

    #[tokio::test]
    async fn a_lowered_limit_counts_the_sends_already_made() {
        let limiter = RateLimiter::new(nz(1000), Duration::ZERO, 0);
        for _ in 0..100 {
            limiter.admit().await;
        }
        limiter.set_limit(nz(100));
        let start = std::time::Instant::now();
        limiter.admit().await;
        // The window already holds 100 sends: the next one waits for the oldest to age out.
        assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_dispatcher_stopped_for_30_ms_catches_up_the_permits_it_missed() {
        let limiter = RateLimiter::new(nz(1000), DEFAULT_SLACK, DEFAULT_RESERVE);
        let p = limiter.pacing();
        assert!(p.burst >= 40, "{p:?}");
        // Spend the initial burst, so that the count below starts from a steady pace.
        for _ in 0..p.burst {
            limiter.acquire().await;
        }
        let start = std::time::Instant::now();
        let mut permits = 0u32;
        while start.elapsed() < Duration::from_millis(1200) {
            limiter.acquire().await;
            permits += 1;
            if permits % 200 == 0 {
                // The dispatcher's thread is taken away mid-step (a hypervisor's stall).
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        // Five stalls of 30 ms would cost some 100 permits with only 10 ms of catch-up.
        let due = start.elapsed().as_secs_f64() * p.rate_per_sec();
        assert!(f64::from(permits) >= due - 15.0, "{permits} permits, {due:.0} due");
        assert!(f64::from(permits) <= due + 1.0, "{permits} permits, {due:.0} due");
    }

    #[tokio::test]
    async fn permits_are_spaced_by_the_period() {
        let limiter = RateLimiter::new(nz(200), DEFAULT_SLACK, DEFAULT_RESERVE);
        let p = limiter.pacing();
        let start = std::time::Instant::now();
        for _ in 0..(p.burst + 20) {
            limiter.acquire().await;
        }
        // 20 permits past the burst need at least 19 periods.
        assert!(start.elapsed() >= p.period * 19, "{:?}", start.elapsed());
    }
}
