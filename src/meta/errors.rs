//! Meta's Graph API error codes and what a gateway does about each
//! (CLOUD_API.md §6.5). Classification is on `error.code`, never on the HTTP
//! status alone.

use std::time::Duration;

/// What a circuit is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The access token (0, 190): replace it, then resume.
    Token,
    /// The app or WABA configuration / permissions.
    Config,
    /// The WABA (policy block, locked, billing).
    Waba,
    /// The business number (registration).
    Number,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Token, Scope::Config, Scope::Waba, Scope::Number];

    pub fn label(self) -> &'static str {
        match self {
            Scope::Token => "token",
            Scope::Config => "config",
            Scope::Waba => "waba",
            Scope::Number => "number",
        }
    }
}

/// The gateway's response to a Meta error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: retry with jittered exponential backoff, at most
    /// `max_attempts` attempts in all, waiting at least `min_delay`.
    Retry {
        max_attempts: u32,
        min_delay: Duration,
    },
    /// Per-number throughput reached (130429): back the lane off and cut its rate.
    HoldNumber,
    /// Pair rate reached (131056): back this (number, user) pair off 4^n s.
    HoldPair,
    /// Hold the whole lane for a while (app/WABA throttles, spam limits,
    /// paused templates), then retry.
    HoldLane(Duration),
    /// Re-queue to the DLQ with `retry_after_ms` (131049: ≥ 24 h).
    Defer(Duration),
    /// Permanent for this message.
    Fail,
    /// Permanent for a scope: open a circuit and alert a human.
    Break(Scope),
}

impl Action {
    /// Metric label of the action class.
    pub fn label(self) -> &'static str {
        match self {
            Action::Retry { .. } => "retry",
            Action::HoldNumber | Action::HoldPair | Action::HoldLane(_) => "hold",
            Action::Defer(_) => "defer",
            Action::Fail => "fail",
            Action::Break(_) => "circuit",
        }
    }
}

const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// The action for an error code.
pub fn classify(code: i64) -> Action {
    match code {
        0 | 190 => Action::Break(Scope::Token),
        3 | 10 | 200..=299 | 131005 | 131037 | 134011 => Action::Break(Scope::Config),
        368 | 131031 | 131042 => Action::Break(Scope::Waba),
        131045 | 133010 | 133000 | 133005..=133009 | 133016 => Action::Break(Scope::Number),
        // 133015: wait 5 minutes after a deregistration.
        133015 => Action::HoldLane(5 * MIN),
        4 | 17 | 613 | 80007 | 80008 => Action::HoldLane(5 * MIN),
        130429 => Action::HoldNumber,
        131056 => Action::HoldPair,
        // Spam rate limit: do not hammer it; wait hours.
        131048 => Action::HoldLane(4 * HOUR),
        // Messaging limit from template classification violations.
        131064 => Action::HoldLane(6 * HOUR),
        // Template paused (or held message dropped): hold until unpaused.
        132015 => Action::HoldLane(3 * HOUR),
        132069 => Action::HoldLane(HOUR),
        131049 => Action::Defer(24 * HOUR),
        // Number in maintenance during a throughput upgrade (~1 min).
        131057 => Action::Retry {
            max_attempts: 4,
            min_delay: MIN,
        },
        // Template still syncing to the Marketing Messages API (~10 min).
        134101 => Action::Retry {
            max_attempts: 3,
            min_delay: 10 * MIN,
        },
        131000 | 131016 | 2 | 133004 => Action::Retry {
            max_attempts: 5,
            min_delay: Duration::from_millis(500),
        },
        1 => Action::Retry {
            max_attempts: 2,
            min_delay: Duration::from_millis(500),
        },
        // 100, 131008/9, 131021/26/30/47/50/51/53, 130403/472/497, 132000-132018,
        // 132016, 132068, 131062 (a BSUID recipient for an authentication
        // template), 131063, 134100, 134102, 135000, 137000 and anything
        // unknown: permanent for this message.
        _ => Action::Fail,
    }
}

/// Whether `code` is one of the codes of Meta's table (CLOUD_API.md §6.5)
/// that [`classify`] names, as opposed to a code Meta adds tomorrow.
pub fn is_known(code: i64) -> bool {
    matches!(
        code,
        0..=4
            | 10
            | 17
            | 100
            | 190
            | 200..=299
            | 368
            | 613
            | 80007
            | 80008
            | 130403
            | 130429
            | 130472
            | 130497
            | 131000
            | 131005
            | 131008
            | 131009
            | 131016
            | 131021
            | 131026
            | 131030
            | 131031
            | 131037
            | 131042
            | 131045
            | 131047..=131057
            | 131062
            | 131063
            | 131064
            | 132000..=132018
            | 132068
            | 132069
            | 133000
            | 133004..=133010
            | 133015
            | 133016
            | 134011
            | 134100..=134102
            | 135000
            | 137000
    )
}

/// The metric label of a Meta error code: the code for one of Meta's table,
/// `other` for anything else, so a sender cannot grow the label set.
pub fn code_label(code: i64) -> String {
    if is_known(code) {
        code.to_string()
    } else {
        "other".to_string()
    }
}

/// Whether a failure code means the user stopped marketing messages (the
/// contacts plane records it).
pub fn marks_marketing_stopped(code: i64) -> bool {
    code == 131050
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_md_5_codes() {
        for code in [131062, 131063, 132018, 134100, 134102, 137000] {
            assert_eq!(classify(code), Action::Fail, "{code}");
            assert!(is_known(code), "{code}");
        }
        assert!(matches!(
            classify(131057),
            Action::Retry { min_delay, .. } if min_delay >= MIN
        ));
        assert!(matches!(
            classify(134101),
            Action::Retry { min_delay, .. } if min_delay >= 10 * MIN
        ));
    }

    #[test]
    fn unknown_codes_are_labelled_other() {
        for code in [131047, 130429, 131026, 200, 299, 132012, 0] {
            assert_eq!(code_label(code), code.to_string());
        }
        for code in [999_999, -5, 131_999, 5] {
            assert_eq!(code_label(code), "other", "{code}");
        }
    }

    #[test]
    fn table_of_cloud_api_6_5() {
        let cases: &[(i64, &str)] = &[
            (0, "circuit"),
            (190, "circuit"),
            (3, "circuit"),
            (10, "circuit"),
            (250, "circuit"),
            (131005, "circuit"),
            (4, "hold"),
            (17, "hold"),
            (613, "hold"),
            (80007, "hold"),
            (130429, "hold"),
            (131056, "hold"),
            (131048, "hold"),
            (131049, "defer"),
            (131050, "fail"),
            (130472, "fail"),
            (131047, "fail"),
            (131026, "fail"),
            (131021, "fail"),
            (131030, "fail"),
            (130403, "fail"),
            (130497, "fail"),
            (131051, "fail"),
            (131053, "fail"),
            (100, "fail"),
            (131008, "fail"),
            (131009, "fail"),
            (132000, "fail"),
            (132001, "fail"),
            (132005, "fail"),
            (132007, "fail"),
            (132012, "fail"),
            (132015, "hold"),
            (132016, "fail"),
            (132018, "fail"),
            (132068, "fail"),
            (132069, "hold"),
            (131057, "retry"),
            (131000, "retry"),
            (131016, "retry"),
            (2, "retry"),
            (133004, "retry"),
            (1, "retry"),
            (135000, "fail"),
            (368, "circuit"),
            (131031, "circuit"),
            (131042, "circuit"),
            (131045, "circuit"),
            (133010, "circuit"),
            (133000, "circuit"),
            (133007, "circuit"),
            (133015, "hold"),
            (133016, "circuit"),
            (131037, "circuit"),
            (131063, "fail"),
            (131064, "hold"),
            (131062, "fail"),
            (137000, "fail"),
            (134011, "circuit"),
            (999_999, "fail"),
        ];
        for (code, want) in cases {
            assert_eq!(classify(*code).label(), *want, "code {code}");
        }
    }

    #[test]
    fn scopes_and_delays() {
        assert_eq!(classify(190), Action::Break(Scope::Token));
        assert_eq!(classify(368), Action::Break(Scope::Waba));
        assert_eq!(classify(133010), Action::Break(Scope::Number));
        assert_eq!(
            classify(131049),
            Action::Defer(Duration::from_secs(24 * 3600))
        );
        assert_eq!(classify(130429), Action::HoldNumber);
        assert_eq!(classify(131056), Action::HoldPair);
        assert!(
            matches!(classify(131057), Action::Retry { min_delay, .. } if min_delay >= Duration::from_secs(60))
        );
        assert!(marks_marketing_stopped(131050));
        assert!(!marks_marketing_stopped(131049));
    }
}
