//! Users the sandbox knows by phone, by business-scoped user ID (BSUID), or
//! both (`meta/IDENTITY.md`, DESIGN.md §10).
//!
//! * Every phone has one BSUID, [`bsuid_of`]: deterministic, so tests can
//!   compute what the sandbox will answer.
//! * A BSUID can only be turned back into a phone the sandbox has seen: a
//!   valid send to that phone, a [`Sandbox::record_inbound`] of it, or a
//!   phone listed in `SandboxConfig::username_users`. A BSUID of a phone
//!   seen resolves to that phone for the window, the pair limiter and
//!   `fixed_errors`; any other BSUID (and every parent BSUID) is its own
//!   user.
//! * Bounded: at most [`MAX_KNOWN_PHONES`] phones learned; when full,
//!   phones not seen for [`PHONE_SHARED_MS`] are forgotten (at most once a
//!   second) and a phone that still does not fit is not learned. The
//!   `username_users` are never forgotten.
//!
//! [`Sandbox::record_inbound`]: super::Sandbox::record_inbound

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::validate::digits;

/// Phones learned for BSUID resolution (besides `username_users`).
pub const MAX_KNOWN_PHONES: usize = super::MAX_INBOUND_PAIRS;
/// Meta shares a phone with a business that exchanged a message with the
/// user in the last 30 days (IDENTITY.md §3); a phone not seen for that
/// long may be forgotten.
pub const PHONE_SHARED_MS: u64 = 30 * 24 * 3600 * 1000;
/// Hex characters of SHA-256 in a sandbox BSUID.
const BSUID_HEX: usize = 20;

/// The BSUID of the user with phone `wa_id` (its digits; `+` and
/// separators are ignored): `US.` and the first 20 uppercase hex characters
/// of SHA-256 of the digits, e.g. `US.6A1F…`.
pub fn bsuid_of(wa_id: &str) -> String {
    let hash = Sha256::digest(digits(wa_id).as_bytes());
    let mut hex = hex::encode_upper(hash);
    hex.truncate(BSUID_HEX);
    format!("US.{hex}")
}

/// The BSUID shape checks are Meta's, shared with the gateway.
pub use crate::meta::identity::{is_bsuid, is_parent_bsuid};

/// The username the sandbox gives a username user: `@user` and the last
/// four digits of the phone.
pub fn username_of(wa_id: &str) -> String {
    format!("@user{}", last4(&digits(wa_id)))
}

/// The profile name the sandbox gives a user (phone digits or BSUID):
/// `Sandbox User` and its last four characters.
pub fn profile_name(user: &str) -> String {
    let user = if is_bsuid(user) {
        user.to_string()
    } else {
        digits(user)
    };
    format!("Sandbox User {}", last4(&user))
}

fn last4(s: &str) -> &str {
    let start = s.char_indices().rev().nth(3).map(|(i, _)| i).unwrap_or(0);
    &s[start..]
}

/// BSUID → phone, for the phones the sandbox has seen.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    /// Phone digits of username users.
    usernames: HashSet<String>,
    /// BSUID → phone of the username users (never forgotten).
    fixed: HashMap<String, String>,
    /// BSUID → (phone, last seen, Unix ms).
    seen: HashMap<String, (String, u64)>,
    last_prune_ms: u64,
    warned_full: bool,
}

impl Directory {
    pub(crate) fn new(username_users: &[String]) -> Directory {
        let usernames: HashSet<String> = username_users.iter().map(|p| digits(p)).collect();
        let fixed = usernames.iter().map(|p| (bsuid_of(p), p.clone())).collect();
        Directory {
            usernames,
            fixed,
            ..Directory::default()
        }
    }

    /// Records that the sandbox saw phone `wa_id` (digits) at `now_ms`.
    pub(crate) fn learn(&mut self, wa_id: &str, now_ms: u64) {
        if wa_id.is_empty() || self.usernames.contains(wa_id) {
            return;
        }
        let bsuid = bsuid_of(wa_id);
        if let Some(e) = self.seen.get_mut(&bsuid) {
            e.1 = e.1.max(now_ms);
            return;
        }
        if self.seen.len() >= MAX_KNOWN_PHONES {
            if now_ms.saturating_sub(self.last_prune_ms) >= 1000 {
                self.last_prune_ms = now_ms;
                self.seen
                    .retain(|_, (_, at)| at.saturating_add(PHONE_SHARED_MS) > now_ms);
            }
            if self.seen.len() >= MAX_KNOWN_PHONES {
                if !self.warned_full {
                    self.warned_full = true;
                    tracing::warn!(
                        "sandbox table of known phones full; BSUIDs of new phones stay unresolved"
                    );
                }
                return;
            }
        }
        self.seen.insert(bsuid, (wa_id.to_string(), now_ms));
    }

    /// The phone of `bsuid`, if the sandbox has seen it.
    pub(crate) fn phone_of(&self, bsuid: &str) -> Option<&str> {
        self.fixed
            .get(bsuid)
            .or_else(|| self.seen.get(bsuid).map(|(p, _)| p))
            .map(String::as_str)
    }

    /// Whether phone `wa_id` (digits) belongs to a username user.
    pub(crate) fn is_username_user(&self, wa_id: &str) -> bool {
        self.usernames.contains(wa_id)
    }

    #[cfg(test)]
    fn learned(&self) -> usize {
        self.seen.len()
    }
}

/// The user a send or an inbound message concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// What the window, the pair limiter and `fixed_errors` key on: the
    /// phone digits when known, else the BSUID.
    pub key: String,
    /// Phone digits, when known.
    pub phone: Option<String>,
    /// The BSUID (or parent BSUID).
    pub bsuid: String,
}

impl Resolved {
    /// A user addressed by phone digits.
    pub(crate) fn phone(wa_id: &str) -> Resolved {
        Resolved {
            key: wa_id.to_string(),
            phone: Some(wa_id.to_string()),
            bsuid: bsuid_of(wa_id),
        }
    }

    /// A user addressed by `id`: a BSUID, or phone digits in any format.
    pub(crate) fn of(id: &str, dir: &Directory) -> Resolved {
        if !is_bsuid(id) {
            return Resolved::phone(&digits(id));
        }
        let phone = dir.phone_of(id).map(str::to_string);
        Resolved {
            key: phone.clone().unwrap_or_else(|| id.to_string()),
            phone,
            bsuid: id.to_string(),
        }
    }

    /// Whether a `fixed_errors` filter (`to`: phone in any format, or a
    /// BSUID) names this user.
    pub(crate) fn matches(&self, filter: &str) -> bool {
        if is_bsuid(filter) {
            filter == self.bsuid
        } else {
            self.phone.as_deref() == Some(digits(filter).as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bsuids_are_deterministic_and_well_formed() {
        let a = bsuid_of("14155550123");
        assert_eq!(a, bsuid_of("+1 (415) 555-0123"));
        assert_ne!(a, bsuid_of("14155550124"));
        assert_eq!(a.len(), 3 + 20);
        assert!(a.starts_with("US."));
        assert!(a[3..]
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)));
        assert!(is_bsuid(&a));
        // SHA-256("14155550123"), first 20 hex characters.
        let h = hex::encode_upper(Sha256::digest(b"14155550123"));
        assert_eq!(a, format!("US.{}", &h[..20]));
    }

    #[test]
    fn bsuid_shape() {
        for ok in [
            "BR.8821736450019923",
            "US.a",
            "BR.ENT.90017736450011",
            "GB.ENT",
            &format!("US.{}", "x".repeat(128)),
        ] {
            assert!(is_bsuid(ok), "{ok}");
        }
        for bad in [
            "",
            "BR.",
            "BR.ENT.",
            "br.8821",
            "B.8821",
            "BRA.8821",
            "BR-8821",
            "BR.88 21",
            "BR.88.21",
            "BR.ENT.ENT.1",
            "14155550123",
            "BR.é",
            &format!("US.{}", "x".repeat(129)),
        ] {
            assert!(!is_bsuid(bad), "{bad}");
        }
        assert!(is_parent_bsuid("BR.ENT.9001"));
        assert!(!is_parent_bsuid("BR.ENT"));
        assert!(!is_parent_bsuid("BR.9001"));
    }

    #[test]
    fn names() {
        assert_eq!(username_of("+14155550123"), "@user0123");
        assert_eq!(profile_name("14155550123"), "Sandbox User 0123");
        assert_eq!(profile_name("BR.88219923"), "Sandbox User 9923");
        assert_eq!(last4("12"), "12");
    }

    #[test]
    fn resolution_follows_the_phones_seen() {
        let mut d = Directory::new(&["+5511987650001".into()]);
        let b = bsuid_of("14155550123");
        let r = Resolved::of(&b, &d);
        assert_eq!((r.key.as_str(), r.phone.as_deref()), (b.as_str(), None));
        d.learn("14155550123", 1);
        let r = Resolved::of(&b, &d);
        assert_eq!(r.key, "14155550123");
        assert_eq!(r.phone.as_deref(), Some("14155550123"));
        assert!(r.matches("+1 415 555 0123") && r.matches(&b));
        assert!(!r.matches("14155550124"));
        // Username users are known from the start.
        let u = Resolved::of(&bsuid_of("5511987650001"), &d);
        assert_eq!(u.key, "5511987650001");
        assert!(d.is_username_user("5511987650001"));
        // A phone is its own key; a parent BSUID never resolves.
        assert_eq!(Resolved::of("+1 415 555 0123", &d).key, "14155550123");
        assert_eq!(Resolved::of("US.ENT.1", &d).key, "US.ENT.1");
    }

    #[test]
    fn the_directory_is_bounded() {
        let mut d = Directory::new(&[]);
        for i in 0..MAX_KNOWN_PHONES as u64 {
            d.learn(&(10_000_000_000 + i).to_string(), 1_000);
        }
        assert_eq!(d.learned(), MAX_KNOWN_PHONES);
        // Full of recent phones: a new one is not learned.
        d.learn("19999999999", 2_000);
        assert_eq!(d.learned(), MAX_KNOWN_PHONES);
        assert_eq!(d.phone_of(&bsuid_of("19999999999")), None);
        // Thirty days later the old ones make room.
        d.learn("19999999999", 1_000 + PHONE_SHARED_MS);
        assert_eq!(d.learned(), 1);
        assert_eq!(d.phone_of(&bsuid_of("19999999999")), Some("19999999999"));
    }
}
