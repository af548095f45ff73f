//! From a tap on the reader to the screen: what `kizuna run` does with each
//! [`CardEvent`] of its [`super::CardWatcher`].
//!
//! [`handle_event`] turns every watcher event into one JSON event on the
//! [`CardHub`], which the API merges into `GET /api/v1/events`:
//!
//! - `Status` → `card_status` (and the `card_reader` field of
//!   `/api/v1/status`: the degraded-mode banner text, ja and en).
//! - `ReadFailed` → `card_error` with the code and both messages and no ids:
//!   a failed or partial read registers nothing.
//! - `Tap` of a card registered by an operator (`kizuna operator add
//!   --card`) → `staff_tap`, and the hub remembers it for
//!   [`STAFF_TAP_WINDOW`] so `POST /api/v1/sessions/card` can issue a
//!   session. A staff tap is not looked up in the registry.
//! - any other `Tap` → [`resolve_tap`] through the engine
//!   (`Query::HouseholdByCard`, which answers with the household and the
//!   card holder): on shelter, facility and hq nodes a `card_tap` with the
//!   household and its members (with their location); on ambulance and
//!   clinic nodes a `card_tap` with the card holder's `person_id` for the
//!   medical view, whose read stays a separate, audited request. An
//!   unknown card is a `card_tap` with `household_id: null` and a `reason`.
//!
//! The path runs one way: reader → engine query → event. This module
//! never touches storage itself; it reads the operators file only through
//! the node's shared [`OperatorsFile`] (re-read only when it changed).
//! Events never carry the card's user ID: the screen needs the household
//! or the person, not the key.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crdt::api::{Query, QueryReply};
use crdt::store::{LocationRow, PersonRow};
use crdt::Role;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::id::UserId;
use super::watch::{CardEvent, ReaderStatus, TapTiming};
use crate::auth::OperatorsFile;
use crate::driver::DriverHandle;

/// How long after a staff tap `POST /api/v1/sessions/card` may use it.
pub const STAFF_TAP_WINDOW: Duration = Duration::from_secs(60);
/// Capacity of the card event broadcast.
pub const CARD_EVENT_CAPACITY: usize = 256;

/// The last tap on this node: staff (with the operator) or resident.
#[derive(Clone, Debug)]
struct LastTap {
    at: Instant,
    staff: Option<String>,
}

/// Why no session was issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionRefusal {
    /// No tap at all in the window.
    NoRecentTap,
    /// The last tap was a resident card.
    NotStaff,
}

/// Card state shared by the watcher task and the API.
pub struct CardHub {
    events: broadcast::Sender<Value>,
    status: Mutex<Option<ReaderStatus>>,
    last_tap: Mutex<Option<LastTap>>,
}

impl CardHub {
    pub fn new() -> Arc<CardHub> {
        let (events, _) = broadcast::channel(CARD_EVENT_CAPACITY);
        Arc::new(CardHub {
            events,
            status: Mutex::new(None),
            last_tap: Mutex::new(None),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    pub fn publish(&self, ev: Value) {
        let _ = self.events.send(ev);
    }

    pub fn set_status(&self, s: ReaderStatus) {
        *self.status.lock().expect("status lock") = Some(s);
    }

    /// The `card_reader` field of `/api/v1/status`.
    pub fn status_json(&self) -> Value {
        match &*self.status.lock().expect("status lock") {
            None => json!({
                "status": "starting", "readers": [], "degraded": true,
                "message_ja": "カードリーダーを確認しています",
                "message_en": "checking the card reader",
            }),
            Some(s) => status_body(s),
        }
    }

    /// Records a tap; `staff` names the operator for a staff card.
    pub fn note_tap(&self, staff: Option<String>) {
        *self.last_tap.lock().expect("tap lock") = Some(LastTap {
            at: Instant::now(),
            staff,
        });
    }

    /// The operator of the staff tap of the last `window`, without using
    /// it up (the PIN is checked before [`Self::take_staff_tap`]).
    pub fn peek_staff_tap(&self, window: Duration) -> Result<String, SessionRefusal> {
        match &*self.last_tap.lock().expect("tap lock") {
            Some(tap) if tap.at.elapsed() <= window => {
                tap.staff.clone().ok_or(SessionRefusal::NotStaff)
            }
            _ => Err(SessionRefusal::NoRecentTap),
        }
    }

    /// Takes the staff tap of the last `window`, once: the operator it
    /// names. A later resident tap replaces an earlier staff tap.
    pub fn take_staff_tap(&self, window: Duration) -> Result<String, SessionRefusal> {
        let mut t = self.last_tap.lock().expect("tap lock");
        match &*t {
            Some(tap) if tap.at.elapsed() <= window => match &tap.staff {
                Some(op) => {
                    let op = op.clone();
                    *t = None;
                    Ok(op)
                }
                None => Err(SessionRefusal::NotStaff),
            },
            _ => Err(SessionRefusal::NoRecentTap),
        }
    }
}

fn status_body(s: &ReaderStatus) -> Value {
    let mut v = serde_json::to_value(s).expect("serialisable");
    let readers = match s {
        ReaderStatus::Ready { readers } => readers.clone(),
        _ => Vec::new(),
    };
    v["readers"] = json!(readers);
    v["degraded"] = json!(!matches!(s, ReaderStatus::Ready { .. }));
    v["message_ja"] = json!(s.message_ja());
    v["message_en"] = json!(s.message_en());
    v
}

/// What a tap resolves to on a node of this role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapTarget {
    /// Shelter, facility, hq: the household and all its members.
    Household,
    /// Ambulance, clinic: the card holder, for the medical view.
    Person,
}

impl TapTarget {
    pub fn for_role(role: Role) -> TapTarget {
        match role {
            Role::Ambulance | Role::Clinic => TapTarget::Person,
            Role::Shelter | Role::Facility | Role::Hq => TapTarget::Household,
        }
    }
}

pub const NOT_IN_REGISTRY_JA: &str = "このカードは住民台帳にありません（カードなしで受付できます）";
pub const NOT_IN_REGISTRY_EN: &str = "card not in registry (register without a card)";

fn member_json(p: &PersonRow, l: &Option<LocationRow>) -> Value {
    json!({
        "person_id": p.person_id, "name": p.name, "kana": p.kana, "birth_date": p.birth_date,
        "location": match l {
            None => Value::Null,
            Some(l) => json!({"shelter_id": l.shelter_id, "status": l.status, "since": l.since_ms, "conflict": l.conflict}),
        },
    })
}

fn lookup_error(reader: &str, message: String) -> Value {
    json!({
        "type": "card_error", "reader": reader, "code": "lookup-failed", "tap_again": true,
        "message_ja": "台帳を検索できませんでした。もう一度タッチしてください",
        "message_en": format!("registry lookup failed; tap again ({message})"),
    })
}

/// Resolves a resident tap into the `card_tap` event (or a `card_error`
/// when the lookup itself failed).
pub async fn resolve_tap(
    driver: &DriverHandle,
    target: TapTarget,
    user_id: &UserId,
    reader: &str,
) -> Value {
    let q = Query::HouseholdByCard {
        card_user_id: user_id.as_str().to_string(),
    };
    let h = match driver.query(q).await {
        Ok(QueryReply::Household(h)) => h,
        Ok(_) => return lookup_error(reader, "unexpected engine reply".into()),
        Err(e) => return lookup_error(reader, e.to_string()),
    };
    let Some(h) = h else {
        return json!({
            "type": "card_tap", "reader": reader, "household_id": null, "person_id": null,
            "members": [], "reason": "card_not_in_registry",
            "reason_ja": NOT_IN_REGISTRY_JA, "reason_en": NOT_IN_REGISTRY_EN,
        });
    };
    match target {
        TapTarget::Household => json!({
            "type": "card_tap", "reader": reader, "household_id": h.household_id,
            "person_id": null,
            "members": h.members.iter().map(|(p, l)| member_json(p, l)).collect::<Vec<_>>(),
        }),
        TapTarget::Person => {
            let holder = h
                .holder
                .as_deref()
                .and_then(|id| h.members.iter().find(|(p, _)| p.person_id == id));
            match holder {
                Some((p, l)) => json!({
                    "type": "card_tap", "reader": reader, "household_id": h.household_id,
                    "person_id": p.person_id, "person": member_json(p, l),
                }),
                None => lookup_error(reader, "card holder not found in the household".into()),
            }
        }
    }
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// The `timing` of a `card_tap` event: where the node's part of a tap went,
/// in milliseconds. `seen_at_ms` (the reader loop saw the card) and
/// `sent_at_ms` (the event left for the screens) are wall-clock times, so a
/// benchmark can line them up with the browser's clock on the same
/// machine; `read_ms` is the card read (connect to disconnect) and
/// `lookup_ms` the registry query. No identity in it.
fn timing_json(t: &TapTiming, lookup: Duration, sent_at: SystemTime) -> Value {
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({
        "seen_at_ms": r(unix_ms(t.seen_at)),
        "read_ms": r(t.read.as_secs_f64() * 1e3),
        "lookup_ms": r(lookup.as_secs_f64() * 1e3),
        "sent_at_ms": r(unix_ms(sent_at)),
    })
}

/// Everything [`handle_event`] needs about the node.
#[derive(Clone)]
pub struct TapContext {
    pub hub: Arc<CardHub>,
    pub driver: DriverHandle,
    pub target: TapTarget,
    /// The node's operators file, shared with the API.
    pub operators: Arc<OperatorsFile>,
}

/// Handles one watcher event (see the module docs).
pub async fn handle_event(cx: &TapContext, ev: CardEvent) {
    match ev {
        CardEvent::Status(s) => {
            let mut v = status_body(&s);
            v["type"] = json!("card_status");
            cx.hub.set_status(s);
            cx.hub.publish(v);
        }
        CardEvent::ReadFailed(e) => cx.hub.publish(json!({
            "type": "card_error", "code": e.code(), "tap_again": e.is_tap_again(),
            "message_ja": e.message_ja(), "message_en": e.message_en(),
        })),
        CardEvent::Tap {
            user_id,
            reader,
            timing,
        } => {
            let staff = match cx.operators.current() {
                Ok(ops) => ops.by_card(user_id.as_str()).map(str::to_string),
                Err(e) => {
                    tracing::warn!(error = %e, "operators file unreadable; tap treated as a resident card");
                    None
                }
            };
            cx.hub.note_tap(staff.clone());
            match staff {
                Some(operator) => cx.hub.publish(json!({
                    "type": "staff_tap", "reader": reader, "operator": operator,
                    "window_ms": STAFF_TAP_WINDOW.as_millis() as u64,
                })),
                None => {
                    let started = Instant::now();
                    let mut v = resolve_tap(&cx.driver, cx.target, &user_id, &reader).await;
                    let lookup = started.elapsed();
                    if v["type"] == "card_tap" {
                        v["timing"] = timing_json(&timing, lookup, SystemTime::now());
                    }
                    tracing::debug!(
                        read_ms = timing.read.as_secs_f64() * 1e3,
                        lookup_ms = lookup.as_secs_f64() * 1e3,
                        "card tap resolved"
                    );
                    cx.hub.publish(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staff_tap_is_taken_once_and_resident_tap_replaces_it() {
        let hub = CardHub::new();
        assert_eq!(
            hub.take_staff_tap(STAFF_TAP_WINDOW),
            Err(SessionRefusal::NoRecentTap)
        );
        hub.note_tap(Some("staff-1".into()));
        assert_eq!(
            hub.take_staff_tap(STAFF_TAP_WINDOW).as_deref(),
            Ok("staff-1")
        );
        assert_eq!(
            hub.take_staff_tap(STAFF_TAP_WINDOW),
            Err(SessionRefusal::NoRecentTap)
        );
        hub.note_tap(Some("staff-1".into()));
        hub.note_tap(None);
        assert_eq!(
            hub.take_staff_tap(STAFF_TAP_WINDOW),
            Err(SessionRefusal::NotStaff)
        );
        hub.note_tap(Some("staff-1".into()));
        assert_eq!(
            hub.take_staff_tap(Duration::ZERO),
            Err(SessionRefusal::NoRecentTap)
        );
    }

    #[test]
    fn status_json_has_banner_text() {
        let hub = CardHub::new();
        assert_eq!(hub.status_json()["status"], "starting");
        hub.set_status(ReaderStatus::ServiceDown);
        let v = hub.status_json();
        assert_eq!(v["status"], "service-down");
        assert_eq!(v["degraded"], true);
        assert!(v["message_ja"].as_str().unwrap().contains("カード"));
        hub.set_status(ReaderStatus::Ready {
            readers: vec!["r".into()],
        });
        let v = hub.status_json();
        assert_eq!(v["degraded"], false);
        assert_eq!(v["readers"][0], "r");
    }

    /// Tap resolution for every role over a real SqliteStore and the real
    /// engine thread. The registry can only be imported on an hq database,
    /// so the engine runs as hq and the role-specific target is passed in:
    /// what differs per role is [`TapTarget::for_role`] and this function.
    #[test]
    fn resolve_tap_per_role() {
        use crdt::api::{Command, Operator};
        use crdt::engine::EngineConfig;
        use crdt::model::{Household, Member};
        use crdt::text::CardUserId;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(crate::store::DB_FILE_NAME);
        let store = crate::store::SqliteStore::open(&db).unwrap();
        let driver = crate::driver::Driver::start(
            store,
            EngineConfig::for_tests(crdt::NodeId::new("hq-1").unwrap(), Role::Hq),
        )
        .unwrap();
        let member = |id: &str, card: Option<&str>| Member {
            person_id: id.into(),
            name: format!("山田 {id}"),
            kana: format!("ヤマダ {id}"),
            birth_date: "1980-04-01".into(),
            card_user_id: card.map(|c| CardUserId::parse(c).unwrap()),
        };
        driver
            .command_blocking(
                "imp".into(),
                Operator("t".into()),
                Command::ImportHouseholds {
                    households: vec![Household {
                        household_id: "h1".into(),
                        address: "新潟県三条市".into(),
                        members: vec![
                            member("p1", Some("1234567890123")),
                            member("p2", Some("2222222222222")),
                            member("p3", None),
                        ],
                    }],
                },
            )
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let id = |s: &str| UserId::parse(s).unwrap();
        rt.block_on(async {
            for role in [Role::Shelter, Role::Facility, Role::Hq] {
                let t = TapTarget::for_role(role);
                let v = resolve_tap(&driver, t, &id("2222222222222"), "r").await;
                assert_eq!(v["type"], "card_tap", "{v}");
                assert_eq!(v["household_id"], "h1");
                assert_eq!(v["person_id"], Value::Null);
                let ids: Vec<_> = v["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["person_id"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(ids, ["p1", "p2", "p3"]);
                assert!(
                    !v.to_string().contains("2222222222222"),
                    "no card id in {v}"
                );
            }
            for role in [Role::Ambulance, Role::Clinic] {
                let t = TapTarget::for_role(role);
                let v = resolve_tap(&driver, t, &id("2222222222222"), "r").await;
                assert_eq!(v["person_id"], "p2", "{v}");
                assert_eq!(v["household_id"], "h1");
                assert!(v.get("members").is_none(), "{v}");
                let v = resolve_tap(&driver, t, &id("1234567890123"), "r").await;
                assert_eq!(v["person_id"], "p1", "{v}");
            }
            for t in [TapTarget::Household, TapTarget::Person] {
                let v = resolve_tap(&driver, t, &id("9999999999999"), "r").await;
                assert_eq!(v["type"], "card_tap");
                assert_eq!(v["household_id"], Value::Null);
                assert_eq!(v["person_id"], Value::Null);
                assert_eq!(v["reason"], "card_not_in_registry");
                assert!(v["reason_en"]
                    .as_str()
                    .unwrap()
                    .contains("card not in registry"));
                assert!(v["reason_ja"]
                    .as_str()
                    .unwrap()
                    .contains("住民台帳にありません"));
            }
            // Staff taps are never looked up; resident taps never become
            // staff taps.
            crate::auth::Operators::add_with_card(
                dir.path(),
                "staff-1",
                Some(&id("5555555555555")),
            )
            .unwrap();
            let hub = CardHub::new();
            let cx = TapContext {
                hub: hub.clone(),
                driver: driver.clone(),
                target: TapTarget::Household,
                operators: OperatorsFile::new(dir.path()),
            };
            let mut rx = hub.subscribe();
            // A tap the reader loop saw at a known moment and read in a
            // known time: the event carries both, and its own stages after.
            let seen_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
            let timing = TapTiming {
                seen_at,
                read: Duration::from_micros(12_340),
            };
            handle_event(
                &cx,
                CardEvent::Tap {
                    user_id: id("5555555555555"),
                    reader: "r".into(),
                    timing,
                },
            )
            .await;
            let v = rx.recv().await.unwrap();
            assert_eq!(v["type"], "staff_tap");
            assert_eq!(v["operator"], "staff-1");
            assert!(v.get("timing").is_none(), "{v}");
            handle_event(
                &cx,
                CardEvent::Tap {
                    user_id: id("1234567890123"),
                    reader: "r".into(),
                    timing,
                },
            )
            .await;
            let v = rx.recv().await.unwrap();
            assert_eq!(v["household_id"], "h1");
            let t = &v["timing"];
            assert_eq!(t["seen_at_ms"], 1_700_000_000_000.0, "{v}");
            assert_eq!(t["read_ms"], 12.3, "{v}");
            assert!(t["lookup_ms"].as_f64().is_some_and(|x| x >= 0.0), "{v}");
            assert!(
                t["sent_at_ms"]
                    .as_f64()
                    .is_some_and(|x| x > 1_700_000_000_000.0),
                "{v}"
            );
            assert!(
                !v.to_string().contains("1234567890123"),
                "no card id in {v}"
            );
            assert_eq!(
                hub.take_staff_tap(STAFF_TAP_WINDOW),
                Err(SessionRefusal::NotStaff)
            );
        });
        driver.shutdown().unwrap();
    }
}
