//! What an inbound webhook event means for the contacts plane (guarantee
//! 7): a message opens the user's 24-hour window; a configured button
//! payload, or else a whole-message STOP/START keyword, sets consent; a
//! `user_preferences` change sets marketing. The cache is updated at once and
//! the compacted-topic records are handed to the caller (ingress produces
//! them with the POST's own records). No HTTP, no Kafka: unit-tested here.

use crate::contacts::keywords::{Keyword, Keywords};
use crate::contacts::records::{consent_event, window_event};
use crate::contacts::{Consent, Contacts, Marketing};
use crate::meta::webhook::Event;

/// A pair's window is written to `wa.windows` at most this often.
pub const WINDOW_WRITE_EVERY_MS: u64 = 5 * 60 * 1000;

/// Contacts, before the 200 (guarantee 7): an inbound message opens the
/// user's 24-hour window; STOP/START keywords and user_preferences
/// changes take effect for every later send. The cache is updated at
/// once, and the records for the compacted topics go out with this
/// POST's own records (`emit`), so the 200 also means they are durable.
pub fn signals(
    c: &dyn Contacts,
    keywords: &Keywords,
    ev: &Event,
    received_at_ms: u64,
    emit: &mut dyn FnMut(Event),
) {
    let mut changed: Option<(&str, &'static str)> = None;
    if let Some((wa_id, ts)) = &ev.inbound {
        // Meta's seconds, never later than receipt (and never wrapping).
        let ms = u64::try_from(*ts)
            .unwrap_or(0)
            .saturating_mul(1000)
            .min(received_at_ms);
        let before = c.get(&ev.key, wa_id).last_inbound_ms;
        c.record_inbound(&ev.key, wa_id, ms);
        if before.is_none_or(|b| ms >= b.saturating_add(WINDOW_WRITE_EVERY_MS)) {
            emit(window_event(&ev.key, wa_id, ms, &ev.event_id));
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
        match said {
            Some((Keyword::OptOut, source)) => {
                c.set_consent(&ev.key, wa_id, Consent::OptedOut);
                changed = Some((wa_id, source));
            }
            Some((Keyword::OptIn, source)) => {
                c.set_consent(&ev.key, wa_id, Consent::OptedIn);
                changed = Some((wa_id, source));
            }
            None => {}
        }
    }
    if let Some((wa_id, source)) = changed {
        let st = c.get(&ev.key, wa_id);
        emit(consent_event(
            &ev.key,
            wa_id,
            &st,
            source,
            received_at_ms,
            &ev.event_id,
        ));
    }
    for (wa_id, stop) in &ev.preferences {
        let m = if *stop {
            Marketing::Stopped
        } else {
            Marketing::Allowed
        };
        c.set_marketing(&ev.key, wa_id, m);
        let st = c.get(&ev.key, wa_id);
        let id = format!("{}:{wa_id}", ev.event_id);
        emit(consent_event(
            &ev.key,
            wa_id,
            &st,
            "user_preferences",
            received_at_ms,
            &id,
        ));
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

    fn run(c: &MemoryContacts, ev: &Event) -> Vec<Event> {
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
        assert_eq!(out[0].kind, "consent");
    }
}
