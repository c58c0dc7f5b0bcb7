//! Every topic wagate uses, as a closed set (DESIGN §4), with its cleanup
//! policy and retention, and the full names for one prefix, resolved once
//! (in `app.rs`, `cli.rs`) and handed to the planes: a misspelt topic does
//! not compile.

/// A topic of DESIGN §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicId {
    InboundMessages,
    InboundStatuses,
    InboundEvents,
    InboundRaw,
    OutboundRequests,
    OutboundResults,
    OutboundDlq,
    /// Internal: an attempt is recorded before each Graph API call (guarantee 5).
    OutboundAttempts,
    Consent,
    Windows,
    /// Links of a phone and a BSUID as one person (DESIGN §10), compacted,
    /// keyed `{phone_number_id}:{bsuid}`.
    Users,
    /// Internal: the event ids each instance stored, shared by the fleet's
    /// dedupe (DESIGN §12); short retention, read back at start.
    InboundIds,
    /// What wagate learns about each business number (DESIGN §14),
    /// compacted, keyed by phone_number_id.
    Numbers,
    /// Every template of every WABA served (DESIGN §14), compacted, keyed
    /// `{waba_id}:{name}:{language}`.
    Templates,
    /// One record per inbound media item fetched (or not) into the object
    /// store (DESIGN §13), keyed phone_number_id.
    InboundMedia,
}

const DAY_MS: i64 = 24 * 3600 * 1000;

impl TopicId {
    /// How many topics there are.
    pub const COUNT: usize = 15;

    pub const ALL: [TopicId; TopicId::COUNT] = [
        TopicId::InboundMessages,
        TopicId::InboundStatuses,
        TopicId::InboundEvents,
        TopicId::InboundRaw,
        TopicId::OutboundRequests,
        TopicId::OutboundResults,
        TopicId::OutboundDlq,
        TopicId::OutboundAttempts,
        TopicId::Consent,
        TopicId::Windows,
        TopicId::Users,
        TopicId::InboundIds,
        TopicId::Numbers,
        TopicId::Templates,
        TopicId::InboundMedia,
    ];

    /// The name without the prefix (`inbound.messages`).
    pub const fn name(self) -> &'static str {
        self.spec().name
    }

    /// Name, cleanup policy and retention.
    pub const fn spec(self) -> TopicSpec {
        match self {
            TopicId::InboundMessages => TopicSpec::delete("inbound.messages", 30 * DAY_MS),
            TopicId::InboundStatuses => TopicSpec::delete("inbound.statuses", 30 * DAY_MS),
            TopicId::InboundEvents => TopicSpec::delete("inbound.events", 30 * DAY_MS),
            TopicId::InboundRaw => TopicSpec::delete("inbound.raw", 3 * DAY_MS),
            TopicId::OutboundRequests => TopicSpec::delete("outbound.requests", 7 * DAY_MS),
            TopicId::OutboundResults => TopicSpec::delete("outbound.results", 7 * DAY_MS),
            TopicId::OutboundDlq => TopicSpec::delete("outbound.dlq", 30 * DAY_MS),
            TopicId::OutboundAttempts => TopicSpec::delete("outbound.attempts", 7 * DAY_MS),
            TopicId::Consent => TopicSpec::compact("consent"),
            TopicId::Windows => TopicSpec::compact("windows"),
            TopicId::Users => TopicSpec::compact("users"),
            TopicId::InboundIds => TopicSpec::delete("inbound.ids", 2 * DAY_MS),
            TopicId::Numbers => TopicSpec::compact("numbers"),
            TopicId::Templates => TopicSpec::compact("templates"),
            TopicId::InboundMedia => TopicSpec::delete("inbound.media", 30 * DAY_MS),
        }
    }

    /// The topic of a name without prefix (`wagate tail inbound.raw`).
    pub fn from_name(name: &str) -> Option<TopicId> {
        TopicId::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A topic's name, cleanup policy and retention.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec {
    pub name: &'static str,
    pub compact: bool,
    /// `retention.ms` for delete topics (-1 for compacted ones).
    pub retention_ms: i64,
}

impl TopicSpec {
    const fn delete(name: &'static str, retention_ms: i64) -> TopicSpec {
        TopicSpec {
            name,
            compact: false,
            retention_ms,
        }
    }
    const fn compact(name: &'static str) -> TopicSpec {
        TopicSpec {
            name,
            compact: true,
            retention_ms: -1,
        }
    }
}

/// Every topic's spec, in [`TopicId::ALL`] order.
pub const TOPICS: [TopicSpec; TopicId::COUNT] = {
    let mut out = [TopicId::InboundMessages.spec(); TopicId::COUNT];
    let mut i = 0;
    while i < TopicId::COUNT {
        out[i] = TopicId::ALL[i].spec();
        i += 1;
    }
    out
};

/// The full names of every topic for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    names: [String; TopicId::COUNT],
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            names: TopicId::ALL.map(|t| format!("{prefix}{}", t.name())),
        }
    }

    /// `{prefix}{name}`.
    pub fn name(&self, t: TopicId) -> &str {
        &self.names[t as usize]
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_policies_and_order() {
        let t = Topics::new("wa.");
        assert_eq!(t.name(TopicId::InboundRaw), "wa.inbound.raw");
        assert_eq!(t.name(TopicId::Consent), "wa.consent");
        for (i, id) in TopicId::ALL.iter().enumerate() {
            assert_eq!(*id as usize, i);
            assert_eq!(TOPICS[i].name, id.name());
            assert_eq!(TopicId::from_name(id.name()), Some(*id));
        }
        assert!(TopicId::Windows.spec().compact);
        assert!(!TopicId::InboundRaw.spec().compact);
        assert_eq!(TopicId::InboundRaw.spec().retention_ms, 3 * DAY_MS);
        assert_eq!(TopicId::from_name("nope"), None);
    }
}
