//! Per-export QoS: IOPS and bandwidth limits enforced with token buckets.
//!
//! This module owns the limiter state of each export: one [`Limiter`] holds an IOPS bucket
//! and a bandwidth bucket, shared by every connection to that export. Requests *wait* for
//! their tokens (they never fail because of QoS).
//!
//! The buckets use a "reserve, then wait out the debt" scheme: a request takes its tokens
//! at once, even if that drives the balance negative, and sleeps until the balance it left
//! behind would have been refilled. So a request larger than the burst (a 32 MiB write
//! under a 1 MiB/s limit) still passes, waiters are served in arrival order without a
//! queue, and the long-run rate is exactly the limit.
//!
//! Invariants:
//! - a limit of 0 means unlimited: no tokens are counted and nothing waits;
//! - the balance never exceeds the burst (`rate * BURST_WINDOW`, at least one request's
//!   worth for IOPS), so an idle export cannot bank more than a short burst;
//! - limits are read on every request ([`Limiter::admit`] takes the current [`Qos`]), so a
//!   change applies to the next request; requests already waiting keep their computed wait.
//!
//! The bucket arithmetic ([`TokenBucket`]) takes the time as a parameter and does no I/O,
//! so it is tested with a fake clock.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How much an idle bucket may accumulate, as time at the configured rate. Short, so
/// that a measured rate over a few seconds stays within a few percent of the limit.
pub const BURST_WINDOW: Duration = Duration::from_millis(100);

/// QoS limits of an export. Zero means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Qos {
    /// Maximum I/O operations per second.
    pub max_iops: u64,
    /// Maximum bytes per second (read and write payloads).
    pub max_bandwidth_bytes: u64,
}

impl Qos {
    pub const UNLIMITED: Qos = Qos {
        max_iops: 0,
        max_bandwidth_bytes: 0,
    };

    pub fn is_unlimited(&self) -> bool {
        self.max_iops == 0 && self.max_bandwidth_bytes == 0
    }
}

/// A token bucket refilled at `rate` tokens per second, up to a burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second; 0 = unlimited.
    rate: u64,
    /// Maximum balance.
    burst: f64,
    /// Current balance; negative while requests wait for tokens they already took.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` tokens per second (0 = unlimited).
    pub fn new(rate: u64, now: Instant) -> Self {
        let burst = burst_for(rate, 1);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Current balance (for tests and metrics).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    /// Takes `cost` tokens at time `now` under the current `rate` and returns how long the
    /// caller must wait before proceeding. `min_burst` is the smallest burst allowed (one
    /// request's worth for IOPS), so that a tiny rate still admits a request per period.
    pub fn reserve(&mut self, rate: u64, min_burst: u64, cost: u64, now: Instant) -> Duration {
        self.refill(now);
        if rate != self.rate {
            // Tokens up to `now` were earned at the old rate (refill above); from here on
            // the new rate applies and the balance must fit the new burst.
            let was_unlimited = self.rate == 0;
            self.rate = rate;
            self.burst = burst_for(rate, min_burst);
            // Coming from "unlimited" the bucket is full; otherwise the balance (debt
            // included) carries over, capped by the new burst.
            self.tokens = if was_unlimited {
                self.burst
            } else {
                self.tokens.min(self.burst)
            };
        }
        if rate == 0 {
            // Unlimited: keep the bucket full so that a later limit starts with a burst.
            self.tokens = self.burst;
            return Duration::ZERO;
        }
        self.tokens -= cost as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate as f64)
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        if self.rate > 0 {
            self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate as f64).min(self.burst);
        }
    }
}

fn burst_for(rate: u64, min_burst: u64) -> f64 {
    (rate as f64 * BURST_WINDOW.as_secs_f64()).max(min_burst as f64)
}

/// The QoS state of one export: an IOPS bucket and a bandwidth bucket.
#[derive(Debug)]
pub struct Limiter {
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    iops: TokenBucket,
    bandwidth: TokenBucket,
}

impl Limiter {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            buckets: Mutex::new(Buckets {
                iops: TokenBucket::new(0, now),
                bandwidth: TokenBucket::new(0, now),
            }),
        }
    }

    /// Reserves one operation of `bytes` payload bytes under `limits` at `now`; returns
    /// how long the request must wait.
    pub fn reserve(&self, limits: Qos, bytes: u64, now: Instant) -> Duration {
        let mut b = self.buckets.lock();
        let wait_iops = b.iops.reserve(limits.max_iops, 1, 1, now);
        let wait_bw = b
            .bandwidth
            .reserve(limits.max_bandwidth_bytes, 1, bytes, now);
        wait_iops.max(wait_bw)
    }

    /// Waits until one operation of `bytes` payload bytes may proceed under `limits`.
    pub async fn admit(&self, limits: Qos, bytes: u64) {
        // The tokio clock, so that tests with a paused runtime clock see consistent time.
        let now = tokio::time::Instant::now().into_std();
        let wait = self.reserve(limits, bytes, now);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, t0);
        for i in 0..1000 {
            assert_eq!(b.reserve(0, 1, 1 << 30, t0 + i * MS), Duration::ZERO);
        }
    }

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        // Burst: 100 ms at 1000/s = 100 tokens, taken without waiting.
        for _ in 0..100 {
            assert_eq!(b.reserve(1000, 1, 1, t0), Duration::ZERO);
        }
        // The next one waits one token period (1 ms), the one after two.
        assert_eq!(b.reserve(1000, 1, 1, t0), MS);
        assert_eq!(b.reserve(1000, 1, 1, t0), 2 * MS);
        // 10 ms later, 10 tokens were refilled: the debt of 2 is paid and 8 remain.
        assert_eq!(b.reserve(1000, 1, 1, t0 + 10 * MS), Duration::ZERO);
        assert!((b.tokens() - 7.0).abs() < 1e-6);
    }

    #[test]
    fn long_run_rate_matches_limit() {
        // Simulate a client that always has a request ready: each request starts when the
        // previous one's wait ends. Over 3 s at 500/s it gets 1500 + burst (50).
        let t0 = Instant::now();
        let mut b = TokenBucket::new(500, t0);
        let mut now = t0;
        let mut done = 0u64;
        while now < t0 + Duration::from_secs(3) {
            now += b.reserve(500, 1, 1, now);
            done += 1;
        }
        assert!((1549..=1551).contains(&done), "{done}");
    }

    #[test]
    fn refill_is_capped_by_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        // Idle for an hour: still only a 100 ms burst (10 tokens).
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.reserve(100, 1, 10, later), Duration::ZERO);
        assert_eq!(b.reserve(100, 1, 1, later), 10 * MS);
    }

    #[test]
    fn oversized_request_passes_after_waiting_its_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0); // 1 MiB/s, burst 100 KiB
        let wait = b.reserve(1 << 20, 1, 32 << 20, t0);
        // 32 MiB minus the 0.1 MiB burst at 1 MiB/s.
        assert!((wait.as_secs_f64() - 31.9).abs() < 1e-3, "{wait:?}");
    }

    #[test]
    fn small_rates_keep_a_one_request_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, t0);
        assert_eq!(b.reserve(2, 1, 1, t0), Duration::ZERO);
        assert_eq!(b.reserve(2, 1, 1, t0), Duration::from_millis(500));
    }

    #[test]
    fn rate_change_applies_to_next_request() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        for _ in 0..100 {
            b.reserve(1000, 1, 1, t0);
        }
        // Lowered to 10/s: the burst shrinks to 1 and the empty bucket refills at 10/s.
        assert_eq!(b.reserve(10, 1, 1, t0), Duration::from_millis(100));
        // Raised to unlimited: no wait, and the bucket is full when a limit comes back.
        assert_eq!(b.reserve(0, 1, 1, t0), Duration::ZERO);
        for _ in 0..100 {
            assert_eq!(b.reserve(1000, 1, 1, t0), Duration::ZERO);
        }
        assert_eq!(b.reserve(1000, 1, 1, t0), MS);
    }

    #[test]
    fn limiter_waits_for_the_stricter_bucket() {
        let l = Limiter::new();
        let t0 = Instant::now();
        let limits = Qos {
            max_iops: 1000,
            max_bandwidth_bytes: 4096 * 10,
        };
        // First request from a fresh limiter: the bandwidth bucket starts at 0 limit
        // (unlimited) and switches to 40 KiB/s with a 4 KiB burst.
        assert_eq!(l.reserve(limits, 4096, t0), Duration::ZERO);
        // Second 4 KiB: bandwidth-bound, 100 ms; IOPS alone would need nothing.
        assert_eq!(l.reserve(limits, 4096, t0), Duration::from_millis(100));
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(10, t0);
        assert_eq!(
            b.reserve(10, 1, 1, t0 - Duration::from_secs(5)),
            Duration::ZERO
        );
        assert_eq!(b.reserve(10, 1, 1, t0), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn admit_sleeps_on_the_tokio_clock() {
        let l = Limiter::new();
        let limits = Qos {
            max_iops: 10,
            max_bandwidth_bytes: 0,
        };
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            l.admit(limits, 0).await;
        }
        // Burst of 1 (10/s * 100 ms), then 10 more at 100 ms each.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_millis(1010),
            "{elapsed:?}"
        );
    }
}
