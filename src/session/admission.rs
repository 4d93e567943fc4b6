//! `SessionAdmission`: the bounds on creating sessions, `session.max_sessions` (table cap)
//! and `session.create_rate` (a token bucket per client IP, IPv6 per /64).
//!
//! Only a request for a session the table does not hold asks here; established sessions
//! never pay for it. The bucket map is bounded ([`MAX_TRACKED_CLIENTS`]): a full bucket
//! carries no information, so when the map is full those are evicted first; if every
//! tracked client is still limited, new clients share one overflow bucket rather than grow
//! the map. The map sits behind a std `Mutex`: it is held for a few arithmetic steps, never
//! across an await, and only on the new-session path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{CreateRate, SessionConfig};
use crate::lock::MutexExt;

/// Most client buckets kept (about 40 B each: 2.5 MiB at most).
pub const MAX_TRACKED_CLIENTS: usize = 65_536;

/// Why a new session was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The table holds `session.max_sessions` sessions (503 `session_limit`).
    #[error("the activator holds its maximum of {0} sessions; retry later")]
    SessionLimit(usize),
    /// This client created sessions faster than `session.create_rate` (429 `rate_limited`).
    #[error("too many new sessions from this client; retry later")]
    RateLimited {
        /// When the next token is due.
        retry_after: Duration,
    },
}

/// The new-session gate.
pub struct SessionAdmission {
    max_sessions: usize,
    rate: Option<Buckets>,
}

impl SessionAdmission {
    /// Builds the gate from `session.*`.
    pub fn new(config: &SessionConfig) -> SessionAdmission {
        SessionAdmission {
            max_sessions: config.max_sessions,
            rate: config.create_rate.map(Buckets::new),
        }
    }

    /// Admits a new session for `client` while the table holds `sessions`. The cap is
    /// checked first so a refused-for-capacity request does not spend a rate token.
    pub fn admit(&self, client: IpAddr, sessions: usize) -> Result<(), AdmissionError> {
        if sessions >= self.max_sessions {
            return Err(AdmissionError::SessionLimit(self.max_sessions));
        }
        match &self.rate {
            Some(b) => b.take(client, Instant::now()),
            None => Ok(()),
        }
    }

    /// Clients with a bucket (for tests and diagnostics).
    pub fn tracked_clients(&self) -> usize {
        self.rate.as_ref().map_or(0, Buckets::len)
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

struct Buckets {
    per_second: f64,
    burst: f64,
    state: Mutex<BucketMap>,
}

struct BucketMap {
    map: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
    /// Eviction scans the whole map: at most once per [`PURGE_INTERVAL`], so a flood of
    /// new addresses cannot make every request pay for a scan.
    last_purge: Option<Instant>,
}

const PURGE_INTERVAL: Duration = Duration::from_secs(1);

impl Buckets {
    fn new(rate: CreateRate) -> Buckets {
        Buckets {
            per_second: rate.per_second,
            burst: f64::from(rate.burst),
            state: Mutex::new(BucketMap {
                map: HashMap::new(),
                overflow: None,
                last_purge: None,
            }),
        }
    }

    fn len(&self) -> usize {
        self.lock().map.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BucketMap> {
        // A panic while holding it cannot leave a bucket half-updated in a harmful way.
        self.state.lock_recovered()
    }

    fn take(&self, client: IpAddr, now: Instant) -> Result<(), AdmissionError> {
        let client = bucket_key(client);
        let mut st = self.lock();
        if !st.map.contains_key(&client)
            && st.map.len() >= MAX_TRACKED_CLIENTS
            && st
                .last_purge
                .is_none_or(|t| now.saturating_duration_since(t) >= PURGE_INTERVAL)
        {
            st.last_purge = Some(now);
            let (per_second, burst) = (self.per_second, self.burst);
            st.map
                .retain(|_, b| refill(b, now, per_second, burst) < burst);
        }
        let fresh = || Bucket {
            tokens: self.burst,
            updated: now,
        };
        let bucket = if st.map.len() < MAX_TRACKED_CLIENTS || st.map.contains_key(&client) {
            st.map.entry(client).or_insert_with(fresh)
        } else {
            st.overflow.get_or_insert_with(fresh)
        };
        let tokens = refill(bucket, now, self.per_second, self.burst);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            return Ok(());
        }
        let wait = (1.0 - tokens) / self.per_second;
        Err(AdmissionError::RateLimited {
            retry_after: Duration::from_secs_f64(wait.clamp(0.001, 86_400.0)),
        })
    }
}

/// Brings `b` up to `now` and returns its tokens.
fn refill(b: &mut Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
    b.tokens = (b.tokens + elapsed * per_second).min(burst);
    b.updated = now;
    b.tokens
}

/// IPv4 addresses count alone; IPv6 by /64 (one host usually holds a whole /64).
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> Buckets {
        Buckets::new(CreateRate { per_second, burst })
    }

    #[test]
    fn burst_then_refill() {
        let b = rate(2.0, 3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(ip, t0).unwrap();
        }
        let Err(AdmissionError::RateLimited { retry_after }) = b.take(ip, t0) else {
            panic!("fourth within the burst window must be limited");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        // Another client is unaffected.
        b.take("10.0.0.2".parse().unwrap(), t0).unwrap();
        b.take(ip, t0 + Duration::from_millis(500)).unwrap();
        assert!(b.take(ip, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let b = rate(1.0, 1);
        let t0 = Instant::now();
        b.take("2001:db8:1:2::1".parse().unwrap(), t0).unwrap();
        assert!(b.take("2001:db8:1:2::ffff".parse().unwrap(), t0).is_err());
        b.take("2001:db8:1:3::1".parse().unwrap(), t0).unwrap();
    }

    #[test]
    fn map_is_bounded_and_evicts_full_buckets() {
        let b = rate(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_CLIENTS as u32 {
            b.take(IpAddr::V4(i.into()), t0).unwrap();
        }
        assert_eq!(b.len(), MAX_TRACKED_CLIENTS);
        // All limited right now: a new client goes to the overflow bucket.
        let newcomer = IpAddr::V4(u32::MAX.into());
        b.take(newcomer, t0).unwrap();
        assert_eq!(b.len(), MAX_TRACKED_CLIENTS);
        assert!(b.take(IpAddr::V4((u32::MAX - 1).into()), t0).is_err());
        // After a refill every bucket is full again and evictable.
        let later = t0 + Duration::from_secs(1);
        b.take(newcomer, later).unwrap();
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn cap_checked_before_rate() {
        let c = SessionConfig {
            max_sessions: 2,
            create_rate: Some(CreateRate {
                per_second: 1.0,
                burst: 1,
            }),
            ..SessionConfig::default()
        };
        let a = SessionAdmission::new(&c);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(a.admit(ip, 2), Err(AdmissionError::SessionLimit(2)));
        a.admit(ip, 1).unwrap();
        assert!(matches!(
            a.admit(ip, 1),
            Err(AdmissionError::RateLimited { .. })
        ));
    }
}
