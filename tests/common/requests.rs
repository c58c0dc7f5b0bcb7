//! Send requests as upstream apps write them (DESIGN §5). Self-contained.
#![allow(dead_code)]

use serde_json::{json, Value};

/// A template send of `category` (`order_shipped`, `en_US`).
pub fn template_request(id: &str, number: &str, to: &str, category: &str) -> Value {
    json!({"v":1,"request_id":id,"phone_number_id":number,"to":to,"category":category,
           "message":{"type":"template","template":{"name":"order_shipped","language":{"code":"en_US"}}}})
}

/// A utility template send.
pub fn template(id: &str, number: &str, to: &str) -> Value {
    template_request(id, number, to, "utility")
}
