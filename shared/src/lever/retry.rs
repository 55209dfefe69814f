//! Whether and when to try a Lever request again. Pure functions of the response and the
//! attempt number, so every rule is unit-tested without a server.

use rand::Rng;
use std::time::Duration;

/// What to do with one response (or transport failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// Transient: wait and send again (429, 5xx, a dropped connection, a page cut short).
    Retry,
    /// Permanent for this request: report it.
    Fail,
}

pub fn classify_status(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Success,
        408 | 425 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Fail,
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// The most time one request may spend waiting between attempts, in all.
    pub max_total_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_total_wait: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1), or `None` when the budget
    /// is spent. A server's `Retry-After` wins over our backoff, within the same budget.
    pub fn next_wait(&self, attempt: u32, waited: Duration, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let wait = match retry_after {
            Some(d) => d.min(self.max_delay.max(Duration::from_secs(60))),
            None => {
                let exp = self
                    .base_delay
                    .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
                let cap = exp.min(self.max_delay);
                // Full jitter keeps concurrent tasks from retrying in lockstep.
                let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
                Duration::from_millis(ms)
            }
        };
        if waited + wait > self.max_total_wait {
            return None;
        }
        Some(wait)
    }
}

/// `Retry-After` as delta-seconds (the HTTP-date form is rare for APIs and is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify_status(200), Verdict::Success);
        for s in [429, 500, 502, 503, 504] {
            assert_eq!(classify_status(s), Verdict::Retry, "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert_eq!(classify_status(s), Verdict::Fail, "{s}");
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let p = RetryPolicy::default();
        let w1 = p.next_wait(1, Duration::ZERO, None).unwrap();
        assert!(w1 >= Duration::from_millis(250) && w1 <= Duration::from_millis(500));
        let w6 = p.next_wait(6, Duration::ZERO, None).unwrap();
        assert!(w6 <= p.max_delay);
        assert_eq!(p.next_wait(p.max_attempts, Duration::ZERO, None), None);
        assert_eq!(p.next_wait(2, p.max_total_wait, None), None);
    }

    #[test]
    fn retry_after_is_honoured() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.next_wait(1, Duration::ZERO, Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
