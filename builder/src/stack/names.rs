//! What a stack name and a resource prefix may be (pure): checked before any call, so a
//! typo costs no half-made change set, and the error says what would be accepted.

use super::StackError;

/// CloudFormation's limit on stack names.
pub const MAX_STACK_NAME: usize = 128;
/// The template's `Prefix` pattern allows 20 characters: `${Prefix}tg` must fit ELB's 32
/// and the import bucket's name (`${Prefix}import-ACCOUNT-REGION`) S3's 63.
pub const MAX_PREFIX: usize = 20;
pub const DEFAULT_PREFIX: &str = "amictl-";

/// A stack name CloudFormation accepts: a letter, then letters, digits and hyphens, at
/// most 128 characters.
pub fn check_stack_name(name: &str) -> Result<(), StackError> {
    let ok = name.len() <= MAX_STACK_NAME
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(StackError::InvalidName(format!(
            "stack name {name:?} is invalid: a CloudFormation stack name starts with a letter and has only letters, digits and hyphens, at most {MAX_STACK_NAME} characters, e.g. amictl-web"
        )))
    }
}

/// An ACM certificate ARN the load balancer can use: `arn:PARTITION:acm:REGION:ACCOUNT:
/// certificate/ID`, in the stack's region when that is known (an ALB takes certificates of
/// its own region only). Empty means "no certificate": HTTP only.
pub fn check_certificate_arn(arn: &str, region: Option<&str>) -> Result<(), StackError> {
    if arn.is_empty() {
        return Ok(());
    }
    let bad = |why: String| {
        Err(StackError::InvalidCertificate(format!(
            "--certificate-arn {arn:?} {why}"
        )))
    };
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [scheme, partition, service, cert_region, account, resource] = parts[..] else {
        return bad("is not an ARN: expected arn:aws:acm:REGION:ACCOUNT:certificate/ID (see `aws acm list-certificates`)".into());
    };
    let id = resource.strip_prefix("certificate/").unwrap_or("");
    if scheme != "arn" || !partition.starts_with("aws") || service != "acm" {
        return bad("is not an ACM certificate: the load balancer takes certificates from ACM, arn:aws:acm:REGION:ACCOUNT:certificate/ID (request one with `aws acm request-certificate`, or import yours with `aws acm import-certificate`)".into());
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return bad(format!(
            "has account {account:?}: an account id is 12 digits"
        ));
    }
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return bad("does not end in certificate/ID".into());
    }
    if let Some(region) = region {
        if cert_region != region {
            return bad(format!(
                "is in {cert_region}, the stack in {region}: a load balancer uses certificates of its own region; request or import one in {region} (`aws acm request-certificate --region {region} ...`)"
            ));
        }
    }
    Ok(())
}

/// Names that would start with these are refused by S3 (`xn--`, `sthree-`,
/// `amzn-s3-demo-`) or by ELB (`internal-`), as the bucket and load balancer names do.
const RESERVED_STARTS: [&str; 4] = ["xn--", "sthree-", "amzn-s3-demo-", "internal-"];

/// A prefix the template's `Prefix` parameter accepts and that makes valid names for
/// every resource: a lowercase letter, then up to 19 lowercase letters, digits or
/// hyphens (the S3 bucket name carries it, and S3 takes lowercase only).
pub fn check_prefix(prefix: &str) -> Result<(), StackError> {
    let bad = |why: &str| {
        Err(StackError::InvalidPrefix(format!(
            "prefix {prefix:?} is invalid: {why} (e.g. --prefix {DEFAULT_PREFIX})"
        )))
    };
    if prefix.is_empty() || prefix.len() > MAX_PREFIX {
        return bad(&format!(
            "it must have 1 to {MAX_PREFIX} characters, which keeps the load balancer, target group and bucket names within their limits"
        ));
    }
    if !prefix.starts_with(|c: char| c.is_ascii_lowercase())
        || !prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return bad("it must start with a lowercase letter and have only lowercase letters, digits and hyphens (S3 bucket names are lowercase)");
    }
    if let Some(r) = RESERVED_STARTS.iter().find(|r| prefix.starts_with(*r)) {
        return bad(&format!(
            "names starting with {r:?} are reserved by S3 or Elastic Load Balancing"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_names() {
        for good in ["a", "amictl-web", "Web2", &"a".repeat(128)] {
            assert!(check_stack_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1web",
            "-web",
            "web_1",
            "web.1",
            "wéb",
            &"a".repeat(129),
        ] {
            let e = check_stack_name(bad).unwrap_err().to_string();
            assert!(
                e.contains("starts with a letter") && e.contains("amictl-web"),
                "{e}"
            );
        }
    }

    #[test]
    fn prefixes() {
        for good in ["amictl-", "a", "web2-", "x-y-z", &"a".repeat(20)] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Amictl-",
            "1web-",
            "-web",
            "web_",
            "web.",
            &"a".repeat(21),
        ] {
            let e = check_prefix(bad).unwrap_err().to_string();
            assert!(e.contains("--prefix amictl-"), "{e}");
        }
        for reserved in ["xn--a", "sthree-x", "internal-"] {
            let e = check_prefix(reserved).unwrap_err().to_string();
            assert!(e.contains("reserved"), "{e}");
        }
    }

    #[test]
    fn certificate_arns() {
        const ARN: &str = "arn:aws:acm:eu-west-1:123456789012:certificate/1f2e-3d4c";
        assert!(
            check_certificate_arn("", Some("us-east-1")).is_ok(),
            "empty: HTTP only"
        );
        assert!(check_certificate_arn(ARN, None).is_ok());
        assert!(check_certificate_arn(ARN, Some("eu-west-1")).is_ok());
        assert!(check_certificate_arn(
            "arn:aws-us-gov:acm:us-gov-west-1:123456789012:certificate/x",
            Some("us-gov-west-1")
        )
        .is_ok());
        let err = |arn: &str, region| check_certificate_arn(arn, region).unwrap_err();
        let e = err(ARN, Some("us-east-1"));
        assert!(e.is_usage());
        let e = e.to_string();
        assert!(
            e.contains("is in eu-west-1, the stack in us-east-1")
                && e.contains("--region us-east-1"),
            "{e}"
        );
        for (bad, says) in [
            ("cert-123", "is not an ARN"),
            (
                "arn:aws:iam::123456789012:server-certificate/x",
                "not an ACM certificate",
            ),
            ("arn:aws:acm:us-east-1", "is not an ARN"),
            (
                "arn:aws:iam:us-east-1:123456789012:server-certificate/x",
                "not an ACM certificate",
            ),
            ("arn:aws:acm:us-east-1:1234:certificate/x", "12 digits"),
            (
                "arn:aws:acm:us-east-1:123456789012:certificate/",
                "certificate/ID",
            ),
            ("arn:aws:acm:us-east-1:123456789012:key/x", "certificate/ID"),
        ] {
            let e = err(bad, None).to_string();
            assert!(
                e.contains(says) && e.contains("--certificate-arn"),
                "{bad}: {e}"
            );
        }
    }
}
