//! Who a user is (DESIGN §10, IDENTITY.md): Meta knows a WhatsApp user by a
//! phone number (`wa_id`), by a business-scoped user id (BSUID), or both. A
//! [`UserId`] is one of those ids, checked; a [`User`] is what one webhook
//! item tells of a person (any subset of the ids).
//!
//! A BSUID is never run through a phone normaliser: `BR.8821736450019923`
//! stripped of non-digits would be a fake phone number.

/// Longest BSUID body (after `CC.` or `CC.ENT.`).
pub const MAX_BSUID_BODY: usize = 128;

/// One id of a user: phone digits (no `+`), or a BSUID / parent BSUID, byte
/// for byte as Meta sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserId<'a> {
    Phone(&'a str),
    Bsuid(&'a str),
}

/// Why a string is not a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadUserId {
    #[error("must be a phone number (digits, + optional) or a BSUID such as BR.8821736450019923")]
    Neither,
}

/// `^[A-Z]{2}\.(ENT\.)?[A-Za-z0-9]{1,128}$`: a BSUID or a parent BSUID.
pub fn is_bsuid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 4 || !b[0].is_ascii_uppercase() || !b[1].is_ascii_uppercase() || b[2] != b'.' {
        return false;
    }
    let body = b[3..].strip_prefix(b"ENT.").unwrap_or(&b[3..]);
    (1..=MAX_BSUID_BODY).contains(&body.len()) && body.iter().all(u8::is_ascii_alphanumeric)
}

/// A parent BSUID (`CC.ENT.…`): shared by several portfolios of one
/// business; it can address a send but is not a person's own id.
pub fn is_parent_bsuid(s: &str) -> bool {
    is_bsuid(s) && s.as_bytes()[3..].starts_with(b"ENT.")
}

/// Phone digits as the contacts key holds them: `+` dropped, 1–20 digits.
fn phone_digits(s: &str) -> Option<&str> {
    let d = s.strip_prefix('+').unwrap_or(s);
    ((1..=20).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())).then_some(d)
}

impl<'a> UserId<'a> {
    /// Phone digits (a leading `+` is dropped) or a BSUID; anything else is
    /// refused.
    pub fn parse(s: &'a str) -> Result<UserId<'a>, BadUserId> {
        if let Some(d) = phone_digits(s) {
            Ok(UserId::Phone(d))
        } else if is_bsuid(s) {
            Ok(UserId::Bsuid(s))
        } else {
            Err(BadUserId::Neither)
        }
    }

    /// The id as keys and records hold it.
    pub fn as_str(self) -> &'a str {
        match self {
            UserId::Phone(s) | UserId::Bsuid(s) => s,
        }
    }

    pub fn is_bsuid(self) -> bool {
        matches!(self, UserId::Bsuid(_))
    }
}

/// What one webhook item tells of a user: the phone when Meta shares it,
/// the BSUID (and the parent BSUID) when present. Never all empty when it
/// names a user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub wa_id: Option<String>,
    pub user_id: Option<String>,
    pub parent_user_id: Option<String>,
}

impl User {
    /// From the optional fields of a webhook item; ids of the wrong shape
    /// are dropped (a phone field that is not digits, a BSUID field that is
    /// not a BSUID), so nothing malformed reaches a key.
    pub fn from_fields(
        wa_id: Option<&str>,
        user_id: Option<&str>,
        parent_user_id: Option<&str>,
    ) -> Option<User> {
        let u = User {
            wa_id: wa_id.and_then(phone_digits).map(str::to_string),
            user_id: user_id.filter(|s| is_bsuid(s)).map(str::to_string),
            parent_user_id: parent_user_id.filter(|s| is_bsuid(s)).map(str::to_string),
        };
        (u.wa_id.is_some() || u.user_id.is_some()).then_some(u)
    }

    /// The id state is kept under first: the phone when known, else the
    /// BSUID.
    pub fn primary(&self) -> Option<UserId<'_>> {
        self.wa_id
            .as_deref()
            .map(UserId::Phone)
            .or(self.user_id.as_deref().map(UserId::Bsuid))
    }

    /// Phone and BSUID together: the two are one person.
    pub fn pair(&self) -> Option<(&str, &str)> {
        self.wa_id.as_deref().zip(self.user_id.as_deref())
    }
}

/// A change of a user's ids reported by Meta (`user_changed_number`,
/// `user_changed_user_id`, the legacy `user_id_update` field): the state
/// known under `previous` moves to `current`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdChange {
    pub previous: User,
    pub current: User,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bsuid_shapes() {
        for ok in [
            "BR.8821736450019923",
            "US.a",
            "BR.ENT.99",
            "DE.ENT.ENT",
            &format!("US.{}", "a".repeat(128)),
        ] {
            assert!(is_bsuid(ok), "{ok}");
        }
        for bad in [
            "",
            "BR.",
            "BR.ENT.",
            "br.123",
            "B.123",
            "BRA.123",
            "BR-123",
            "BR.12 3",
            "BR.12.3",
            "BR.123\n",
            "5511987650001",
            &format!("US.{}", "a".repeat(129)),
            "BR.ENT.x.y",
            "BR.ñ",
        ] {
            assert!(!is_bsuid(bad), "{bad:?}");
        }
        assert!(is_parent_bsuid("BR.ENT.1"));
        assert!(!is_parent_bsuid("BR.1"));
        // "ENT" alone is a body, not a parent prefix.
        assert!(is_bsuid("BR.ENT") && !is_parent_bsuid("BR.ENT"));
    }

    #[test]
    fn user_ids_parse_phones_and_bsuids_never_normalising_a_bsuid() {
        assert_eq!(
            UserId::parse("+5511987650001"),
            Ok(UserId::Phone("5511987650001"))
        );
        assert_eq!(
            UserId::parse("14155550123"),
            Ok(UserId::Phone("14155550123"))
        );
        assert_eq!(
            UserId::parse("BR.8821736450019923"),
            Ok(UserId::Bsuid("BR.8821736450019923"))
        );
        for bad in [
            "",
            "+",
            "+55 11",
            "br.1",
            "BR.1%2E",
            "1".repeat(21).as_str(),
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn users_from_fields_drop_malformed_ids() {
        let u = User::from_fields(Some("5511"), Some("BR.1"), None).unwrap();
        assert_eq!(u.pair(), Some(("5511", "BR.1")));
        assert_eq!(u.primary(), Some(UserId::Phone("5511")));
        let u = User::from_fields(None, Some("BR.1"), Some("BR.ENT.2")).unwrap();
        assert_eq!(u.primary(), Some(UserId::Bsuid("BR.1")));
        assert_eq!(u.pair(), None);
        assert_eq!(User::from_fields(Some("BR.1"), Some("5511"), None), None);
        assert_eq!(User::from_fields(None, None, Some("BR.ENT.2")), None);
    }
}
