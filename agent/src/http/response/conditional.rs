//! Conditional GET/HEAD on an asset (RFC 9110 §13): the precondition fields in the order
//! §13.2.2 evaluates them, and entity-tag comparison.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

#[derive(Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Go on to Range handling and the 200/206.
    Passed,
    /// `If-None-Match` matched: 304.
    NotModified,
    /// `If-Match` did not match: 412.
    Failed,
}

/// Evaluates If-Match, then If-None-Match, for an existing asset whose strong validator
/// is `etag`. If-Range is left to Range handling (step 5 of §13.2.2).
///
/// Assets have no Last-Modified (the manifest records no times, and a file's mtime on
/// disk says nothing about the release), and RFC 9110 §13.1.3-13.1.4 make a recipient
/// ignore If-Modified-Since and If-Unmodified-Since when the resource has no modification
/// date: steps 2 and 4 never apply.
pub fn evaluate(headers: &HeaderMap, etag: &HeaderValue) -> Precondition {
    if field_matches(headers, header::IF_MATCH, etag, Comparison::Strong) == Some(false) {
        return Precondition::Failed;
    }
    if field_matches(headers, header::IF_NONE_MATCH, etag, Comparison::Weak) == Some(true) {
        return Precondition::NotModified;
    }
    Precondition::Passed
}

/// RFC 9110 §8.8.3.2. Our own tags are always strong.
#[derive(Debug, Clone, Copy)]
pub enum Comparison {
    /// If-Match: a weak tag never matches.
    Strong,
    /// If-None-Match: `W/"x"` matches `"x"`.
    Weak,
}

/// Whether `name` (`"*"` or a list of entity-tags, possibly over several field lines)
/// matches `etag`; None when the request has no such field. A malformed value matches
/// nothing.
fn field_matches(
    headers: &HeaderMap,
    name: HeaderName,
    etag: &HeaderValue,
    comparison: Comparison,
) -> Option<bool> {
    let lines: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
    if lines.is_empty() {
        return None;
    }
    Some(etag_list_matches(&lines, etag, comparison))
}

/// `*` matches any current representation (every asset is one); otherwise any tag in the
/// list must compare equal to `etag`.
pub fn etag_list_matches(
    lines: &[&HeaderValue],
    etag: &HeaderValue,
    comparison: Comparison,
) -> bool {
    if let [only] = lines {
        if only.as_bytes() == b"*" {
            return true;
        }
    }
    let mut tags = Vec::new();
    for line in lines {
        match entity_tags(line.as_bytes()) {
            Some(more) => tags.extend(more),
            None => return false,
        }
    }
    let ours = etag.as_bytes();
    tags.iter().any(|&(weak, opaque)| match comparison {
        Comparison::Strong => !weak && opaque == ours,
        Comparison::Weak => opaque == ours,
    })
}

/// Parses `#entity-tag` into `(weak, opaque-tag with its quotes)`; None when malformed.
/// Splitting on commas would not do: `,` is a valid character inside an opaque-tag.
fn entity_tags(mut rest: &[u8]) -> Option<Vec<(bool, &[u8])>> {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let mut tags = Vec::new();
    loop {
        // Empty list elements are allowed (RFC 9110 §5.6.1.2).
        while let [b, tail @ ..] = rest {
            if !is_ows(b) && *b != b',' {
                break;
            }
            rest = tail;
        }
        if rest.is_empty() {
            return Some(tags);
        }
        let weak = rest.starts_with(b"W/");
        if weak {
            rest = &rest[2..];
        }
        let [b'"', inner @ ..] = rest else {
            return None;
        };
        let close = inner.iter().position(|&b| b == b'"')?;
        // etagc = %x21 / %x23-7E / obs-text
        if !inner[..close]
            .iter()
            .all(|&b| b == 0x21 || (b >= 0x23 && b != 0x7f))
        {
            return None;
        }
        tags.push((weak, &rest[..close + 2]));
        rest = &inner[close + 1..];
        while let [b, tail @ ..] = rest {
            if !is_ows(b) {
                break;
            }
            rest = tail;
        }
        if !matches!(rest, [] | [b',', ..]) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: HeaderValue = HeaderValue::from_static("\"abc\"");

    fn matches(lines: &[&'static str], comparison: Comparison) -> bool {
        let values: Vec<HeaderValue> = lines.iter().map(|l| HeaderValue::from_static(l)).collect();
        let refs: Vec<&HeaderValue> = values.iter().collect();
        etag_list_matches(&refs, &OURS, comparison)
    }

    #[test]
    fn weak_comparison() {
        let m = |v: &'static str| matches(&[v], Comparison::Weak);
        assert!(m("\"abc\""));
        assert!(m("W/\"abc\""));
        assert!(m("\"x\", \"abc\""));
        assert!(m("\"x\",\"abc\""));
        assert!(m(", ,\"abc\" ,"));
        assert!(m("\"a,b\", \"abc\""));
        assert!(m("*"));
        assert!(!m("\"abd\""));
        assert!(!m("abc"));
        assert!(!m("\"ab\"c\""));
        assert!(!m("\"x\" \"abc\""));
        assert!(!m("\"x\", abc, \"abc\""));
        assert!(!m("w/\"abc\""));
        assert!(!m("\"abc"));
        assert!(!m(""));
        // `*` is only valid alone.
        assert!(!m("*, \"x\""));
        assert!(matches(&["\"x\"", "\"abc\""], Comparison::Weak));
        assert!(!matches(&["*", "\"x\""], Comparison::Weak));
    }

    #[test]
    fn strong_comparison() {
        let m = |v: &'static str| matches(&[v], Comparison::Strong);
        assert!(m("\"abc\""));
        assert!(m("\"x\", \"abc\""));
        assert!(m("*"));
        assert!(!m("W/\"abc\""));
        assert!(!m("\"zzz\""));
    }

    fn request(fields: &[(HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(name.clone(), HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn order_of_evaluation() {
        use header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE};
        let e = |fields: &[(HeaderName, &'static str)]| evaluate(&request(fields), &OURS);
        assert_eq!(e(&[]), Precondition::Passed);
        assert_eq!(e(&[(IF_MATCH, "\"zzz\"")]), Precondition::Failed);
        assert_eq!(e(&[(IF_MATCH, "\"abc\"")]), Precondition::Passed);
        assert_eq!(e(&[(IF_MATCH, "*")]), Precondition::Passed);
        assert_eq!(e(&[(IF_NONE_MATCH, "\"abc\"")]), Precondition::NotModified);
        assert_eq!(e(&[(IF_NONE_MATCH, "*")]), Precondition::NotModified);
        // If-Match is evaluated first: a failed one wins over a matching If-None-Match.
        assert_eq!(
            e(&[(IF_MATCH, "\"zzz\""), (IF_NONE_MATCH, "\"abc\"")]),
            Precondition::Failed
        );
        assert_eq!(
            e(&[(IF_MATCH, "\"abc\""), (IF_NONE_MATCH, "\"abc\"")]),
            Precondition::NotModified
        );
        // No modification date: the date conditions are ignored.
        let old = "Thu, 01 Jan 1970 00:00:00 GMT";
        assert_eq!(e(&[(IF_UNMODIFIED_SINCE, old)]), Precondition::Passed);
        let future = "Fri, 01 Jan 2100 00:00:00 GMT";
        assert_eq!(e(&[(IF_MODIFIED_SINCE, future)]), Precondition::Passed);
    }
}
