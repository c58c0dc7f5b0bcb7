//! The architecture's walls, checked on the source (ARCHITECTURE.md): ingress
//! and egress never import each other; `meta` does no I/O (it imports no
//! crate that could, and none of wagate's I/O rooms); unsafe code only where
//! the crate root names it; every Kafka client is made from
//! `kafka::Connection`.

use std::path::{Path, PathBuf};

fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    fn walk(p: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut out);
    assert!(!out.is_empty(), "no sources under {dir}");
    out
}

/// Lines that are code (not comments), up to the file's tests.
fn code(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .filter(|l| !l.trim_start().starts_with("//"))
}

#[test]
fn ingress_and_egress_never_import_each_other() {
    for (dir, other) in [
        ("src/ingress", "crate::egress"),
        ("src/egress", "crate::ingress"),
    ] {
        for (path, text) in sources(dir) {
            for l in code(&text) {
                assert!(
                    !l.contains(other),
                    "{}: {l:?} crosses the wall between ingress and egress",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn meta_does_no_io() {
    // Crates and rooms that do I/O (or would let meta do it).
    let forbidden = [
        "tokio",
        "hyper",
        "rdkafka",
        "std::fs",
        "std::net",
        "std::process",
        "std::io",
        "crate::kafka",
        "crate::http",
        "crate::ingress",
        "crate::egress",
        "crate::admin",
        "crate::app",
        "crate::contacts",
        "crate::sandbox",
    ];
    for (path, text) in sources("src/meta") {
        for l in code(&text) {
            for f in forbidden {
                assert!(
                    !l.contains(f),
                    "{}: {l:?} uses {f}: meta is pure (bytes in, bytes out)",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn unsafe_code_is_denied_but_where_named() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    assert!(lib.contains("#![deny(unsafe_code)]"));
    let allowed = ["src/kafka/batch.rs", "src/contacts/mod.rs"];
    for (path, text) in sources("src") {
        let rel = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if code(&text).any(|l| l.contains("allow(unsafe_code)")) {
            assert!(
                allowed.contains(&rel.as_str()),
                "{rel} allows unsafe code but is not one of the named places"
            );
        }
    }
}

#[test]
fn every_kafka_client_is_made_from_the_connection() {
    // A client made from a bare ClientConfig would miss the TLS / SASL
    // settings and the passthrough (kafka::connection owns both).
    for (path, text) in sources("src") {
        if path.ends_with("kafka/connection.rs") {
            continue;
        }
        for l in code(&text) {
            assert!(
                !l.contains("ClientConfig::new") && !l.contains("DefaultClientContext"),
                "{}: a Kafka client outside kafka::Connection: {l}",
                path.display()
            );
        }
    }
}
