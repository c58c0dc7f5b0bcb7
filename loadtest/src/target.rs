//! The safety rule: load is only ever sent to loopback.
//!
//! A target URL is accepted only if it is `http://` or `https://` and its
//! host is an IPv4 address in 127.0.0.0/8, `localhost`, or `[::1]`. No name is ever resolved
//! through DNS: `localhost` maps to 127.0.0.1 here, and anything else that is
//! not a loopback IP literal is refused.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hyper::Uri;

/// Where the load goes: a loopback socket address, the `Host` header to
/// send, and the request target (path and query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub host_header: String,
    pub path_and_query: String,
    /// `https://`: TLS, with `server_name` (the URL's host) checked against
    /// the server's certificate.
    pub tls: bool,
    pub server_name: String,
}

/// Parses `url` and accepts it only if its host is loopback.
pub fn loopback_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(format!(
                "{url:?}: scheme {other}:// is not supported, only http:// or https:// on loopback"
            ))
        }
        None => return Err(format!("{url:?}: expected http://HOST[:PORT]/PATH")),
    };
    let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: user info in the URL is not accepted"));
    }
    let host = authority.host();
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST.into()
    } else {
        literal.parse().map_err(|_| {
            format!(
                "{host}: not a loopback address; load is only sent to 127.0.0.0/8, localhost or [::1]"
            )
        })?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{host}: not a loopback address; load is only sent to 127.0.0.0/8, localhost or [::1]"
        ));
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if port == 0 {
        return Err(format!("{url:?}: port 0 is not a target"));
    }
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host_header: authority.as_str().to_string(),
        path_and_query,
        tls,
        server_name: literal.to_ascii_lowercase(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_targets() {
        let t = loopback_target("http://127.0.0.1:8080/webhook").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host_header, "127.0.0.1:8080");
        assert_eq!(t.path_and_query, "/webhook");

        let t = loopback_target("http://localhost:1/").unwrap();
        assert_eq!(t.addr, "127.0.0.1:1".parse().unwrap());
        assert_eq!(t.host_header, "localhost:1");

        let t = loopback_target("http://127.1.2.3:8080/webhook?x=1").unwrap();
        assert_eq!(t.addr, "127.1.2.3:8080".parse().unwrap());
        assert_eq!(t.path_and_query, "/webhook?x=1");

        let t = loopback_target("http://[::1]:8080/webhook").unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());

        let t = loopback_target("http://[::1]").unwrap();
        assert_eq!(t.addr, "[::1]:80".parse().unwrap());
        assert_eq!(t.path_and_query, "/");

        assert!(loopback_target("http://LOCALHOST:8080/x").is_ok());
        assert!(!loopback_target("http://127.0.0.1:1/").unwrap().tls);

        let t = loopback_target("https://127.0.0.1/webhook").unwrap();
        assert_eq!(t.addr, "127.0.0.1:443".parse().unwrap());
        assert!(t.tls);
        assert_eq!(t.server_name, "127.0.0.1");
        let t = loopback_target("https://[::1]:8443/").unwrap();
        assert_eq!(
            (t.addr, t.server_name.as_str()),
            ("[::1]:8443".parse().unwrap(), "::1")
        );
        assert_eq!(
            loopback_target("https://localhost:1/").unwrap().server_name,
            "localhost"
        );
    }

    #[test]
    fn rejects_everything_else() {
        for url in [
            "http://10.0.0.1/webhook",
            "http://10.0.0.1:8080/",
            "http://example.com/",
            "http://example.com:8080/webhook",
            "http://192.168.1.1:80/",
            "http://172.16.0.1/",
            "http://8.8.8.8/",
            "http://0.0.0.0:8080/",
            "http://[::]:8080/",
            "http://[::ffff:10.0.0.1]:8080/",
            "http://[2001:db8::1]/",
            "http://localhost.example.com/",
            "http://127.0.0.1.nip.io/",
            "http://127.0.0.1@10.0.0.1/",
            "http://user@127.0.0.1/",
            "https://10.0.0.1/",
            "https://example.com/",
            "ftp://127.0.0.1/",
            "127.0.0.1:8080/webhook",
            "/webhook",
            "http://127.0.0.1:0/",
            "",
        ] {
            assert!(loopback_target(url).is_err(), "{url} was accepted");
        }
    }
}
