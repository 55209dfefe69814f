//! The client-side request pace for one Lever account: a token bucket shared by every task of
//! the process, with additive-increase / multiplicative-decrease when Lever answers 429.
//!
//! It owns only timing; it never sends a request.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Lever's documented steady rate per API key is 10 requests/second with bursts to 20. We pace
/// at the steady rate with a small burst of our own: Lever's burst of 20 absorbs network jitter,
/// and a 429 still halves the pace (see `on_throttled`).
pub const DEFAULT_RATE_PER_SEC: f64 = 10.0;
/// A small burst: the pace, not the burst, is what keeps us under Lever's bucket.
pub const DEFAULT_BURST: f64 = 2.0;
/// Never slow below this after repeated 429s.
const MIN_RATE_PER_SEC: f64 = 0.5;
/// Each success wins back this much of the configured rate after a decrease.
const RECOVERY_STEP: f64 = 0.05;

#[derive(Debug)]
pub struct RateLimiter {
    /// The account's whole budget.
    account: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// This process's part of the budget: all of it, or a share when other processes (chains in
    /// other Lambda containers) use the same key at the same time.
    ceiling: f64,
    rate: f64,
    /// Tokens available now; negative when callers have reserved future slots.
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        let account = rate_per_sec.max(MIN_RATE_PER_SEC);
        let burst = burst.max(1.0);
        RateLimiter {
            account,
            burst,
            state: Mutex::new(Bucket {
                ceiling: account,
                rate: account,
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // A poisoned lock only means another task panicked mid-update of plain numbers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the next request slot. Slots are handed out in call order.
    pub async fn acquire(&self) {
        let wait = {
            let mut b = self.lock();
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + elapsed * b.rate).min(self.burst);
            b.last = now;
            b.tokens -= 1.0;
            if b.tokens >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-b.tokens / b.rate))
            }
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }

    /// Lever said we went too fast: halve the pace.
    pub fn on_throttled(&self) {
        let mut b = self.lock();
        b.rate = (b.rate / 2.0).max(MIN_RATE_PER_SEC);
        b.tokens = b.tokens.min(0.0);
    }

    /// A request went through: creep back towards the configured pace.
    pub fn on_success(&self) {
        let mut b = self.lock();
        if b.rate < b.ceiling {
            b.rate = (b.rate + RECOVERY_STEP * b.ceiling).min(b.ceiling);
        }
    }

    /// Takes a 1/`users` share of the account's budget, `users` being the processes syncing
    /// with the same key now (this one included). A pace slowed by 429s stays slowed and
    /// recovers towards the new share; an unthrottled pace moves to it at once.
    pub fn set_share(&self, users: usize) {
        let ceiling = (self.account / users.max(1) as f64).max(MIN_RATE_PER_SEC);
        let mut b = self.lock();
        let unthrottled = b.rate >= b.ceiling;
        b.ceiling = ceiling;
        b.rate = if unthrottled { ceiling } else { b.rate.min(ceiling) };
    }

    pub fn ceiling(&self) -> f64 {
        self.lock().ceiling
    }

    pub fn current_rate(&self) -> f64 {
        self.lock().rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_requests_at_the_configured_rate() {
        let l = RateLimiter::new(10.0, 1.0);
        let start = Instant::now();
        for _ in 0..21 {
            l.acquire().await;
        }
        // One slot is free at once, the other 20 come at 10 per second.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn halves_on_throttle_and_recovers_on_success() {
        let l = RateLimiter::new(8.0, 1.0);
        l.on_throttled();
        assert!((l.current_rate() - 4.0).abs() < 1e-9);
        for _ in 0..100 {
            l.on_success();
        }
        assert!((l.current_rate() - 8.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_of_the_budget_paces_at_the_share() {
        let l = RateLimiter::new(10.0, 1.0);
        l.set_share(4);
        assert!((l.current_rate() - 2.5).abs() < 1e-9);
        let start = Instant::now();
        for _ in 0..11 {
            l.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        // Throttled, then the other chains finish: the pace climbs back, not jumps.
        l.on_throttled();
        l.set_share(1);
        assert!(l.current_rate() < 2.0);
        for _ in 0..100 {
            l.on_success();
        }
        assert!((l.current_rate() - 10.0).abs() < 1e-9);
    }
}
