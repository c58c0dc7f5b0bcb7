//! Inbound media into a real S3-compatible server on loopback (moto's server
//! mode, from PyPI; the README's test command starts it and sets
//! `WAGATE_TEST_S3`), through Tansu and the Graph API sandbox: small objects
//! in one put, a large one as a multipart upload (above the 5 MiB part
//! size), a checksum mismatch on a multipart object leaves nothing, and an
//! erasure deletes the person's objects.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use serde_json::Value;
use sha2::{Digest, Sha256};
use wagate::sandbox::media::MediaFault;

const NUMBER: &str = "109876543210987";

/// The S3 server under test. Panics (fails the test) if none is configured.
fn s3() -> String {
    std::env::var("WAGATE_TEST_S3").unwrap_or_else(|_| {
        panic!("WAGATE_TEST_S3 is not set: run the README's test command (make test), which starts an S3-compatible server (or `scripts/s3.sh start target/test-env`, which prints its URL)")
    })
}

fn bytes_of(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678 ^ seed as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

async fn s3_call(method: &str, url: &str) -> Resp {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    request(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_into_s3_multipart_checksum_and_erasure() {
    let b = brokers();
    let endpoint = s3();
    // moto accepts any credentials; the store reads the standard variables.
    std::env::set_var("AWS_ACCESS_KEY_ID", "wagate-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "wagate-test-secret");
    let p = unique_prefix("media-s3");
    let bucket = format!(
        "wagate-{}",
        p.trim_end_matches('.')
            .to_ascii_lowercase()
            .replace('.', "-")
    );
    let bucket: String = bucket.chars().take(60).collect();
    let r = s3_call("PUT", &format!("{endpoint}/{bucket}")).await;
    assert!(
        r.status.is_success(),
        "create bucket: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );

    let sb = sandbox(|_| {}).await;
    let store_uri = format!("s3://{bucket}/media");
    let gw = start_on(
        &b,
        &p,
        &sb,
        &[
            ("WAGATE_MEDIA_STORE", store_uri.as_str()),
            ("WAGATE_MEDIA_S3_ENDPOINT", endpoint.as_str()),
            ("WAGATE_MEDIA_S3_ALLOW_HTTP", "true"),
            ("WAGATE_MEDIA_PART_SIZE_BYTES", "5242880"),
        ],
    )
    .await;
    let end = Instant::now() + Duration::from_secs(30);
    while !gw.media.as_ref().unwrap().assigned() {
        assert!(
            Instant::now() < end,
            "the media worker never got partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let image = bytes_of(200_000, 1);
    let video = bytes_of(12 * 1024 * 1024 + 12_345, 2); // three parts of 5 MiB
    let (b1, image_id) = sb.inbound_media_body(
        NUMBER,
        "14155550170",
        "wamid.s3-image",
        "image",
        image.clone(),
        "image/jpeg",
    );
    let (b2, video_id) = sb.inbound_media_body(
        NUMBER,
        "14155550170",
        "wamid.s3-video",
        "video",
        video.clone(),
        "video/mp4",
    );
    let (b3, bad_id) = sb.inbound_media_body(
        NUMBER,
        "14155550171",
        "wamid.s3-bad",
        "document",
        bytes_of(6 * 1024 * 1024, 3),
        "application/pdf",
    );
    sb.media().set_fault(
        &bad_id,
        MediaFault {
            wrong_checksum: true,
            ..Default::default()
        },
    );
    for body in [&b1, &b2, &b3] {
        webhook_ok(gw.public_addr, body).await;
    }
    let end = Instant::now() + Duration::from_secs(90);
    let recs: Vec<Value> = loop {
        let recs: Vec<Value> = read_all(&b, &p, "inbound.media", Duration::from_secs(3))
            .await
            .into_iter()
            .map(|r| r.value)
            .collect();
        if recs.len() >= 3 || Instant::now() > end {
            break recs;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(recs.len(), 3, "{recs:#?}");
    let store = gw.media.as_ref().unwrap().store().clone();
    let rec = |id: &str| recs.iter().find(|r| r["media_id"] == id).unwrap().clone();
    for (id, data, mime) in [
        (&image_id, &image, "image/jpeg"),
        (&video_id, &video, "video/mp4"),
    ] {
        let r = rec(id);
        assert_eq!(r["outcome"], "stored", "{r}");
        let loc = r["location"].as_str().unwrap();
        assert_eq!(
            loc,
            format!("s3://{bucket}/media/{NUMBER}/14155550170/{id}")
        );
        assert_eq!(r["sha256"], hex::encode(Sha256::digest(data)));
        // Read back from the S3 server, byte for byte, with its type.
        let path = store.object_path(NUMBER, "14155550170", id);
        let (got, ct) = store.read_with_type(&path).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got.as_ref() == data.as_slice(), "{id} byte for byte");
        assert_eq!(ct.as_deref(), Some(mime));
    }
    let r = rec(&bad_id);
    assert_eq!(r["outcome"], "failed");
    assert_eq!(r["error"]["code"], "checksum_mismatch");
    let bad = store.object_path(NUMBER, "14155550171", &bad_id);
    assert_eq!(
        store.size_of(&bad).await.unwrap(),
        None,
        "an aborted multipart upload leaves no object"
    );

    // Erasure: the person's objects go.
    let url = format!(
        "http://{}/v1/contacts/{NUMBER}/14155550170",
        gw.internal_addr
    );
    let r = api("DELETE", &url, None).await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    for id in [&image_id, &video_id] {
        let path = store.object_path(NUMBER, "14155550170", id);
        assert_eq!(store.size_of(&path).await.unwrap(), None, "{id} erased");
    }
    assert!(gw.shutdown().await);
}
