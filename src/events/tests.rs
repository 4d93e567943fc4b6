use std::sync::Arc;

use tokio::sync::broadcast::error::TryRecvError;

use super::*;

fn draft(kind: EventKind) -> EventDraft {
    EventDraft::new(kind, Arc::from("abcd1234"))
}

#[test]
fn numbers_events_from_one_and_keeps_the_last_capacity() {
    let bus = EventBus::new(3);
    for _ in 0..5 {
        bus.emit(draft(EventKind::Queued));
    }
    let seqs: Vec<u64> = bus.recent(10).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(bus.next_seq(), 6);
}

#[test]
fn resume_returns_exactly_the_missed_events_then_live_ones() {
    let bus = EventBus::new(8);
    for _ in 0..4 {
        bus.emit(draft(EventKind::Claimed));
    }
    let mut sub = bus.subscribe(Some(2));
    assert!(!sub.gap);
    let seqs: Vec<u64> = sub.backlog.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![3, 4]);
    bus.emit(draft(EventKind::Paused));
    let live = sub.live.try_recv().expect("live event");
    assert_eq!((live.seq, live.kind), (5, EventKind::Paused));
    assert!(matches!(sub.live.try_recv(), Err(TryRecvError::Empty)));
}

#[test]
fn resume_from_before_the_ring_reports_a_gap() {
    let bus = EventBus::new(2);
    for _ in 0..5 {
        bus.emit(draft(EventKind::Claimed));
    }
    let sub = bus.subscribe(Some(1));
    assert!(sub.gap, "events 2 was overwritten");
    assert_eq!(
        sub.backlog.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5]
    );
    let sub = bus.subscribe(Some(3));
    assert!(!sub.gap, "4 and 5 are both still there");
}

#[test]
fn a_subscriber_that_never_reads_lags_and_the_emitter_goes_on() {
    let bus = EventBus::new(4);
    let mut sub = bus.subscribe(None);
    for _ in 0..100 {
        bus.emit(draft(EventKind::Queued));
    }
    match sub.live.try_recv() {
        Err(TryRecvError::Lagged(n)) => assert_eq!(n, 96),
        other => panic!("expected Lagged, got {other:?}"),
    }
}

#[test]
fn json_names_the_kind_and_omits_empty_fields() {
    let bus = EventBus::new(4);
    bus.emit(
        draft(EventKind::Rejected)
            .reason("queue_full")
            .wait(Duration::from_millis(1500)),
    );
    let json = serde_json::to_value(&*bus.recent(1)[0]).expect("json");
    assert_eq!(json["kind"], "rejected");
    assert_eq!(json["reason"], "queue_full");
    assert_eq!(json["wait_ms"], 1500.0);
    assert_eq!(json["session"], "abcd1234");
    assert!(json.get("sandbox").is_none());
    assert!(json["time_ms"].as_u64().expect("time") > 1_600_000_000_000);
}
