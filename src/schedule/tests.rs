//! Schedules: parsing names the key; ticks fire once, also across a restart (paused time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use http::StatusCode;

use super::*;
use crate::cluster::{FileTickStore, FiredTicks, SoleReplica, TickStoreError, claim_in};
use crate::config::Config;
use crate::lock::MutexExt;

fn entry(cron: &str) -> ScheduleConfig {
    ScheduleConfig {
        name: "daily-summary".into(),
        cron: cron.into(),
        timezone: "UTC".into(),
        session: "user-42".into(),
        method: "POST".into(),
        path: "/counter".into(),
        headers: Default::default(),
        body: Some("{}".into()),
    }
}

#[test]
fn invalid_entries_name_the_key() {
    let err = |e: ScheduleConfig| e.parse(3, 128).unwrap_err().to_string();
    assert!(err(entry("every day")).starts_with("schedules[3].cron"));
    let mut e = entry("0 0 9 * * *");
    e.timezone = "Mars/Olympus".into();
    assert!(err(e).starts_with("schedules[3].timezone"));
    let mut e = entry("0 0 9 * * *");
    e.session = "no spaces".into();
    assert!(err(e).starts_with("schedules[3].session"));
    let mut e = entry("0 0 9 * * *");
    e.path = "counter".into();
    assert!(err(e).starts_with("schedules[3].path"));
    let mut e = entry("0 0 9 * * *");
    e.method = "GE T".into();
    assert!(err(e).starts_with("schedules[3].method"));
    let mut e = entry("0 0 9 * * *");
    e.headers.insert("Bad Header".into(), "x".into());
    assert!(err(e).starts_with("schedules[3].headers[Bad Header]"));
}

#[test]
fn config_rejects_duplicate_names_and_bad_cron() {
    let base = "backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\nschedules:\n";
    let one = "  - {name: a, cron: \"0 0 9 * * *\", session: s1, path: /x}\n";
    Config::from_yaml(&format!("{base}{one}")).unwrap();
    let e = Config::from_yaml(&format!("{base}{one}{one}"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("schedules[1].name"), "{e}");
    let bad = "  - {name: b, cron: \"61 * * * * *\", session: s1, path: /x}\n";
    let e = Config::from_yaml(&format!("{base}{bad}"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("schedules[0].cron"), "{e}");
}

#[test]
fn ticks_follow_the_time_zone() {
    let mut e = entry("0 0 9 * * *");
    e.timezone = "Europe/Berlin".into();
    let s = e.parse(0, 128).unwrap();
    // 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
    let winter = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
    assert_eq!(
        s.next_after(winter),
        Some(Utc.with_ymd_and_hms(2026, 1, 11, 8, 0, 0).unwrap())
    );
    let summer = Utc.with_ymd_and_hms(2026, 7, 10, 12, 0, 0).unwrap();
    assert_eq!(
        s.next_after(summer),
        Some(Utc.with_ymd_and_hms(2026, 7, 11, 7, 0, 0).unwrap())
    );
}

/// Records which schedule fired when (by the scheduler's wall clock).
struct Recorder {
    clock: WallClock,
    sent: Mutex<Vec<DateTime<Utc>>>,
}

#[async_trait]
impl WakeupSender for Recorder {
    async fn send(&self, _: &Schedule) -> Result<StatusCode, sender::SendError> {
        self.sent.lock_recovered().push(self.clock.now());
        Ok(StatusCode::OK)
    }
}

/// The same claim rule as the file and Lease stores, kept in memory: the simulated
/// restart hands the "persisted" state to the new process.
#[derive(Default)]
struct MemoryStore(Mutex<FiredTicks>);

#[async_trait]
impl TickStore for MemoryStore {
    async fn claim(&self, schedule: &str, tick: DateTime<Utc>) -> Result<bool, TickStoreError> {
        Ok(claim_in(&mut self.0.lock_recovered(), schedule, tick))
    }
}

fn scheduler(
    start: DateTime<Utc>,
    store: Arc<dyn TickStore>,
    leader: Arc<dyn Leadership>,
) -> (Arc<Scheduler>, Arc<Recorder>, Arc<Metrics>) {
    let clock = WallClock::anchored(start);
    let recorder = Arc::new(Recorder {
        clock,
        sent: Mutex::new(Vec::new()),
    });
    let metrics = Arc::new(Metrics::new());
    let every_10s = entry("*/10 * * * * *").parse(0, 128).unwrap();
    let s = Scheduler::new(
        vec![every_10s],
        store,
        leader,
        recorder.clone(),
        metrics.clone(),
        clock,
    );
    (s, recorder, metrics)
}

fn runs(metrics: &Metrics, result: &str) -> u64 {
    metrics
        .schedule_runs_total
        .with_label_values(&[result])
        .get()
}

#[tokio::test(start_paused = true)]
async fn each_tick_fires_once_also_across_a_restart() {
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 6, 0, 0).unwrap();
    let store: Arc<dyn TickStore> = Arc::new(MemoryStore::default());
    let (first, recorder, metrics) = scheduler(
        t0 - chrono::Duration::milliseconds(500),
        store.clone(),
        Arc::new(SoleReplica),
    );
    let tasks = first.spawn();
    tokio::time::sleep(Duration::from_secs(35)).await;
    tasks.iter().for_each(|t| t.abort());
    let sent = recorder.sent.lock_recovered().clone();
    let secs: Vec<i64> = sent.iter().map(|t| (*t - t0).num_seconds()).collect();
    assert_eq!(secs, vec![0, 10, 20, 30], "{sent:?}");
    assert_eq!(runs(&metrics, "ok"), 4);

    // Restart with the wall clock 5 s behind the last fired tick (a stepped clock or
    // another node's skew): the :30 tick comes round again and is skipped.
    let (second, recorder, metrics) = scheduler(
        t0 + chrono::Duration::seconds(25),
        store,
        Arc::new(SoleReplica),
    );
    let tasks = second.spawn();
    tokio::time::sleep(Duration::from_secs(20)).await;
    tasks.iter().for_each(|t| t.abort());
    let sent = recorder.sent.lock_recovered().clone();
    let secs: Vec<i64> = sent.iter().map(|t| (*t - t0).num_seconds()).collect();
    assert_eq!(secs, vec![40], "{sent:?}");
    assert_eq!((runs(&metrics, "ok"), runs(&metrics, "skipped")), (1, 1));
}

struct Never;

impl Leadership for Never {
    fn is_leader(&self) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn followers_do_not_fire() {
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 6, 0, 0).unwrap();
    let (s, recorder, metrics) = scheduler(t0, Arc::new(MemoryStore::default()), Arc::new(Never));
    let tasks = s.spawn();
    tokio::time::sleep(Duration::from_secs(25)).await;
    tasks.iter().for_each(|t| t.abort());
    assert!(recorder.sent.lock_recovered().is_empty());
    assert_eq!((runs(&metrics, "ok"), runs(&metrics, "skipped")), (0, 2));
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let unique: u64 = rand::random();
    std::env::temp_dir().join(format!("aa-schedule-{name}-{unique:x}/schedule-state.json"))
}

#[tokio::test]
async fn file_store_keeps_fired_ticks_across_instances() {
    let path = temp_path("store");
    let tick = Utc.with_ymd_and_hms(2026, 3, 1, 6, 0, 0).unwrap();
    let store = FileTickStore::new(path.clone());
    assert!(store.claim("a", tick).await.unwrap());
    assert!(!store.claim("a", tick).await.unwrap());
    assert!(
        store.claim("b", tick).await.unwrap(),
        "names are independent"
    );
    let reopened = FileTickStore::new(path.clone());
    assert!(!reopened.claim("a", tick).await.unwrap(), "persisted");
    assert!(
        !reopened
            .claim("a", tick - chrono::Duration::seconds(10))
            .await
            .unwrap()
    );
    assert!(
        reopened
            .claim("a", tick + chrono::Duration::seconds(10))
            .await
            .unwrap()
    );
    let fired = reopened.load().unwrap();
    assert_eq!(
        fired["a"],
        (tick + chrono::Duration::seconds(10)).to_rfc3339()
    );
    std::fs::write(&path, "not json").unwrap();
    let e = reopened.claim("a", tick).await.unwrap_err().to_string();
    assert!(e.contains("schedule-state.json"), "{e}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn schedules_need_a_plain_http_listener() {
    let yaml = "backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\ntls:\n  cert: /c.pem\n  key: /k.pem\nschedules:\n  - {name: a, cron: \"0 0 9 * * *\", session: s1, path: /x}\n";
    let e = Config::from_yaml(yaml).unwrap_err().to_string();
    assert!(e.starts_with("schedules:"), "{e}");
}
