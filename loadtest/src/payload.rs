//! Meta-shaped webhook bodies, built on the fly, and their signatures.
//!
//! Bodies are compact, ASCII-only JSON in the shape of WhatsApp Cloud API
//! webhooks (`object` / `entry[]` / `changes[]` / `value`). Every event id is
//! `wamid.LT<run prefix><event counter>`: the prefix is random per run and the
//! counter is one atomic shared by all connections, so every id is unique
//! across the run and a deduplicating gateway writes every event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The kind of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One inbound text message.
    Message,
    /// One status update (sent, delivered or read).
    Status,
    /// Several entries and changes mixing messages and statuses.
    Batch,
}

/// Percentages of request kinds; they add up to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub messages: u32,
    pub statuses: u32,
    pub batch: u32,
}

impl Mix {
    /// Parses `messages=60,statuses=30,batch=10`. Kinds left out are 0; the
    /// percentages must add up to 100.
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut m = Mix {
            messages: 0,
            statuses: 0,
            batch: 0,
        };
        let mut seen = [false; 3];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=PERCENT"))?;
            let v: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|v| *v <= 100)
                .ok_or_else(|| format!("{part:?}: the percentage must be 0..=100"))?;
            let (slot, i) = match k.trim() {
                "messages" => (&mut m.messages, 0),
                "statuses" => (&mut m.statuses, 1),
                "batch" => (&mut m.batch, 2),
                other => {
                    return Err(format!(
                        "{other:?}: unknown kind (expected messages, statuses, batch)"
                    ))
                }
            };
            if seen[i] {
                return Err(format!("{:?} is given twice", k.trim()));
            }
            seen[i] = true;
            *slot = v;
        }
        let sum = m.messages + m.statuses + m.batch;
        if sum != 100 {
            return Err(format!(
                "the percentages add up to {sum}, not 100 (e.g. messages=60,statuses=30,batch=10)"
            ));
        }
        Ok(m)
    }

    /// The kind of request number `n`. Over any 100 consecutive requests the
    /// kinds come out in exactly the given percentages, spread evenly
    /// (61 is coprime with 100, so `n * 61 % 100` visits every residue).
    pub fn pick(&self, n: u64) -> Kind {
        let r = (n.wrapping_mul(61) % 100) as u32;
        if r < self.messages {
            Kind::Message
        } else if r < self.messages + self.statuses {
            Kind::Status
        } else {
            Kind::Batch
        }
    }
}

/// One generated request body.
#[derive(Debug)]
pub struct Body {
    pub bytes: Vec<u8>,
    pub events: u32,
    pub kind: Kind,
}

/// Signs bodies the way Meta does: `sha256=<lowercase hex HMAC-SHA256>`
/// over the exact body bytes. The keyed state is computed once and cloned.
#[derive(Clone)]
pub struct Signer {
    keyed: Hmac<Sha256>,
}

/// Length of `sha256=` followed by 64 hex digits.
pub const SIGNATURE_LEN: usize = 7 + 64;

impl Signer {
    pub fn new(secret: &[u8]) -> Signer {
        Signer {
            keyed: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// The `X-Hub-Signature-256` header value for `body`.
    pub fn sign(&self, body: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; SIGNATURE_LEN];
        out[..7].copy_from_slice(b"sha256=");
        hex::encode_to_slice(digest, &mut out[7..]).expect("64 hex digits fit");
        out
    }
}

/// `sha256=<hex>` over the exact bytes, as a string.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let sig = Signer::new(secret).sign(body);
    String::from_utf8(sig.to_vec()).expect("ASCII")
}

/// A business phone number: its WABA, its id and its display number.
#[derive(Debug, Clone, Copy)]
struct Number {
    waba_id: u64,
    phone_number_id: u64,
    display: u64,
}

impl Number {
    fn nth(i: u64) -> Number {
        Number {
            // 15 digits each; ten numbers per business account.
            waba_id: 102_345_600_000_000 + i / 10,
            phone_number_id: 109_876_500_000_000 + i,
            display: 15_550_100_000 + i,
        }
    }
}

/// Builds request bodies; cheap enough to run inline on every request.
pub struct Generator {
    mix: Mix,
    batch_events: u32,
    numbers: u64,
    customers: u64,
    prefix: String,
    requests: AtomicU64,
    events: AtomicU64,
}

/// Events per change in a batch (at most).
const MAX_EVENTS_PER_CHANGE: u32 = 5;
/// Changes per entry in a batch (at most).
const CHANGES_PER_ENTRY: u32 = 2;

/// A cheap, well-mixing hash (splitmix64's finaliser).
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Generator {
    /// `batch_events` and `numbers` must be at least 1.
    pub fn new(mix: Mix, batch_events: u32, numbers: u64) -> Generator {
        Self::with_prefix(
            mix,
            batch_events,
            numbers,
            &format!("{:016X}", rand::random::<u64>()),
        )
    }

    /// As [`Generator::new`] with a given run prefix (ASCII alphanumerics).
    pub fn with_prefix(mix: Mix, batch_events: u32, numbers: u64, prefix: &str) -> Generator {
        assert!(batch_events >= 1 && numbers >= 1);
        assert!(prefix.bytes().all(|b| b.is_ascii_alphanumeric()));
        Generator {
            mix,
            batch_events,
            numbers,
            customers: 1_000_000,
            prefix: prefix.to_string(),
            requests: AtomicU64::new(0),
            events: AtomicU64::new(0),
        }
    }

    /// Spreads events over `n` customers (at least 1; 1,000,000 by default).
    pub fn with_customers(mut self, n: u64) -> Generator {
        self.customers = n.max(1);
        self
    }

    /// A customer's wa_id (13 digits) for event `e`.
    fn customer(&self, e: u64) -> u64 {
        5_511_900_000_000 + mix64(e) % self.customers
    }

    /// The random per-run prefix of every event id.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Events generated so far (all requests, warm-up included).
    pub fn events_generated(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// The next body, of the kind the mix says.
    pub fn next_body(&self) -> Body {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        self.body_of_kind(n, self.mix.pick(n))
    }

    /// A body of the given kind for request number `n`.
    pub fn body_of_kind(&self, n: u64, kind: Kind) -> Body {
        let events = match kind {
            Kind::Message | Kind::Status => 1,
            Kind::Batch => self.batch_events,
        };
        let first = self.events.fetch_add(events as u64, Ordering::Relaxed);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut o = Out(Vec::with_capacity(384 + 224 * events as usize));
        o.s(r#"{"object":"whatsapp_business_account","entry":["#);
        match kind {
            Kind::Message => {
                let number = self.number(n, 0);
                open_entry(&mut o, number);
                self.messages_change(&mut o, number, first, 1, ts);
                o.s("]}");
            }
            Kind::Status => {
                let number = self.number(n, 0);
                open_entry(&mut o, number);
                self.statuses_change(&mut o, number, first, 1, ts);
                o.s("]}");
            }
            Kind::Batch => self.batch(&mut o, n, first, events, ts),
        }
        o.s("]}");
        Body {
            bytes: o.0,
            events,
            kind,
        }
    }

    /// The business number for entry `j` of request `n`.
    fn number(&self, n: u64, j: u64) -> Number {
        Number::nth(mix64(n.wrapping_mul(1024).wrapping_add(j)) % self.numbers)
    }

    /// Splits `events` into changes of at most 5 events, alternating
    /// messages and statuses (so any batch of 2 or more mixes both), two
    /// changes per entry, each entry for its own business number.
    fn batch(&self, o: &mut Out, n: u64, first: u64, events: u32, ts: u64) {
        let per_change = events.div_ceil(4).clamp(1, MAX_EVENTS_PER_CHANGE);
        let mut done = 0u32;
        let mut change = 0u32;
        while done < events {
            let number = self.number(n, (change / CHANGES_PER_ENTRY) as u64);
            if change % CHANGES_PER_ENTRY == 0 {
                if change > 0 {
                    o.s("]},");
                }
                open_entry(o, number);
            } else {
                o.s(",");
            }
            let count = per_change.min(events - done);
            let at = first + done as u64;
            if change % 2 == 0 {
                self.messages_change(o, number, at, count, ts);
            } else {
                self.statuses_change(o, number, at, count, ts);
            }
            done += count;
            change += 1;
        }
        o.s("]}");
    }

    /// `wamid.LT<prefix><12-digit event number>`, quoted.
    fn event_id(&self, o: &mut Out, e: u64) {
        o.s("\"wamid.LT").s(&self.prefix).padded(e, 12).s("\"");
    }

    fn messages_change(&self, o: &mut Out, number: Number, first: u64, count: u32, ts: u64) {
        let from = self.customer(first);
        let ids = Ids::of(from);
        value_head(o, number);
        o.s(r#""contacts":[{"profile":{"name":"Load Tester""#);
        if ids == Ids::Bsuid {
            o.s(r#","username":"@load.tester""#);
        }
        o.s("}");
        if ids != Ids::Bsuid {
            o.s(r#","wa_id":""#).n(from).s("\"");
        }
        if ids != Ids::Phone {
            o.s(r#","user_id":""#).bsuid(from).s("\"");
        }
        o.s(r#"}],"messages":["#);
        for e in first..first + count as u64 {
            if e > first {
                o.s(",");
            }
            o.s("{");
            if ids != Ids::Bsuid {
                o.s(r#""from":""#).n(from).s(r#"","#);
            }
            if ids != Ids::Phone {
                o.s(r#""from_user_id":""#).bsuid(from).s(r#"","#);
            }
            o.s(r#""id":"#);
            self.event_id(o, e);
            o.s(r#","timestamp":""#)
                .n(ts)
                .s(r#"","type":"text","text":{"body":"hello "#)
                .n(e)
                .s(r#""}}"#);
        }
        o.s(r#"]},"field":"messages"}"#);
    }

    fn statuses_change(&self, o: &mut Out, number: Number, first: u64, count: u32, ts: u64) {
        value_head(o, number);
        o.s(r#""statuses":["#);
        for e in first..first + count as u64 {
            if e > first {
                o.s(",");
            }
            let status = ["sent", "delivered", "read"][(e % 3) as usize];
            o.s(r#"{"id":"#);
            self.event_id(o, e);
            o.s(r#","status":""#)
                .s(status)
                .s(r#"","timestamp":""#)
                .n(ts)
                .s("\"");
            let to = self.customer(e);
            let ids = Ids::of(to);
            if ids != Ids::Bsuid {
                o.s(r#","recipient_id":""#).n(to).s("\"");
            }
            if ids != Ids::Phone {
                o.s(r#","recipient_user_id":""#).bsuid(to).s("\"");
            }
            o.s(r#","biz_opaque_callback_data":"req-"#).n(e).s(r#""}"#);
        }
        o.s(r#"]},"field":"messages"}"#);
    }
}

fn open_entry(o: &mut Out, number: Number) {
    o.s(r#"{"id":""#).n(number.waba_id).s(r#"","changes":["#);
}

fn value_head(o: &mut Out, number: Number) {
    o.s(r#"{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":""#)
        .n(number.display)
        .s(r#"","phone_number_id":""#)
        .n(number.phone_number_id)
        .s(r#""},"#);
}

/// Which ids Meta shows for a customer (IDENTITY.md): a share of the
/// users in 2026 hide their phone behind a username (BSUID only), most
/// show both, some only the phone (older API versions, no BSUID yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ids {
    Phone,
    Both,
    Bsuid,
}

impl Ids {
    /// Per customer, fixed: 20 % BSUID only, 50 % both, 30 % phone only.
    fn of(customer: u64) -> Ids {
        match mix64(customer ^ 0x1d5) % 10 {
            0 | 1 => Ids::Bsuid,
            2..=6 => Ids::Both,
            _ => Ids::Phone,
        }
    }
}

/// A byte buffer with cheap appends (no `fmt` machinery on the hot path).
struct Out(Vec<u8>);

impl Out {
    /// Appends ASCII text.
    fn s(&mut self, text: &str) -> &mut Self {
        debug_assert!(text.is_ascii());
        self.0.extend_from_slice(text.as_bytes());
        self
    }

    /// Appends the BSUID of customer `c`: `BR.LT` and its digits.
    fn bsuid(&mut self, c: u64) -> &mut Self {
        self.s("BR.LT").n(c)
    }

    /// Appends `v` in decimal.
    fn n(&mut self, v: u64) -> &mut Self {
        self.padded(v, 1)
    }

    /// Appends `v` in decimal, zero-padded to at least `width` digits.
    fn padded(&mut self, mut v: u64, width: usize) -> &mut Self {
        let mut buf = [b'0'; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let i = i.min(buf.len() - width.min(buf.len()));
        self.0.extend_from_slice(&buf[i..]);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    /// `raw_body` of shared/meta/payloads/signature_test_vector.json, copied.
    const VECTOR_BODY: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102345678901234","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550199999","phone_number_id":"109876543210987"},"contacts":[{"profile":{"name":"Jo\u00e3o Pereira"},"wa_id":"5511987654321"}],"messages":[{"from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNFQjBDQUZFMDAwMDAwMDAwMDAxAA==","timestamp":"1781600900","type":"text","text":{"body":"caf\u00e9 \ud83d\ude00 https:\/\/example.com"}}]},"field":"messages"}]}]}"#;
    const VECTOR_SECRET: &str = "example_app_secret_0123456789abcdef";
    const VECTOR_SIG: &str =
        "sha256=98760b7010344f1f9d8f9678ffae1e8551d7c490475fdaaf477b0b9a39d3ef91";

    #[test]
    fn signs_the_test_vector() {
        assert_eq!(
            sign(VECTOR_SECRET.as_bytes(), VECTOR_BODY.as_bytes()),
            VECTOR_SIG
        );
        // The cloned keyed state gives the same answer, every time.
        let s = Signer::new(VECTOR_SECRET.as_bytes());
        for _ in 0..3 {
            assert_eq!(&s.sign(VECTOR_BODY.as_bytes())[..], VECTOR_SIG.as_bytes());
        }
        // And a different body or key does not.
        assert_ne!(
            sign(VECTOR_SECRET.as_bytes(), &VECTOR_BODY.as_bytes()[1..]),
            VECTOR_SIG
        );
        assert_ne!(sign(b"other", VECTOR_BODY.as_bytes()), VECTOR_SIG);
    }

    fn is_digits(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| b.is_ascii_digit())
    }

    /// Checks the Meta shape and returns (message ids, status ids, entries,
    /// changes).
    fn walk(body: &[u8]) -> (Vec<String>, Vec<String>, usize, usize) {
        assert!(body.is_ascii(), "body is not ASCII");
        let text = std::str::from_utf8(body).unwrap();
        assert!(!text.contains(": ") && !text.contains('\n'), "not compact");
        let v: Value = serde_json::from_slice(body).expect("valid JSON");
        assert_eq!(v["object"], "whatsapp_business_account");
        let (mut msgs, mut stats, mut changes) = (vec![], vec![], 0);
        let entries = v["entry"].as_array().unwrap();
        for e in entries {
            assert!(is_digits(e["id"].as_str().unwrap(), 15));
            for c in e["changes"].as_array().unwrap() {
                changes += 1;
                assert_eq!(c["field"], "messages");
                let val = &c["value"];
                assert_eq!(val["messaging_product"], "whatsapp");
                assert!(is_digits(
                    val["metadata"]["phone_number_id"].as_str().unwrap(),
                    15
                ));
                assert!(is_digits(
                    val["metadata"]["display_phone_number"].as_str().unwrap(),
                    11
                ));
                if let Some(ms) = val["messages"].as_array() {
                    let contact = &val["contacts"][0];
                    assert_eq!(contact["profile"]["name"], "Load Tester");
                    // A phone, a BSUID, or both; never neither.
                    let wa_id = contact["wa_id"].as_str();
                    let user_id = contact["user_id"].as_str();
                    assert!(wa_id.is_some() || user_id.is_some());
                    assert!(wa_id.is_none_or(|w| is_digits(w, 13)));
                    assert!(
                        user_id.is_none_or(|u| u.starts_with("BR.LT") && is_digits(&u[5..], 13))
                    );
                    // Username only for users without a phone.
                    assert_eq!(
                        contact["profile"].get("username").is_some(),
                        wa_id.is_none()
                    );
                    for m in ms {
                        assert_eq!(m["from"].as_str(), wa_id);
                        assert_eq!(m["from_user_id"].as_str(), user_id);
                        assert_eq!(m["type"], "text");
                        assert!(m["text"]["body"].as_str().unwrap().starts_with("hello "));
                        assert!(is_digits(m["timestamp"].as_str().unwrap(), 10));
                        msgs.push(m["id"].as_str().unwrap().to_string());
                    }
                }
                if let Some(ss) = val["statuses"].as_array() {
                    assert!(val.get("messages").is_none());
                    for st in ss {
                        let s = st["status"].as_str().unwrap();
                        assert!(["sent", "delivered", "read"].contains(&s));
                        let to = st["recipient_id"].as_str();
                        let bsuid = st["recipient_user_id"].as_str();
                        assert!(to.is_some() || bsuid.is_some());
                        assert!(to.is_none_or(|t| is_digits(t, 13)));
                        assert!(is_digits(st["timestamp"].as_str().unwrap(), 10));
                        assert!(st["biz_opaque_callback_data"]
                            .as_str()
                            .unwrap()
                            .starts_with("req-"));
                        stats.push(st["id"].as_str().unwrap().to_string());
                    }
                }
            }
        }
        (msgs, stats, entries.len(), changes)
    }

    #[test]
    fn every_kind_parses_with_the_right_events_and_unique_ids() {
        let mix = Mix::parse("messages=34,statuses=33,batch=33").unwrap();
        let g = Generator::new(mix, 20, 5);
        let mut ids = HashSet::new();
        let mut numbers = HashSet::new();
        let mut seen = [0u32; 3];
        let mut total = 0u64;
        for _ in 0..600 {
            let b = g.next_body();
            let (msgs, stats, entries, changes) = walk(&b.bytes);
            assert_eq!((msgs.len() + stats.len()) as u32, b.events);
            total += b.events as u64;
            match b.kind {
                Kind::Message => {
                    assert_eq!((msgs.len(), stats.len(), entries, changes), (1, 0, 1, 1));
                    seen[0] += 1;
                }
                Kind::Status => {
                    assert_eq!((msgs.len(), stats.len(), entries, changes), (0, 1, 1, 1));
                    seen[1] += 1;
                }
                Kind::Batch => {
                    assert_eq!(b.events, 20);
                    assert_eq!((msgs.len(), stats.len()), (10, 10));
                    assert_eq!((entries, changes), (2, 4));
                    seen[2] += 1;
                }
            }
            for id in msgs.into_iter().chain(stats) {
                assert!(id.starts_with(&format!("wamid.LT{}", g.prefix())), "{id}");
                assert!(ids.insert(id.clone()), "duplicate id {id}");
            }
            let v: Value = serde_json::from_slice(&b.bytes).unwrap();
            for e in v["entry"].as_array().unwrap() {
                for c in e["changes"].as_array().unwrap() {
                    numbers.insert(
                        c["value"]["metadata"]["phone_number_id"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    );
                }
            }
        }
        assert_eq!(ids.len() as u64, total);
        assert_eq!(g.events_generated(), total);
        assert_eq!(seen, [204, 198, 198]);
        assert_eq!(numbers.len(), 5, "{numbers:?}");
    }

    #[test]
    fn batches_of_any_size_mix_kinds_and_count_right() {
        let mix = Mix::parse("batch=100").unwrap();
        for n in [1u32, 2, 3, 7, 20, 21, 100, 1000] {
            let g = Generator::new(mix, n, 50);
            let b = g.next_body();
            assert_eq!(b.kind, Kind::Batch);
            let (msgs, stats, entries, changes) = walk(&b.bytes);
            assert_eq!((msgs.len() + stats.len()) as u32, n, "batch of {n}");
            assert_eq!(b.events, n);
            if n >= 2 {
                assert!(!msgs.is_empty() && !stats.is_empty(), "batch of {n}");
            }
            if n >= 3 {
                assert!(entries >= 2, "batch of {n}: {entries} entries");
            }
            assert!(changes >= entries);
            let unique: HashSet<_> = msgs.iter().chain(&stats).collect();
            assert_eq!(unique.len() as u32, n);
        }
    }

    #[test]
    fn users_come_as_phone_bsuid_or_both_in_the_documented_shares() {
        let mut n = [0u32; 3];
        for c in 0..10_000u64 {
            n[match Ids::of(5_511_900_000_000 + c) {
                Ids::Phone => 0,
                Ids::Both => 1,
                Ids::Bsuid => 2,
            }] += 1;
        }
        // 30 / 50 / 20 %, give or take the hash.
        assert!((2_700..3_300).contains(&n[0]), "{n:?}");
        assert!((4_600..5_400).contains(&n[1]), "{n:?}");
        assert!((1_700..2_300).contains(&n[2]), "{n:?}");
    }

    #[test]
    fn ids_differ_between_runs() {
        let mix = Mix::parse("messages=100").unwrap();
        let a = Generator::new(mix, 1, 1).next_body();
        let b = Generator::new(mix, 1, 1).next_body();
        assert_ne!(walk(&a.bytes).0, walk(&b.bytes).0);
    }

    #[test]
    fn numbers_are_written_like_format_does() {
        for v in [0u64, 7, 10, 99, 123_456_789_012, u64::MAX] {
            let mut o = Out(Vec::new());
            o.n(v).s(",").padded(v, 12);
            assert_eq!(String::from_utf8(o.0).unwrap(), format!("{v},{v:012}"));
        }
    }

    #[test]
    fn ids_have_the_documented_shape() {
        let g = Generator::with_prefix(
            Mix::parse("messages=100").unwrap(),
            1,
            1,
            "ABCDEF0123456789",
        );
        g.next_body();
        let (ids, _, _, _) = walk(&g.next_body().bytes);
        assert_eq!(ids, ["wamid.LTABCDEF0123456789000000000001"]);
    }

    #[test]
    fn mix_is_exact_over_100_requests() {
        let m = Mix::parse("messages=60,statuses=30,batch=10").unwrap();
        let mut c = [0; 3];
        for n in 1000..1100 {
            c[m.pick(n) as usize] += 1;
        }
        assert_eq!(c, [60, 30, 10]);
    }

    #[test]
    fn mix_parsing() {
        assert_eq!(
            Mix::parse("messages=60,statuses=30,batch=10").unwrap(),
            Mix {
                messages: 60,
                statuses: 30,
                batch: 10
            }
        );
        assert_eq!(
            Mix::parse(" statuses=100 ").unwrap(),
            Mix {
                messages: 0,
                statuses: 100,
                batch: 0
            }
        );
        for bad in [
            "",
            "nope=100",
            "messages",
            "messages=x",
            "messages=60,statuses=30",
            "messages=60,statuses=30,batch=20",
            "messages=50,messages=50",
            "messages=-1,statuses=101",
        ] {
            assert!(Mix::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
