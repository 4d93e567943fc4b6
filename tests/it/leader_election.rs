//! Autoscaler leader election and schedule ticks on a `coordination.k8s.io/v1` Lease,
//! through a real kube client against kube-testbed.

use crate::kube_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent_activator::cluster::{
    Leadership, LeaseElector, LeaseTickStore, ReplicaId, TICKS_ANNOTATION, TickStore,
};
use agent_activator::server;
use chrono::{TimeZone, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_testbed::{Testbed, TestbedOptions};

use kube_support::{WAIT, client, config};

const LEASE: &str = "agent-activator-autoscaler";

async fn bare_testbed() -> Testbed {
    Testbed::start(TestbedOptions::default())
        .await
        .expect("testbed starts")
}

fn leases(tb: &Testbed) -> Api<Lease> {
    Api::namespaced(client(tb), "default")
}

fn elector(tb: &Testbed, identity: &str, lease: Duration) -> std::sync::Arc<LeaseElector> {
    LeaseElector::new(leases(tb), LEASE, &ReplicaId::named(identity), lease)
}

async fn holder(tb: &Testbed) -> (Option<String>, i32) {
    let lease = leases(tb).get(LEASE).await.expect("lease exists");
    let spec = lease.spec.unwrap_or_default();
    (spec.holder_identity, spec.lease_transitions.unwrap_or(0))
}

#[tokio::test]
async fn one_leader_and_a_lost_leader_is_replaced_without_overlap() {
    let tb = bare_testbed().await;
    let lease = Duration::from_millis(900);
    let a = elector(&tb, "replica-a", lease);
    let b = elector(&tb, "replica-b", lease);
    // Racing to create the Lease: exactly one wins.
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "exactly one leads: a={ra} b={rb}");
    let (leader, follower) = if ra { (a, b) } else { (b, a) };
    assert!(leader.is_leader() && !follower.is_leader());
    // Renewals keep it; the follower keeps following.
    assert!(leader.try_acquire_or_renew().await.unwrap());
    assert!(!follower.try_acquire_or_renew().await.unwrap());

    // The leader stops renewing (crashed, partitioned). The follower takes over only
    // after a whole lease duration without change, by which time the old leader has
    // stopped acting: at no point do both lead.
    let took_over = tokio::time::timeout(WAIT, async {
        loop {
            let now_leads = follower.try_acquire_or_renew().await.unwrap();
            assert!(
                !(leader.is_leader() && follower.is_leader()),
                "both replicas lead at once"
            );
            if now_leads {
                return;
            }
            assert!(!follower.is_leader());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(took_over.is_ok(), "the follower takes over within {WAIT:?}");
    assert!(
        !leader.is_leader(),
        "the old leader stopped acting before the takeover"
    );
    let (holder_now, transitions) = holder(&tb).await;
    assert_eq!(
        holder_now.as_deref(),
        Some(if ra { "replica-b" } else { "replica-a" })
    );
    assert_eq!(transitions, 1);
    // The old leader comes back: it follows.
    assert!(!leader.try_acquire_or_renew().await.unwrap());

    // Released on shutdown: the other replica takes over at once.
    follower.release().await.unwrap();
    assert!(!follower.is_leader());
    assert!(leader.try_acquire_or_renew().await.unwrap());
}

#[tokio::test]
async fn schedule_ticks_in_the_lease_fire_once_across_replicas_and_renewals() {
    let tb = bare_testbed().await;
    let a = elector(&tb, "replica-a", Duration::from_secs(15));
    assert!(a.try_acquire_or_renew().await.unwrap());
    let store_a = LeaseTickStore::new(leases(&tb), LEASE);
    let store_b = LeaseTickStore::new(leases(&tb), LEASE);
    let tick = Utc.with_ymd_and_hms(2026, 3, 1, 6, 0, 0).unwrap();
    assert!(store_a.claim("nightly", tick).await.unwrap());
    assert!(!store_a.claim("nightly", tick).await.unwrap());
    assert!(
        !store_b.claim("nightly", tick).await.unwrap(),
        "another replica sees it"
    );
    // Renewing the Lease keeps the annotation.
    assert!(a.try_acquire_or_renew().await.unwrap());
    let lease = leases(&tb).get(LEASE).await.unwrap();
    let recorded = lease.metadata.annotations.unwrap_or_default()[TICKS_ANNOTATION].clone();
    assert!(recorded.contains("nightly"), "{recorded}");
    // Racing claims of the next tick: exactly one wins.
    let next = tick + chrono::Duration::days(1);
    let (x, y) = tokio::join!(
        store_a.claim("nightly", next),
        store_b.claim("nightly", next)
    );
    assert!(x.unwrap() ^ y.unwrap());
}

/// Samples every replica's leadership (what it acts on, not the exported gauge) every
/// 10 ms until [`LeaderSampler::finish`].
struct LeaderSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Sampled>,
}

/// Samples taken, and the first sample in which more than one replica led.
type Sampled = (usize, Option<Vec<bool>>);

impl LeaderSampler {
    fn start(replicas: Vec<Arc<dyn Leadership>>) -> LeaderSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut samples, mut overlap) = (0, None);
            while !stopped.load(Ordering::SeqCst) {
                let leading: Vec<bool> = replicas.iter().map(|r| r.is_leader()).collect();
                samples += 1;
                if overlap.is_none() && leading.iter().filter(|l| **l).count() > 1 {
                    overlap = Some(leading);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (samples, overlap)
        });
        LeaderSampler { stop, task }
    }

    async fn finish(self) -> Sampled {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sampler task")
    }
}

#[tokio::test]
async fn two_activators_elect_one_leader_and_fail_over() {
    let tb = bare_testbed().await;
    let kubeconfig = std::env::temp_dir().join(format!(
        "aa-lease-{}-{}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&kubeconfig, tb.kubeconfig("default")).unwrap();
    let start = || {
        let mut c = config(
            "agent-sandbox",
            "default",
            "autoscaler:\n  lease_duration: 3s\n",
        );
        c.backend.kubernetes.kubeconfig = Some(kubeconfig.clone());
        server::start(c)
    };
    let one = start().await.expect("first activator");
    let two = start().await.expect("second activator");
    assert_ne!(
        one.cluster().replica(),
        two.cluster().replica(),
        "each process has its own identity"
    );
    let leading = [one.cluster().leadership(), two.cluster().leadership()];
    // From here to the end, on every sample, at most one replica leads.
    let sampler = LeaderSampler::start(leading.to_vec());
    let elected = tokio::time::timeout(WAIT, async {
        loop {
            if leading.iter().filter(|l| l.is_leader()).count() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(elected.is_ok(), "one leader within {WAIT:?}");
    let first_was_leader = leading[0].is_leader();
    let (leader, follower) = if first_was_leader {
        (one, two)
    } else {
        (two, one)
    };
    // The Lease names the leader by its replica identity.
    let (holder_now, _) = holder(&tb).await;
    assert_eq!(
        holder_now.as_deref(),
        Some(leader.cluster().replica().as_str())
    );
    let survivor = follower.cluster().replica().clone();
    let old_gauge = leader.metrics().clone();
    // The leader shuts down and releases the Lease; the other takes over.
    leader.shutdown().await;
    assert_eq!(
        old_gauge.autoscaler_leader.get(),
        0,
        "a stopped replica leads nothing"
    );
    let failed_over = tokio::time::timeout(WAIT, async {
        loop {
            if follower.metrics().autoscaler_leader.get() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(failed_over.is_ok(), "the survivor leads within {WAIT:?}");
    assert!(follower.cluster().leadership().is_leader());
    let (holder_now, _) = holder(&tb).await;
    assert_eq!(holder_now.as_deref(), Some(survivor.as_str()));
    let (samples, overlap) = sampler.finish().await;
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert_eq!(overlap, None, "two leaders at once in {samples} samples");
    follower.shutdown().await;
    let _ = std::fs::remove_file(kubeconfig);
}
