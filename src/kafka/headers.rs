//! The headers on every record wagate writes (DESIGN §4: `wagate-event-id`,
//! `wagate-kind`, `wagate-app`, and a few that some records add), as one
//! struct with a closed [`Kind`]: a misspelt header name or kind does not
//! compile.

use super::HeaderPair;

pub const EVENT_ID: &str = "wagate-event-id";
pub const KIND: &str = "wagate-kind";
pub const APP: &str = "wagate-app";
/// How often a request was redriven from the DLQ.
pub const REDRIVE: &str = "wagate-redrive";
/// On `wa.inbound.raw`: Meta's signature header and the receipt time.
pub const SIGNATURE: &str = "wagate-signature";
pub const RECEIVED_AT_MS: &str = "wagate-received-at-ms";
/// On `wa.inbound.raw`, when the body was kept instead of exploded.
pub const UNPARSEABLE: &str = "wagate-unparseable";
pub const OVER_LIMIT: &str = "wagate-over-limit";

/// What a record is (`wagate-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// An event of a webhook: `message`, `status`, `error`, or the webhook
    /// field name of any other change (Meta's vocabulary, not ours).
    Webhook(&'a str),
    /// A webhook body as received (`wa.inbound.raw`).
    Raw,
    /// A send request (`wa.outbound.requests`).
    Request,
    /// An attempt recorded before a Graph API call.
    Attempt,
    /// A send result.
    Result,
    /// A dead-lettered request.
    Dlq,
    /// A DLQ record that was redriven.
    Redriven,
    /// A consent state (`wa.consent`).
    Consent,
    /// A window record (`wa.windows`).
    Window,
    /// A link of a phone and a BSUID (`wa.users`).
    User,
    /// An erasure's tombstone.
    Erase,
    /// A template of the registry (`wa.templates`).
    Template,
    /// A media item's outcome (`wa.inbound.media`).
    Media,
}

impl<'a> Kind<'a> {
    pub fn as_str(self) -> &'a str {
        match self {
            Kind::Webhook(k) => k,
            Kind::Raw => "raw",
            Kind::Request => "request",
            Kind::Attempt => "attempt",
            Kind::Result => "result",
            Kind::Dlq => "dlq",
            Kind::Redriven => "redriven",
            Kind::Consent => "consent",
            Kind::Window => "window",
            Kind::User => "user",
            Kind::Erase => "erase",
            Kind::Template => "template",
            Kind::Media => "media",
        }
    }
}

/// The headers of one record.
#[derive(Debug, Clone, Copy)]
pub struct RecordHeaders<'a> {
    /// `wagate-event-id`: the id consumers deduplicate on.
    pub event_id: &'a [u8],
    pub kind: Kind<'a>,
    /// `wagate-app`: the Meta app, the API tenant, `egress` or `redrive`.
    pub origin: &'a str,
    /// `wagate-redrive`, when the record is a redriven request.
    pub redrive: Option<&'a [u8]>,
    /// Headers some records add (the raw topic's signature, time, reason).
    pub extra: &'a [HeaderPair<'a>],
}

impl<'a> RecordHeaders<'a> {
    pub fn new(event_id: &'a str, kind: Kind<'a>, origin: &'a str) -> RecordHeaders<'a> {
        RecordHeaders {
            event_id: event_id.as_bytes(),
            kind,
            origin,
            redrive: None,
            extra: &[],
        }
    }

    /// Calls `f` with the headers as pairs (on the stack).
    pub fn with<R>(&self, f: impl FnOnce(&[HeaderPair<'_>]) -> R) -> R {
        const MAX: usize = 8;
        let mut pairs: [HeaderPair<'_>; MAX] = [("", b""); MAX];
        pairs[0] = (EVENT_ID, self.event_id);
        pairs[1] = (KIND, self.kind.as_str().as_bytes());
        pairs[2] = (APP, self.origin.as_bytes());
        let mut n = 3;
        if let Some(r) = self.redrive {
            pairs[n] = (REDRIVE, r);
            n += 1;
        }
        for h in self.extra.iter().take(MAX - n) {
            pairs[n] = *h;
            n += 1;
        }
        f(&pairs[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_triple_comes_first_then_what_a_record_adds() {
        let h = RecordHeaders {
            redrive: Some(b"2"),
            extra: &[(SIGNATURE, b"sha256=x")],
            ..RecordHeaders::new("r1", Kind::Request, "tenant")
        };
        let got: Vec<(String, Vec<u8>)> =
            h.with(|p| p.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect());
        assert_eq!(
            got,
            vec![
                ("wagate-event-id".into(), b"r1".to_vec()),
                ("wagate-kind".into(), b"request".to_vec()),
                ("wagate-app".into(), b"tenant".to_vec()),
                ("wagate-redrive".into(), b"2".to_vec()),
                ("wagate-signature".into(), b"sha256=x".to_vec()),
            ]
        );
        assert_eq!(Kind::Webhook("account_update").as_str(), "account_update");
        assert_eq!(Kind::Window.as_str(), "window");
    }
}
