//! Meta-shaped webhook bodies with unique event ids, built cheaply.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Percentages of request kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub messages: u32,
    pub statuses: u32,
    pub batch: u32,
}

impl Mix {
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut m = Mix {
            messages: 0,
            statuses: 0,
            batch: 0,
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part}: expected kind=percent"))?;
            let v: u32 = v
                .trim()
                .parse()
                .map_err(|_| format!("{part}: not a number"))?;
            match k.trim() {
                "messages" => m.messages = v,
                "statuses" => m.statuses = v,
                "batch" => m.batch = v,
                other => return Err(format!("{other}: unknown kind (messages, statuses, batch)")),
            }
        }
        if m.messages + m.statuses + m.batch == 0 {
            return Err("all percentages are zero".into());
        }
        Ok(m)
    }
}

/// Builds bodies; ids are unique across the run (random prefix + counter).
pub struct Generator {
    mix: Mix,
    batch_events: usize,
    numbers: usize,
    prefix: String,
    counter: AtomicU64,
}

/// `sha256=<hex>` over the exact bytes.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Generator {
    pub fn new(mix: Mix, batch_events: usize, numbers: usize) -> Generator {
        Generator {
            mix,
            batch_events,
            numbers,
            prefix: format!("{:016x}", rand::random::<u64>()),
            counter: AtomicU64::new(0),
        }
    }

    /// The next body and how many events it holds.
    pub fn next_body(&self) -> (Vec<u8>, usize) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let total = self.mix.messages + self.mix.statuses + self.mix.batch;
        let pick = (n.wrapping_mul(2654435761) % total as u64) as u32;
        let mut s = String::with_capacity(1024);
        s.push_str(r#"{"object":"whatsapp_business_account","entry":["#);
        let events = if pick < self.mix.messages {
            self.entry(&mut s, n, 1, 0);
            1
        } else if pick < self.mix.messages + self.mix.statuses {
            self.entry(&mut s, n, 0, 1);
            1
        } else {
            let msgs = self.batch_events / 2;
            self.entry(&mut s, n, msgs, self.batch_events - msgs);
            self.batch_events
        };
        s.push_str("]}");
        (s.into_bytes(), events)
    }

    fn entry(&self, s: &mut String, n: u64, msgs: usize, statuses: usize) {
        let number = 100_000_000_000_000u64 + (n % self.numbers as u64);
        let ts = 1_781_600_000 + n % 100_000;
        let _ = write!(s, r#"{{"id":"102345678901234","changes":["#);
        if msgs > 0 {
            let _ = write!(
                s,
                r#"{{"value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550199999","phone_number_id":"{number}"}},"contacts":[{{"profile":{{"name":"Jo\u00e3o Load"}},"wa_id":"5511987{:06}"}}],"messages":["#,
                n % 1_000_000
            );
            for i in 0..msgs {
                if i > 0 {
                    s.push(',');
                }
                let _ = write!(
                    s,
                    r#"{{"from":"5511987{:06}","id":"wamid.LG{}{:012}m{i}","timestamp":"{ts}","type":"text","text":{{"body":"ol\u00e1 pedido #{n} https:\/\/example.com"}}}}"#,
                    n % 1_000_000,
                    self.prefix,
                    n
                );
            }
            s.push_str(r#"]},"field":"messages"}"#);
        }
        if statuses > 0 {
            if msgs > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                r#"{{"value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550199999","phone_number_id":"{number}"}},"statuses":["#
            );
            for i in 0..statuses {
                if i > 0 {
                    s.push(',');
                }
                let st = ["sent", "delivered", "read"][(n as usize + i) % 3];
                let _ = write!(
                    s,
                    r#"{{"id":"wamid.LG{}{:012}s{i}","status":"{st}","timestamp":"{ts}","recipient_id":"5511987{:06}","biz_opaque_callback_data":"req-{n}"}}"#,
                    self.prefix,
                    n,
                    n % 1_000_000
                );
            }
            s.push_str(r#"]},"field":"messages"}"#);
        }
        s.push_str("]}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_meta() {
        let body = r#"{"object":"whatsapp_business_account","entry":[{"id":"102345678901234","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550199999","phone_number_id":"109876543210987"},"contacts":[{"profile":{"name":"Jo\u00e3o Pereira"},"wa_id":"5511987654321"}],"messages":[{"from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNFQjBDQUZFMDAwMDAwMDAwMDAxAA==","timestamp":"1781600900","type":"text","text":{"body":"caf\u00e9 \ud83d\ude00 https:\/\/example.com"}}]},"field":"messages"}]}]}"#;
        assert_eq!(
            sign(b"example_app_secret_0123456789abcdef", body.as_bytes()),
            "sha256=98760b7010344f1f9d8f9678ffae1e8551d7c490475fdaaf477b0b9a39d3ef91"
        );
    }

    #[test]
    fn bodies_parse_with_unique_ids_and_the_right_event_count() {
        let g = Generator::new(
            Mix::parse("messages=34,statuses=33,batch=33").unwrap(),
            20,
            5,
        );
        let mut ids = std::collections::HashSet::new();
        let mut kinds = [0; 3];
        for _ in 0..300 {
            let (b, n) = g.next_body();
            assert!(b.is_ascii());
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            let mut count = 0;
            for e in v["entry"].as_array().unwrap() {
                for c in e["changes"].as_array().unwrap() {
                    for key in ["messages", "statuses"] {
                        for item in c["value"][key].as_array().into_iter().flatten() {
                            count += 1;
                            let id = item["id"].as_str().unwrap().to_string();
                            let status = item["status"].as_str().unwrap_or("").to_string();
                            assert!(ids.insert((id, status)), "duplicate id");
                        }
                    }
                }
            }
            assert_eq!(count, n);
            kinds[match n {
                20 => 2,
                _ if v.to_string().contains("statuses") => 1,
                _ => 0,
            }] += 1;
        }
        assert!(kinds.iter().all(|k| *k > 50), "{kinds:?}");
        assert!(Mix::parse("nope=1").is_err());
    }
}
