//! Checks on the request itself, made before routing: the target's length, the Host field
//! (RFC 9112 §3.2) and whether the method is one this server knows (RFC 9110 §9.1).

use http::header::{self, HeaderMap};
use http::{Method, Uri, Version};

/// Longest request target answered, in bytes; longer ones get 414. nginx's default
/// (`large_client_header_buffers`) is the same 8 KiB, and no manifest path comes near it.
/// Only targets whose whole head fits in `ServerConfig::max_header_bytes` reach this
/// check: hyper answers a larger head 431 itself.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// The request target's length as sent (origin-form or absolute-form).
pub fn target_len(uri: &Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + "://".len());
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let rest = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    scheme + authority + rest
}

#[derive(Debug, PartialEq, Eq)]
pub enum MethodClass {
    Served,
    /// A standard method this static server does not support: 405.
    NotAllowed,
    /// A method this server does not know at all: 501 (RFC 9110 §9.1).
    Unknown,
}

/// OPTIONS is answered 405 like the other methods a static site does not support (as
/// nginx does for static files): GET and HEAD are all there is, and `Allow` says so.
pub fn classify(method: &Method) -> MethodClass {
    match *method {
        Method::GET | Method::HEAD => MethodClass::Served,
        Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::OPTIONS
        | Method::CONNECT
        | Method::TRACE => MethodClass::NotAllowed,
        _ => MethodClass::Unknown,
    }
}

/// RFC 9112 §3.2: HTTP/1.1 needs exactly one Host field, any version at most one, and its
/// value must be `uri-host [ ":" port ]`. When the target carries its own authority
/// (absolute-form) that authority wins and the field's value is ignored (§3.2.2), but
/// 1.1 still requires the field.
pub fn host_ok(version: Version, uri: &Uri, headers: &HeaderMap) -> bool {
    let mut fields = headers.get_all(header::HOST).iter();
    match (fields.next(), fields.next()) {
        (None, _) => version < Version::HTTP_11,
        (Some(_), Some(_)) => false,
        (Some(_), None) if uri.authority().is_some() => true,
        (Some(value), None) => valid_host(value.as_bytes()),
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2-3.2.3). An empty reg-name is valid: a client
/// sends an empty Host when the target URI has no authority.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(close) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        if !valid_ip_literal(&literal[..close]) {
            return false;
        }
        (None, &literal[close + 1..])
    } else {
        // A reg-name has no ':', so the first one starts the port.
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (Some(&value[..colon]), &value[colon..]),
            None => (Some(value), &b""[..]),
        }
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    port_ok && host.is_none_or(valid_reg_name)
}

/// `IPv6address / IPvFuture`, without the brackets.
fn valid_ip_literal(inner: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = inner {
        let Some(dot) = rest.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (version, tail) = (&rest[..dot], &rest[dot + 1..]);
        return !version.is_empty()
            && version.iter().all(u8::is_ascii_hexdigit)
            && !tail.is_empty()
            && tail
                .iter()
                .all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':');
    }
    std::str::from_utf8(inner).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// `*( unreserved / pct-encoded / sub-delims )`; IPv4 addresses are reg-names too.
fn valid_reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                let hex = name.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if is_unreserved(b) || is_sub_delim(b) => i += 1,
            _ => return false,
        }
    }
    true
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn host_values() {
        for good in [
            "example.com",
            "example.com:80",
            "EXAMPLE.com:",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:80",
            "[2001:db8::7]",
            "[v1.fe80::a+en1]",
            "xn--bcher-kva.example",
            "a%20b",
            "sub_delims!$&'()*+,;=",
            "",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "example.com:80:80",
            "example.com:8x",
            "exa mple.com",
            "a/b",
            "a@b",
            "a?b",
            "a#b",
            "%zz",
            "a%2",
            "[::1",
            "[::1]x",
            "[::1]:8x",
            "[not-an-ip]",
            "[v.x]",
            "[v1.]",
            "[vg.x]",
            "::1",
            "h\u{e9}",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    fn headers(hosts: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(header::HOST, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn host_field_rules() {
        let origin: Uri = "/index.html".parse().unwrap();
        let absolute: Uri = "http://example.com/index.html".parse().unwrap();
        let v11 = Version::HTTP_11;
        let v10 = Version::HTTP_10;
        assert!(host_ok(v11, &origin, &headers(&["example.com"])));
        assert!(!host_ok(v11, &origin, &headers(&[])));
        assert!(host_ok(v10, &origin, &headers(&[])));
        assert!(!host_ok(v11, &origin, &headers(&["a", "b"])));
        assert!(!host_ok(v10, &origin, &headers(&["a", "a"])));
        assert!(!host_ok(v11, &origin, &headers(&["a b"])));
        assert!(!host_ok(v10, &origin, &headers(&["a b"])));
        // Absolute-form: the target's authority wins, the field must still be there.
        assert!(host_ok(v11, &absolute, &headers(&["a b"])));
        assert!(!host_ok(v11, &absolute, &headers(&[])));
        assert!(!host_ok(v11, &absolute, &headers(&["a", "b"])));
    }

    #[test]
    fn methods() {
        assert_eq!(classify(&Method::GET), MethodClass::Served);
        assert_eq!(classify(&Method::HEAD), MethodClass::Served);
        for m in [
            "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ] {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(classify(&m), MethodClass::NotAllowed, "{m}");
        }
        for m in ["FOO", "get", "PROPFIND", "BREW"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(classify(&m), MethodClass::Unknown, "{m}");
        }
    }

    #[test]
    fn target_lengths() {
        let len = |s: &str| target_len(&s.parse().unwrap());
        assert_eq!(len("/a?b=c"), 6);
        assert_eq!(len("http://example.com/a"), 20);
        assert_eq!(len(&format!("/{}", "x".repeat(9000))), 9001);
    }
}
