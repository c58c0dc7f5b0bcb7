//! Policy before sending (DESIGN §6): expiry, consent, marketing preference
//! and the 24-hour customer service window. Pure: state and clock come in.

use crate::contacts::{Consent, ContactState, Marketing};
use crate::egress::request::{Category, SendRequest};

/// The customer service window.
pub const WINDOW_MS: u64 = 24 * 3600 * 1000;

/// Why a request is not sent (gateway codes of SendResult).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Expired,
    OptedOut,
    MarketingStopped,
    NoOptIn,
    OutsideWindow,
}

impl Block {
    /// A block that comes from the user's consent or window (counted in
    /// `wagate_consent_blocked_total`; the others in `wagate_egress_blocked_total`).
    pub fn is_consent(self) -> bool {
        !matches!(self, Block::Expired)
    }

    pub const ALL: [Block; 5] = [
        Block::Expired,
        Block::OptedOut,
        Block::MarketingStopped,
        Block::NoOptIn,
        Block::OutsideWindow,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Block::Expired => "expired",
            Block::OptedOut => "opted_out",
            Block::MarketingStopped => "marketing_stopped",
            Block::NoOptIn => "no_opt_in",
            Block::OutsideWindow => "outside_window",
        }
    }

    /// The result's error code.
    pub fn gateway_code(self) -> crate::egress::request::GatewayCode {
        use crate::egress::request::GatewayCode as G;
        match self {
            Block::Expired => G::Expired,
            Block::OptedOut => G::OptedOut,
            Block::MarketingStopped => G::MarketingStopped,
            Block::NoOptIn => G::NoOptIn,
            Block::OutsideWindow => G::OutsideWindow,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Block::Expired => "the request expired before it could be sent",
            Block::OptedOut => {
                "the user opted out; only service replies inside an open window are allowed"
            }
            Block::MarketingStopped => "the user stopped marketing messages",
            Block::NoOptIn => "marketing needs the user's opt-in",
            Block::OutsideWindow => {
                "free-form messages need a user message in the last 24 hours; send a template"
            }
        }
    }
}

/// Whether the window is open at `now_ms`.
pub fn window_open(state: &ContactState, now_ms: u64) -> bool {
    state
        .last_inbound_ms
        .is_some_and(|t| now_ms < t.saturating_add(WINDOW_MS))
}

/// Checks a request against what is known of its recipient.
pub fn check(
    req: &SendRequest,
    state: &ContactState,
    now_ms: u64,
    marketing_requires_opt_in: bool,
) -> Result<(), Block> {
    if req.expires_at_ms.is_some_and(|e| now_ms >= e) {
        return Err(Block::Expired);
    }
    let open = window_open(state, now_ms);
    if state.consent == Consent::OptedOut && !(req.category() == Category::Service && open) {
        return Err(Block::OptedOut);
    }
    if req.category() == Category::Marketing {
        if state.marketing == Marketing::Stopped {
            return Err(Block::MarketingStopped);
        }
        if marketing_requires_opt_in && state.consent != Consent::OptedIn {
            return Err(Block::NoOptIn);
        }
    }
    if !req.is_template() && !open {
        return Err(Block::OutsideWindow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(category: &str, template: bool, expires: Option<u64>) -> SendRequest {
        let message = if template {
            serde_json::json!({"type":"template","template":{"name":"t","language":{"code":"en"}}})
        } else {
            serde_json::json!({"type":"text","text":{"body":"hi"}})
        };
        SendRequest {
            v: 1,
            request_id: "r".into(),
            phone_number_id: "1".into(),
            to: Some("+5511987654321".into()),
            recipient: None,
            category: serde_json::from_value(serde_json::Value::String(category.into())).unwrap(),
            expires_at_ms: expires,
            message,
        }
    }

    const NOW: u64 = 1_781_600_000_000;

    fn state(consent: Consent, marketing: Marketing, last: Option<u64>) -> ContactState {
        ContactState {
            consent,
            marketing,
            last_inbound_ms: last,
        }
    }

    #[test]
    fn window_rules() {
        let open = state(Consent::Unknown, Marketing::Allowed, Some(NOW - 1000));
        let closed = state(Consent::Unknown, Marketing::Allowed, Some(NOW - WINDOW_MS));
        let never = ContactState::default();
        assert_eq!(
            check(&req("service", false, None), &open, NOW, true),
            Ok(())
        );
        assert_eq!(
            check(&req("service", false, None), &closed, NOW, true),
            Err(Block::OutsideWindow)
        );
        assert_eq!(
            check(&req("service", false, None), &never, NOW, true),
            Err(Block::OutsideWindow)
        );
        assert_eq!(
            check(&req("utility", true, None), &never, NOW, true),
            Ok(())
        );
    }

    #[test]
    fn consent_and_marketing_rules() {
        let out_open = state(Consent::OptedOut, Marketing::Allowed, Some(NOW - 1000));
        let out_closed = state(Consent::OptedOut, Marketing::Allowed, None);
        assert_eq!(
            check(&req("service", false, None), &out_open, NOW, true),
            Ok(())
        );
        assert_eq!(
            check(&req("utility", true, None), &out_open, NOW, true),
            Err(Block::OptedOut)
        );
        assert_eq!(
            check(&req("utility", true, None), &out_closed, NOW, true),
            Err(Block::OptedOut)
        );
        let unknown = ContactState::default();
        assert_eq!(
            check(&req("marketing", true, None), &unknown, NOW, true),
            Err(Block::NoOptIn)
        );
        assert_eq!(
            check(&req("marketing", true, None), &unknown, NOW, false),
            Ok(())
        );
        let opted_in = state(Consent::OptedIn, Marketing::Allowed, None);
        assert_eq!(
            check(&req("marketing", true, None), &opted_in, NOW, true),
            Ok(())
        );
        let stopped = state(Consent::OptedIn, Marketing::Stopped, None);
        assert_eq!(
            check(&req("marketing", true, None), &stopped, NOW, true),
            Err(Block::MarketingStopped)
        );
        assert_eq!(
            check(&req("utility", true, None), &stopped, NOW, true),
            Ok(())
        );
    }

    #[test]
    fn expiry_first() {
        let s = state(Consent::OptedIn, Marketing::Allowed, Some(NOW));
        assert_eq!(
            check(&req("authentication", true, Some(NOW)), &s, NOW, true),
            Err(Block::Expired)
        );
        assert_eq!(
            check(&req("authentication", true, Some(NOW + 1)), &s, NOW, true),
            Ok(())
        );
    }
}
