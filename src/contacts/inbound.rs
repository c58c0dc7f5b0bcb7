//! What an inbound webhook event means for the contacts plane (guarantee
//! 7): a message opens the user's 24-hour window; a configured button
//! payload, or else a whole-message STOP/START keyword, sets consent; a
//! `user_preferences` change sets marketing. The cache is updated at once and
//! the compacted-topic records are handed to the caller (ingress produces
//! them with the POST's own records). No HTTP, no Kafka: unit-tested here.

use crate::contacts::keywords::{Keyword, Keywords};
use crate::contacts::records::{consent_event, user_event, window_event, ContactRecord};
use crate::contacts::{Consent, ContactState, Contacts, Marketing};
use crate::meta::identity::{IdChange, User};
use crate::meta::webhook::Event;

/// A pair's window is written to `wa.windows` at most this often.
pub const WINDOW_WRITE_EVERY_MS: u64 = 5 * 60 * 1000;

/// The cause of a record written for the `i`-th id of a person: the event
/// itself for the first (as before BSUIDs), the event and the id for the
/// others, so every record has its own stable event id.
fn cause(event_id: &str, i: usize, id: &str) -> String {
    if i == 0 {
        event_id.to_string()
    } else {
        format!("{event_id}:{id}")
    }
}

/// Contacts, before the 200 (guarantee 7): an inbound message opens the
/// user's 24-hour window; STOP/START keywords and user_preferences
/// changes take effect for every later send; a phone and a BSUID seen
/// together are linked as one person, and an id change carries the
/// person's state to the new ids (DESIGN §10). The cache is updated at
/// once, and the records for the compacted topics go out with this POST's
/// own records (`emit`), so the 200 also means they are durable. Every
/// state record is written under each of the person's ids.
pub fn signals(
    c: &dyn Contacts,
    keywords: &Keywords,
    ev: &Event,
    received_at_ms: u64,
    emit: &mut dyn FnMut(ContactRecord),
) {
    let pn = ev.key.as_str();
    let who = ev.inbound.as_ref().map(|(u, _)| u).or(ev.seen.as_ref());
    if let Some((phone, bsuid)) = who.and_then(User::pair) {
        learn(
            c,
            pn,
            phone,
            bsuid,
            "webhook",
            received_at_ms,
            &ev.event_id,
            emit,
        );
    }
    for (u, _) in &ev.preferences {
        if let Some((phone, bsuid)) = u.pair() {
            learn(
                c,
                pn,
                phone,
                bsuid,
                "webhook",
                received_at_ms,
                &ev.event_id,
                emit,
            );
        }
    }
    if let Some(change) = &ev.change {
        moved(c, pn, change, received_at_ms, &ev.event_id, emit);
    }
    if let Some((user, ts)) = &ev.inbound {
        if let Some(id) = user.primary() {
            inbound(c, keywords, ev, id.as_str(), *ts, received_at_ms, emit);
        }
    }
    for (user, stop) in &ev.preferences {
        let Some(id) = user.primary() else { continue };
        let m = if *stop {
            Marketing::Stopped
        } else {
            Marketing::Allowed
        };
        c.set_marketing(pn, id.as_str(), m);
        let st = c.get(pn, id.as_str());
        for other in c.ids(pn, id.as_str()) {
            let cause = format!("{}:{other}", ev.event_id);
            emit(consent_event(
                pn,
                &other,
                &st,
                "user_preferences",
                received_at_ms,
                &cause,
            ));
        }
    }
}

/// A message from `id`: its window, and a keyword or payload it says.
fn inbound(
    c: &dyn Contacts,
    keywords: &Keywords,
    ev: &Event,
    id: &str,
    ts: i64,
    received_at_ms: u64,
    emit: &mut dyn FnMut(ContactRecord),
) {
    let pn = ev.key.as_str();
    // Meta's seconds, never later than receipt (and never wrapping).
    let ms = u64::try_from(ts)
        .unwrap_or(0)
        .saturating_mul(1000)
        .min(received_at_ms);
    let before = c.get(pn, id).last_inbound_ms;
    c.record_inbound(pn, id, ms);
    // Under the id the message came from only (the phone when Meta showed
    // it): the person's other id reads it through the link.
    if before.is_none_or(|b| ms >= b.saturating_add(WINDOW_WRITE_EVERY_MS)) {
        emit(window_event(pn, id, ms, &ev.event_id));
    }
    let said = ev
        .payload
        .as_deref()
        .and_then(|p| keywords.detect_payload(p))
        .map(|k| (k, "quick_reply"))
        .or_else(|| {
            ev.text
                .as_deref()
                .and_then(|t| keywords.detect(t))
                .map(|k| (k, "keyword"))
        });
    let Some((kw, source)) = said else { return };
    let consent = match kw {
        Keyword::OptOut => Consent::OptedOut,
        Keyword::OptIn => Consent::OptedIn,
    };
    c.set_consent(pn, id, consent);
    let st = c.get(pn, id);
    let ids = c.ids(pn, id);
    for (i, other) in ids.iter().enumerate() {
        emit(consent_event(
            pn,
            other,
            &st,
            source,
            received_at_ms,
            &cause(&ev.event_id, i, other),
        ));
    }
}

/// A phone and a BSUID seen together: linked, with a `wa.users` record
/// when the link is new (or replaced another: the BSUID that lost its
/// phone gets a record with `wa_id: null`).
#[allow(clippy::too_many_arguments)]
fn learn(
    c: &dyn Contacts,
    pn: &str,
    phone: &str,
    bsuid: &str,
    source: &str,
    now_ms: u64,
    event_id: &str,
    emit: &mut dyn FnMut(ContactRecord),
) {
    let r = c.link(pn, phone, bsuid, now_ms, event_id);
    if !r.new {
        return;
    }
    for (_, lost) in r.dropped.iter().filter(|(_, b)| b != bsuid) {
        emit(user_event(
            pn,
            lost,
            None,
            source,
            now_ms,
            format!("user:{event_id}:{lost}"),
        ));
    }
    emit(user_event(
        pn,
        bsuid,
        Some(phone),
        source,
        now_ms,
        format!("user:{event_id}:{bsuid}"),
    ));
}

/// The source of an id change's records.
fn change_source(change: &IdChange) -> &'static str {
    if change.previous.wa_id.is_some() && change.current.wa_id != change.previous.wa_id {
        "user_changed_number"
    } else {
        "user_changed_user_id"
    }
}

/// An id change: the person's state under the previous ids (and whatever
/// they were linked to) is written under the new ids, and the new phone
/// and BSUID are linked (a BSUID change keeps the phone the old BSUID was
/// linked to). The previous ids keep their own records; they are only
/// unlinked.
fn moved(
    c: &dyn Contacts,
    pn: &str,
    change: &IdChange,
    now_ms: u64,
    event_id: &str,
    emit: &mut dyn FnMut(ContactRecord),
) {
    let source = change_source(change);
    let prev: Vec<String> = [&change.previous.wa_id, &change.previous.user_id]
        .into_iter()
        .flatten()
        .flat_map(|id| c.ids(pn, id))
        .collect();
    let st = prev
        .iter()
        .map(|id| c.get(pn, id))
        .reduce(crate::contacts::merge)
        .unwrap_or_default();
    let kept_phone = prev
        .iter()
        .find(|id| !crate::meta::identity::is_bsuid(id))
        .cloned();
    let phone = change.current.wa_id.clone().or(match source {
        "user_changed_user_id" => kept_phone,
        _ => None,
    });
    for id in [&change.previous.user_id, &change.previous.wa_id]
        .into_iter()
        .flatten()
    {
        if Some(id) != change.current.user_id.as_ref() && Some(id) != phone.as_ref() {
            if let Some(other) = c.unlink(pn, id) {
                let b = if crate::meta::identity::is_bsuid(id) {
                    id
                } else {
                    &other
                };
                emit(user_event(
                    pn,
                    b,
                    None,
                    source,
                    now_ms,
                    format!("user:{event_id}:{b}"),
                ));
            }
        }
    }
    if let (Some(p), Some(b)) = (&phone, &change.current.user_id) {
        learn(c, pn, p, b, source, now_ms, event_id, emit);
    }
    let Some(new) = phone.as_deref().or(change.current.user_id.as_deref()) else {
        return;
    };
    carry(c, pn, new, st, source, now_ms, event_id, emit);
}

/// Writes `st` under the person `new` is (every id), with its records.
#[allow(clippy::too_many_arguments)]
fn carry(
    c: &dyn Contacts,
    pn: &str,
    new: &str,
    st: ContactState,
    source: &str,
    now_ms: u64,
    event_id: &str,
    emit: &mut dyn FnMut(ContactRecord),
) {
    let st = crate::contacts::merge(c.get(pn, new), st);
    let ids = c.ids(pn, new);
    if ids.iter().all(|id| c.own(pn, id) == st) {
        return;
    }
    c.set_consent(pn, new, st.consent);
    c.set_marketing(pn, new, st.marketing);
    if let Some(ms) = st.last_inbound_ms {
        c.record_inbound(pn, new, ms);
    }
    for other in ids {
        let cause = format!("{event_id}:{other}");
        if st.consent != Consent::Unknown || st.marketing != Marketing::Allowed {
            emit(consent_event(pn, &other, &st, source, now_ms, &cause));
        }
        if let (Some(ms), true) = (st.last_inbound_ms, other == new) {
            emit(window_event(pn, &other, ms, &cause));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contacts::MemoryContacts;
    use crate::meta::webhook::{fan_out, Context};

    const CTX: Context<'static> = Context {
        app: "default",
        received_at_ms: 1_781_600_600_000,
    };

    fn text(id: &str, body: &str, ts: i64) -> Event {
        let b = format!(
            r#"{{"entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"5"}},"messages":[{{"from":"14155550123","id":"{id}","timestamp":"{ts}","type":"text","text":{{"body":"{body}"}}}}]}}}}]}}]}}"#
        );
        fan_out(&mut b.into_bytes(), CTX).unwrap().remove(0)
    }

    fn run(c: &MemoryContacts, ev: &Event) -> Vec<ContactRecord> {
        let kw = Keywords::new(&["stop"], &["start"]);
        let mut out = Vec::new();
        signals(c, &kw, ev, CTX.received_at_ms, &mut |e| out.push(e));
        out
    }

    #[test]
    fn a_stop_sets_consent_and_opens_the_window_with_records_for_both() {
        let c = MemoryContacts::new();
        let out = run(&c, &text("wamid.1", "Stop!", 1_781_600_500));
        assert_eq!(c.get("5", "14155550123").consent, Consent::OptedOut);
        assert_eq!(
            c.get("5", "14155550123").last_inbound_ms,
            Some(1_781_600_500_000)
        );
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["window", "consent"]);
        assert!(out.iter().all(|e| e.key == "5:14155550123"));
        // A START later opts back in.
        run(&c, &text("wamid.2", "start", 1_781_600_510));
        assert_eq!(c.get("5", "14155550123").consent, Consent::OptedIn);
    }

    #[test]
    fn the_window_is_written_at_most_every_five_minutes_of_inbound_and_never_in_the_future() {
        let c = MemoryContacts::new();
        assert_eq!(run(&c, &text("wamid.1", "hi", 1_781_600_000)).len(), 1);
        // 2 minutes later: cached, not written.
        assert!(run(&c, &text("wamid.2", "hi", 1_781_600_120)).is_empty());
        assert_eq!(
            c.get("5", "14155550123").last_inbound_ms,
            Some(1_781_600_120_000)
        );
        // Five minutes or more after the last inbound message: written again.
        assert!(run(&c, &text("wamid.3", "hi", 1_781_600_400)).is_empty());
        assert_eq!(
            run(&c, &text("wamid.4", "hi", 1_781_600_000 + 700)).len(),
            0
        );
        // (700 s is after receipt: it counts as receipt, 600 s, 200 s after 400 s.)
        let c = MemoryContacts::new();
        assert_eq!(run(&c, &text("wamid.6", "hi", 1_781_600_000)).len(), 1);
        assert!(run(&c, &text("wamid.7", "hi", 1_781_600_120)).is_empty());
        assert_eq!(run(&c, &text("wamid.8", "hi", 1_781_600_450)).len(), 1);
        // A timestamp past receipt counts as receipt.
        run(&c, &text("wamid.5", "hi", i64::MAX));
        assert_eq!(
            c.get("5", "14155550123").last_inbound_ms,
            Some(CTX.received_at_ms)
        );
    }

    #[test]
    fn user_preferences_set_marketing() {
        let c = MemoryContacts::new();
        let b = br#"{"entry":[{"id":"1","changes":[{"field":"user_preferences","value":{"metadata":{"phone_number_id":"5"},"user_preferences":[{"wa_id":"14155550123","category":"marketing_messages","value":"stop","timestamp":1}]}}]}]}"#;
        let ev = fan_out(&mut b.to_vec(), CTX).unwrap().remove(0);
        let out = run(&c, &ev);
        assert_eq!(c.get("5", "14155550123").marketing, Marketing::Stopped);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind.as_str(), "consent");
    }

    fn fixture(name: &str) -> Event {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let mut b = std::fs::read(&path).unwrap();
        fan_out(&mut b, CTX).unwrap().remove(0)
    }

    const PN: &str = "118877665544332";
    const ANA: &str = "BR.8821736450019923";
    const ANA_NEW: &str = "BR.4410098877665544";
    const PHONE: &str = "5511987650001";

    fn run_pt(c: &MemoryContacts, ev: &Event) -> Vec<ContactRecord> {
        let kw = Keywords::new(&["stop", "parar"], &["start"]);
        let mut out = Vec::new();
        signals(c, &kw, ev, CTX.received_at_ms, &mut |e| out.push(e));
        out
    }

    fn keys(out: &[ContactRecord], kind: &str) -> Vec<String> {
        let mut k: Vec<String> = out
            .iter()
            .filter(|e| e.kind.as_str() == kind)
            .map(|e| e.key.clone())
            .collect();
        k.sort();
        k
    }

    #[test]
    fn a_stop_from_a_username_user_is_applied_under_the_bsuid() {
        let c = MemoryContacts::new();
        let out = run_pt(&c, &fixture("identity_stop_username_only.json"));
        assert_eq!(c.get(PN, ANA).consent, Consent::OptedOut);
        assert_eq!(keys(&out, "consent"), [format!("{PN}:{ANA}")]);
        assert_eq!(keys(&out, "window"), [format!("{PN}:{ANA}")]);
        let v: serde_json::Value = serde_json::from_slice(&out[1].value).unwrap();
        assert_eq!(v["consent"], "opted_out");
    }

    #[test]
    fn phone_and_bsuid_seen_together_are_one_person_and_a_stop_under_either_blocks_both() {
        let c = MemoryContacts::new();
        let out = run_pt(&c, &fixture("identity_inbound_phone_and_bsuid.json"));
        let users: Vec<&ContactRecord> = out.iter().filter(|e| e.kind.as_str() == "user").collect();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].key, format!("{PN}:{ANA}"));
        let rec: crate::contacts::records::UserRecord =
            serde_json::from_slice(&users[0].value).unwrap();
        assert_eq!(rec.wa_id.as_deref(), Some(PHONE));
        // The window is written under the phone the message came from; the
        // BSUID reads it through the link.
        assert_eq!(keys(&out, "window"), [format!("{PN}:{PHONE}")]);
        assert!(c.get(PN, ANA).last_inbound_ms.is_some());
        // The same body delivered again (its first delivery failed): the
        // link record is offered again, with the same event id.
        let again = run_pt(&c, &fixture("identity_inbound_phone_and_bsuid.json"));
        let u2: Vec<&ContactRecord> = again.iter().filter(|e| e.kind.as_str() == "user").collect();
        assert_eq!(u2.len(), 1);
        assert_eq!(u2[0].event_id, users[0].event_id);
        // A STOP by BSUID only now blocks the phone too, with records for both.
        let out = run_pt(&c, &fixture("identity_stop_username_only.json"));
        assert_eq!(c.get(PN, PHONE).consent, Consent::OptedOut);
        assert_eq!(c.get(PN, ANA).consent, Consent::OptedOut);
        assert_eq!(
            keys(&out, "consent"),
            [format!("{PN}:{PHONE}"), format!("{PN}:{ANA}")]
        );
        let ids: std::collections::HashSet<&str> =
            out.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), out.len(), "every record has its own event id");
        // And the reverse: a START by phone opts the BSUID back in.
        run(&c, &{
            let b = format!(
                r#"{{"entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"{PN}"}},"messages":[{{"from":"{PHONE}","id":"wamid.S","timestamp":"1782000300","type":"text","text":{{"body":"start"}}}}]}}}}]}}]}}"#
            );
            fan_out(&mut b.into_bytes(), CTX).unwrap().remove(0)
        });
        assert_eq!(c.get(PN, ANA).consent, Consent::OptedIn);
    }

    #[test]
    fn a_phone_seen_with_a_new_bsuid_moves_and_the_old_bsuid_is_unlinked() {
        let c = MemoryContacts::new();
        run_pt(&c, &fixture("identity_inbound_phone_and_bsuid.json"));
        let b = format!(
            r#"{{"entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"{PN}"}},"messages":[{{"from":"{PHONE}","from_user_id":"BR.SOMEONEELSE","id":"wamid.R","timestamp":"1782000900","type":"text","text":{{"body":"oi"}}}}]}}}}]}}]}}"#
        );
        let out = run_pt(&c, &fan_out(&mut b.into_bytes(), CTX).unwrap().remove(0));
        let users: Vec<crate::contacts::records::UserRecord> = out
            .iter()
            .filter(|e| e.kind.as_str() == "user")
            .map(|e| serde_json::from_slice(&e.value).unwrap())
            .collect();
        assert_eq!(users.len(), 2);
        assert!(users.iter().any(|u| u.user_id == ANA && u.wa_id.is_none()));
        assert!(users
            .iter()
            .any(|u| u.user_id == "BR.SOMEONEELSE" && u.wa_id.as_deref() == Some(PHONE)));
        assert_eq!(c.ids(PN, ANA), [ANA]);
        assert_eq!(c.ids(PN, PHONE), [PHONE, "BR.SOMEONEELSE"]);
    }

    #[test]
    fn id_changes_carry_the_opt_out_to_the_new_ids() {
        let c = MemoryContacts::new();
        run_pt(&c, &fixture("identity_inbound_phone_and_bsuid.json"));
        run_pt(&c, &fixture("identity_stop_username_only.json"));
        // user_changed_user_id: the new BSUID inherits the STOP and the phone.
        let out = run_pt(&c, &fixture("identity_system_user_changed_user_id.json"));
        assert_eq!(c.get(PN, ANA_NEW).consent, Consent::OptedOut);
        assert_eq!(c.ids(PN, PHONE), [PHONE, ANA_NEW]);
        assert!(keys(&out, "consent").contains(&format!("{PN}:{ANA_NEW}")));
        assert!(keys(&out, "user").contains(&format!("{PN}:{ANA_NEW}")));
        // user_changed_number: the new phone and new BSUID, from the old phone.
        let c = MemoryContacts::new();
        run_pt(&c, &fixture("identity_inbound_phone_and_bsuid.json"));
        run_pt(&c, &fixture("identity_stop_username_only.json"));
        let out = run_pt(&c, &fixture("identity_system_user_changed_number.json"));
        assert_eq!(c.get(PN, "5511987650002").consent, Consent::OptedOut);
        assert_eq!(c.get(PN, ANA_NEW).consent, Consent::OptedOut);
        assert_eq!(c.ids(PN, "5511987650002"), ["5511987650002", ANA_NEW]);
        assert_eq!(c.ids(PN, ANA), [ANA], "the old BSUID is unlinked");
        assert!(out
            .iter()
            .any(|e| e.kind.as_str() == "user" && e.key == format!("{PN}:{ANA}")));
        // The window moved too (the STOP was an inbound message).
        assert!(c.get(PN, ANA_NEW).last_inbound_ms.is_some());
    }

    #[test]
    fn user_preferences_by_bsuid_stop_marketing_for_the_person() {
        let c = MemoryContacts::new();
        run_pt(&c, &fixture("identity_inbound_phone_and_bsuid.json"));
        let out = run_pt(&c, &fixture("identity_user_preferences_bsuid.json"));
        assert_eq!(c.get(PN, PHONE).marketing, Marketing::Stopped);
        assert_eq!(
            keys(&out, "consent"),
            [format!("{PN}:{PHONE}"), format!("{PN}:{ANA}")]
        );
    }
}
