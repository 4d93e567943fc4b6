//! Upstream affinity: a client connection that carries one session keeps one dedicated
//! HTTP/1.1 connection to that session's sandbox, so a request needs no pool check-out.
//!
//! Every session is pinned to its sandbox, so after the first request of a client
//! connection the upstream is known: the [`Affinity`] slot on the connection holds a
//! `SendRequest` for it, tagged with the session, the sandbox and its endpoint. The rules:
//!
//! - The dedicated connection only ever carries the session it was opened for. The first
//!   request of another session on the same client connection marks the slot `Mixed`,
//!   drops the dedicated connection, and from then on every request of that client
//!   connection goes through the shared pool (as before affinity).
//! - It is dropped (and a new one opened) when the session's binding changes (a resume
//!   onto a new endpoint, a reclaim onto a new sandbox) or when the sandbox closed it. Its
//!   connection task closes it once it has sat idle for `proxy.pool_idle_timeout` (the
//!   same bound as the pool, so the sandbox's keep-alive timeout never races a reuse and
//!   an idle client connection holds no sandbox connection open).
//! - While a request is still using it (a concurrent HTTP/2 request of the same session,
//!   or a response body still streaming), other requests take the pool rather than wait.
//!
//! The slot is a std `Mutex`, taken for a few instructions and never across an `.await`;
//! on an HTTP/1.1 client connection requests are sequential, so it is never contended.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::body::RequestBody;
use crate::backend::SandboxId;
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// The dedicated upstream sender type (request bodies are the client's, streamed).
pub type Sender = SendRequest<RequestBody>;

/// One client connection's upstream affinity slot.
#[derive(Default)]
pub struct Affinity {
    slot: Mutex<Slot>,
    /// Numbers the dedicated connections this slot opens, so a connection's idle check
    /// acts only on its own one.
    opened: AtomicU64,
}

#[derive(Default)]
enum Slot {
    /// No dedicated connection (yet, or any more).
    #[default]
    Empty,
    /// Bound to one session's sandbox. `sender` is `None` while a request is opening it.
    Bound {
        session: SessionKey,
        sandbox: SandboxId,
        endpoint: SocketAddr,
        generation: u64,
        sender: Option<Sender>,
        idle_since: Instant,
    },
    /// The connection carried more than one session: the shared pool only, for good.
    Mixed,
}

/// What a request should do, decided by [`Affinity::route`].
pub enum Route {
    /// Send on this dedicated connection, then give it back with [`Affinity::put_back`].
    Dedicated(Sender),
    /// Open a dedicated connection (the slot is reserved for this session; the number
    /// identifies it to [`Affinity::expire`]), send on it, then hand it over with
    /// [`Affinity::put_back`].
    Open(u64),
    /// Use the shared pool.
    Pool,
}

impl Affinity {
    /// Decides how a request of `session`, leased to `sandbox` at `endpoint`, reaches it.
    pub fn route(
        &self,
        session: &SessionKey,
        sandbox: &SandboxId,
        endpoint: SocketAddr,
        idle_timeout: Duration,
    ) -> Route {
        let mut slot = self.slot.lock_recovered();
        match &mut *slot {
            Slot::Mixed => Route::Pool,
            Slot::Empty => self.reserve(&mut slot, session, sandbox, endpoint),
            Slot::Bound { session: bound, .. } if bound != session => {
                // A second session on this client connection: never share the dedicated
                // connection with it; the pool is keyed by endpoint, as before affinity.
                *slot = Slot::Mixed;
                Route::Pool
            }
            Slot::Bound {
                sandbox: bound_sandbox,
                endpoint: bound_endpoint,
                sender,
                idle_since,
                ..
            } => {
                let rebound = bound_sandbox != sandbox || *bound_endpoint != endpoint;
                let stale = match sender {
                    Some(s) => s.is_closed() || idle_since.elapsed() >= idle_timeout,
                    // Being opened or in use by another request of the same session.
                    None if !rebound => return Route::Pool,
                    None => false,
                };
                if rebound || stale {
                    // Dropping the old sender closes its connection once it is idle.
                    return self.reserve(&mut slot, session, sandbox, endpoint);
                }
                match sender.take_if(|s| s.is_ready()) {
                    Some(s) => Route::Dedicated(s),
                    // Still busy with an earlier response: do not wait for it.
                    None => Route::Pool,
                }
            }
        }
    }

    /// Returns a dedicated sender once its request is on its way. It is kept only if the
    /// slot is still this session's, on this binding, and free; otherwise it is dropped.
    pub fn put_back(
        &self,
        session: &SessionKey,
        sandbox: &SandboxId,
        endpoint: SocketAddr,
        sender: Sender,
    ) {
        let mut slot = self.slot.lock_recovered();
        if let Slot::Bound {
            session: bound,
            sandbox: bound_sandbox,
            endpoint: bound_endpoint,
            sender: free @ None,
            idle_since,
            ..
        } = &mut *slot
            && bound == session
            && bound_sandbox == sandbox
            && *bound_endpoint == endpoint
        {
            *free = Some(sender);
            *idle_since = Instant::now();
        }
    }

    /// Forgets a dedicated connection that failed (or could not be opened), so the next
    /// request of the session opens a fresh one. A `Mixed` slot stays mixed.
    pub fn forget(&self, session: &SessionKey) {
        let mut slot = self.slot.lock_recovered();
        if matches!(&*slot, Slot::Bound { session: bound, sender: None, .. } if bound == session) {
            *slot = Slot::Empty;
        }
    }

    /// The idle check of dedicated connection `generation`: drops it if it is idle (no
    /// request on it) and was last used `idle_timeout` ago, and returns `None`; `None`
    /// too if the slot no longer holds it (its sender is gone, so the connection ends by
    /// itself). Otherwise returns when to check again.
    pub fn expire(&self, generation: u64, idle_timeout: Duration) -> Option<Instant> {
        let mut slot = self.slot.lock_recovered();
        let Slot::Bound {
            generation: bound,
            sender,
            idle_since,
            ..
        } = &mut *slot
        else {
            return None;
        };
        if *bound != generation {
            return None;
        }
        let due = *idle_since + idle_timeout;
        match sender {
            Some(s) if s.is_ready() && Instant::now() >= due => {
                // Dropped after the lock is released: closes the idle connection.
                let expired = std::mem::take(&mut *slot);
                drop(slot);
                drop(expired);
                None
            }
            Some(s) if s.is_ready() => Some(due),
            // In use: look again one idle period from now.
            _ => Some(Instant::now() + idle_timeout),
        }
    }

    fn reserve(
        &self,
        slot: &mut Slot,
        session: &SessionKey,
        sandbox: &SandboxId,
        endpoint: SocketAddr,
    ) -> Route {
        let generation = self.opened.fetch_add(1, Ordering::Relaxed);
        *slot = Slot::Bound {
            session: session.clone(),
            sandbox: sandbox.clone(),
            endpoint,
            generation,
            sender: None,
            idle_since: Instant::now(),
        };
        Route::Open(generation)
    }
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*self.slot.lock_recovered() {
            Slot::Empty => "empty",
            Slot::Bound { sender: None, .. } => "bound (in use)",
            Slot::Bound { .. } => "bound",
            Slot::Mixed => "mixed",
        };
        f.debug_tuple("Affinity").field(&state).finish()
    }
}
