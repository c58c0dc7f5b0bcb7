//! Users known by BSUID, by phone, or both (DESIGN §10), against a real
//! broker (Tansu) and the Graph API sandbox over loopback: STOPs, windows,
//! preferences and id changes follow the person; links are durable on
//! `wa.users`; sends by `recipient`; 131062; the pair limit counts the person
//! once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use serde_json::{json, Value};
use wagate::sandbox::bsuid_of;

/// These tests share the two cores with timing-sensitive neighbours.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The business number of the identity fixtures.
const PN: &str = "118877665544332";
const ANA: &str = "BR.8821736450019923";
const ANA_NEW: &str = "BR.4410098877665544";
const ANA_PHONE: &str = "5511987650001";

/// A webhook of one inbound text message at `PN` (now), from the ids given.
fn says(wamid: &str, phone: Option<&str>, bsuid: Option<&str>, text: &str) -> Vec<u8> {
    let mut msg = json!({"id":wamid,"timestamp":(wagate::clock::now_ms() / 1000).to_string(),
                         "type":"text","text":{"body":text}});
    let mut contact = json!({"profile":{"name":"Ana"}});
    if let Some(p) = phone {
        msg["from"] = p.into();
        contact["wa_id"] = p.into();
    }
    if let Some(b) = bsuid {
        msg["from_user_id"] = b.into();
        contact["user_id"] = b.into();
    }
    serde_json::to_vec(&json!({"object":"whatsapp_business_account","entry":[{"id":"211030405060708","changes":[{"field":"messages","value":{
        "messaging_product":"whatsapp","metadata":{"display_phone_number":"5511930000000","phone_number_id":PN},
        "contacts":[contact],"messages":[msg]}}]}]}))
    .unwrap()
}

/// A send request by `to` (a phone) or by `recipient` (a BSUID).
fn send(id: &str, user: &str, category: &str, message: Value) -> Value {
    let mut r =
        json!({"v":1,"request_id":id,"phone_number_id":PN,"category":category,"message":message});
    if user.starts_with('+') {
        r["to"] = user.into();
    } else {
        r["recipient"] = user.into();
    }
    r
}

fn template(name: &str) -> Value {
    json!({"type":"template","template":{"name":name,"language":{"code":"pt_BR"}}})
}

fn text() -> Value {
    json!({"type":"text","text":{"body":"Temos em azul, sim."}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_windows_and_preferences_follow_the_person_and_sends_go_by_recipient() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("id-person");
    let sb = sandbox(|_| {}).await;
    let gw = start_on(
        &b,
        &p,
        &sb,
        &[("WAGATE_EGRESS_MARKETING_REQUIRES_OPT_IN", "false")],
    )
    .await;
    let addr = gw.public_addr;

    // Step 1: a STOP from a username user (no phone) is applied and durable.
    webhook_ok(addr, &fixture("identity_stop_username_only.json")).await;
    let msgs = read_all(&b, &p, "inbound.messages", Duration::from_millis(800)).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].value["wa_id"], Value::Null);
    assert_eq!(msgs[0].value["user_id"], ANA);
    let consent = read_all(&b, &p, "consent", Duration::from_millis(800)).await;
    let stop = consent
        .iter()
        .find(|r| r.key.as_deref() == Some(&format!("{PN}:{ANA}")))
        .expect("the STOP under the BSUID is on wa.consent");
    assert_eq!(stop.value["consent"], "opted_out");

    // Step 2: the phone and the BSUID seen together: one person. A window
    // opened by a BSUID-only user allows a free-form reply by recipient.
    webhook_ok(addr, &fixture("identity_inbound_phone_and_bsuid.json")).await;
    let solo = "BR.WINDOWUSER0001";
    webhook_ok(addr, &says("wamid.ID-W1", None, Some(solo), "oi")).await;
    sb.record_inbound(PN, solo, wagate::clock::now_ms());
    // Another person: phone + BSUID seen in a status, STOP by phone.
    webhook_ok(
        addr,
        &fixture_status_pair("5511900000003", "BR.STATUSLINKED3"),
    )
    .await;
    webhook_ok(
        addr,
        &says("wamid.ID-S3", Some("5511900000003"), None, "PARE"),
    )
    .await;
    // A fourth: user_preferences by BSUID only stops marketing.
    webhook_ok(addr, &fixture("identity_user_preferences_bsuid.json")).await;
    let prefs = String::from_utf8(fixture("identity_user_preferences_bsuid.json"))
        .unwrap()
        .replace(ANA, "BR.PREFS4");
    webhook_ok(addr, prefs.as_bytes()).await;
    produce_requests(
        &b,
        &p,
        &[
            send(
                "by-recipient-stopped",
                ANA,
                "utility",
                template("order_shipped"),
            ),
            send(
                "by-phone-stopped",
                &format!("+{ANA_PHONE}"),
                "utility",
                template("order_shipped"),
            ),
            send("reply-by-recipient", solo, "service", text()),
            send(
                "linked-in-status",
                "BR.STATUSLINKED3",
                "utility",
                template("order_shipped"),
            ),
            send("otp-to-bsuid", solo, "authentication", template("otp")),
            send(
                "marketing-stopped",
                "BR.PREFS4",
                "marketing",
                template("promo"),
            ),
            send(
                "utility-after-prefs",
                "BR.PREFS4",
                "utility",
                template("order_shipped"),
            ),
        ],
    )
    .await;
    let by = results(&b, &p, 7, Duration::from_secs(40)).await;
    assert_eq!(
        one(&by, "marketing-stopped")["error"]["code"],
        "marketing_stopped"
    );
    assert_eq!(one(&by, "utility-after-prefs")["outcome"], "accepted");
    assert_eq!(
        one(&by, "by-recipient-stopped")["error"]["code"],
        "opted_out"
    );
    assert_eq!(one(&by, "by-phone-stopped")["error"]["code"], "opted_out");
    let reply = one(&by, "reply-by-recipient");
    assert_eq!(reply["outcome"], "accepted", "{reply}");
    assert_eq!(reply["to"], Value::Null);
    assert_eq!(reply["recipient"], solo);
    assert_eq!(reply["user_id"], solo);
    assert_eq!(one(&by, "linked-in-status")["error"]["code"], "opted_out");
    let otp = one(&by, "otp-to-bsuid");
    assert_eq!(otp["outcome"], "failed", "{otp}");
    assert_eq!(otp["error"]["code"], 131062);
    assert_eq!(otp["attempts"], 1, "131062 is never retried");
    let sent = sb.sends();
    let reply_body = &sent
        .iter()
        .find(|s| s.biz_opaque_callback_data.as_deref() == Some("reply-by-recipient"))
        .expect("the reply reached the sandbox")
        .body;
    assert_eq!(reply_body["recipient"], solo);
    assert_eq!(reply_body["recipient_type"], "individual");
    assert!(
        reply_body.get("to").is_none(),
        "a BSUID is never sent as to"
    );

    // Step 3: an id change carries the opt-out to the new BSUID; marketing
    // stopped by user_preferences under a BSUID; an OTP by recipient of a
    // person whose phone is known goes to the phone.
    webhook_ok(addr, &fixture("identity_system_user_changed_user_id.json")).await;
    webhook_ok(
        addr,
        &says(
            "wamid.ID-L5",
            Some("5511900000005"),
            Some("BR.LINKED5"),
            "oi",
        ),
    )
    .await;
    produce_requests(
        &b,
        &p,
        &[
            send(
                "after-change",
                ANA_NEW,
                "utility",
                template("order_shipped"),
            ),
            send(
                "otp-readdressed",
                "BR.LINKED5",
                "authentication",
                template("otp"),
            ),
        ],
    )
    .await;
    let by = results(&b, &p, 9, Duration::from_secs(40)).await;
    assert_eq!(one(&by, "after-change")["error"]["code"], "opted_out");
    let otp = one(&by, "otp-readdressed");
    assert_eq!(otp["outcome"], "accepted", "{otp}");
    assert_eq!(otp["addressed"], "to");
    assert_eq!(otp["recipient"], "BR.LINKED5");
    let body = &sb
        .sends()
        .into_iter()
        .find(|s| s.biz_opaque_callback_data.as_deref() == Some("otp-readdressed"))
        .unwrap()
        .body;
    assert_eq!(body["to"], "+5511900000005");
    assert!(body.get("recipient").is_none());

    // Step 4: the contacts API answers for the person under either id, and
    // DELETE by phone erases the person under the BSUID too.
    let base = format!("http://{}/v1/contacts/{PN}", gw.internal_addr);
    let r = api("GET", &format!("{base}/BR%2ELINKED5"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["ids"],
        json!({"wa_id":"5511900000005","user_id":"BR.LINKED5"})
    );
    assert!(v["last_inbound_ms"].as_u64().is_some());
    let r = api("GET", &format!("{base}/+5511900000005"), None).await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["ids"]["user_id"], "BR.LINKED5");
    assert_eq!(
        api("GET", &format!("{base}/br.linked5"), None).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api("DELETE", &format!("{base}/5511900000005"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api("GET", &format!("{base}/BR.LINKED5"), None).await.status,
        StatusCode::NOT_FOUND
    );
    let users = read_all(&b, &p, "users", Duration::from_millis(800)).await;
    assert!(
        users
            .iter()
            .any(|r| r.key.as_deref() == Some(&format!("{PN}:BR.LINKED5")) && r.value.is_null()),
        "the link is tombstoned: {users:?}"
    );
    gw.shutdown().await;
    sb.shutdown().await;
}

/// A delivered status naming both of the recipient's ids.
fn fixture_status_pair(phone: &str, bsuid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"object":"whatsapp_business_account","entry":[{"id":"211030405060708","changes":[{"field":"messages","value":{
        "messaging_product":"whatsapp","metadata":{"display_phone_number":"5511930000000","phone_number_id":PN},
        "statuses":[{"id":format!("wamid.ST-{bsuid}"),"status":"delivered","timestamp":"1782000300","recipient_id":phone,"recipient_user_id":bsuid}]}}]}]}))
    .unwrap()
}

/// Polls a contact until its JSON satisfies `pred`.
async fn wait_json(url: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let r = wait_for(url, |r| {
        r.status == StatusCode::OK
            && serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| pred(&v))
    })
    .await;
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_reach_a_second_instance_and_survive_a_restart() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("id-links");
    let off = [("WAGATE_EGRESS_ENABLED", "false")];
    let a = start(&b, &p, &off).await;
    let other = start(&b, &p, &off).await;
    // A learns the link, then a STOP under the BSUID alone.
    webhook_ok(
        a.public_addr,
        &fixture("identity_inbound_phone_and_bsuid.json"),
    )
    .await;
    webhook_ok(a.public_addr, &fixture("identity_stop_username_only.json")).await;
    // The other instance only reads the topics: asked by phone, it knows
    // the STOP (recorded under the BSUID) and both ids.
    let by_phone = |gw: &wagate::app::Gateway| {
        format!("http://{}/v1/contacts/{PN}/{ANA_PHONE}", gw.internal_addr)
    };
    let want = |v: &Value| v["consent"] == "opted_out" && v["ids"]["user_id"] == ANA;
    wait_json(&by_phone(&other), want).await;
    a.shutdown().await;
    other.shutdown().await;
    // A restart rebuilds links and consent from the topics.
    let again = start(&b, &p, &off).await;
    let v = wait_json(&by_phone(&again), want).await;
    assert_eq!(v["ids"]["wa_id"], ANA_PHONE);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_limit_counts_a_person_once_however_requests_address_them() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("id-pair");
    let phone = "5511900000007";
    let bsuid = bsuid_of(phone);
    let sb = sandbox(|_| {}).await;
    let gw = start_on(&b, &p, &sb, &[]).await;
    webhook_ok(
        gw.public_addr,
        &says("wamid.ID-P7", Some(phone), Some(&bsuid), "oi"),
    )
    .await;
    // Meta's pair rate: a burst of 45, then one per 6 s. 23 requests by
    // phone and 23 by BSUID are 46 to one person: the last waits ~6 s. Were
    // the two addresses two pairs, all 46 would go at once.
    let reqs: Vec<Value> = (0..46)
        .map(|i| {
            let user = if i % 2 == 0 {
                format!("+{phone}")
            } else {
                bsuid.clone()
            };
            send(
                &format!("pair{i:02}"),
                &user,
                "utility",
                template("order_shipped"),
            )
        })
        .collect();
    produce_requests(&b, &p, &reqs).await;
    let by = results(&b, &p, 46, Duration::from_secs(60)).await;
    for i in 0..46 {
        assert_eq!(one(&by, &format!("pair{i:02}"))["outcome"], "accepted");
    }
    let mut at: Vec<Instant> = sb.sends().iter().map(|s| s.arrived_at).collect();
    at.sort();
    assert_eq!(at.len(), 46);
    let spread = at[45] - at[0];
    println!("46 sends to one person by two addresses spread over {spread:?}");
    assert!(
        spread >= Duration::from_secs(5),
        "the 46th send waited only {spread:?}: phone and BSUID were limited as two pairs"
    );
    gw.shutdown().await;
    sb.shutdown().await;
}
