//! The RegisterImage request, built from the image and the upload (pure), the way NixOS's
//! own tooling registers its AMIs: hvm, ENA, SR-IOV, IMDSv2 only, one gp3 root volume.

use super::digest::SCHEME;
use super::info::{Arch, BootMode, ImageSource};

/// NixOS's amazon image boots from this device.
pub const ROOT_DEVICE: &str = "/dev/xvda";
/// AMI names: 3 to 128 characters.
const MAX_NAME: usize = 128;

pub const TAG_DIGEST: &str = "amictl:image-digest";
pub const TAG_STORE_PATH: &str = "amictl:store-path";
pub const TAG_PREFIX: &str = "amictl:prefix";
pub const TAG_MANAGED_BY: &str = "amictl:managed-by";
pub const TAG_LABEL: &str = "amictl:label";
pub const TAG_SNAPSHOT: &str = "amictl:snapshot-id";
/// `true` on the snapshot and AMI of an image published with `--omit-zero-blocks`: its
/// snapshot leaves zero blocks out, so it must never back an encrypted volume.
pub const TAG_SPARSE: &str = "amictl:sparse";

/// Why a launch of `ami_id` onto an encrypted root volume is refused, if its tags say it
/// is sparse. Launches always encrypt the root volume, so this is every launch amictl makes.
pub fn sparse_refusal(ami_id: &str, tags: &[(String, String)]) -> Option<String> {
    tags.iter()
        .any(|(k, v)| k == TAG_SPARSE && v == "true")
        .then(|| {
            format!(
            "AMI {ami_id} was published with --omit-zero-blocks ({TAG_SPARSE}=true): its snapshot \
             leaves zero blocks out, and on the encrypted root volume every amictl instance gets \
             those blocks read back as random bytes, not zeros, so the file system would boot \
             corrupted. Publish the image again without --omit-zero-blocks and roll out that AMI"
        )
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterSpec {
    pub name: String,
    pub description: String,
    pub arch: Arch,
    pub boot_mode: BootMode,
    pub snapshot_id: String,
    pub volume_size_gib: i32,
    pub tpm_v2: bool,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--tpm needs a UEFI x86_64 image (this one is {arch} booting {boot})")]
    Tpm { arch: Arch, boot: &'static str },
    #[error("--prefix {0:?} may only hold letters, digits and ( ) . - / _")]
    Prefix(String),
}

/// The tag value that content-addresses an image.
pub fn digest_tag(digest: &str) -> String {
    format!("{SCHEME}:{digest}")
}

/// Tags every resource of one published image carries (snapshot and AMI).
pub fn tags(image: &ImageSource, digest: &str, prefix: &str, name: &str) -> Vec<(String, String)> {
    let mut tags = vec![
        ("Name".to_owned(), name.to_owned()),
        (TAG_DIGEST.to_owned(), digest_tag(digest)),
        (TAG_MANAGED_BY.to_owned(), "amictl".to_owned()),
        (TAG_PREFIX.to_owned(), prefix.to_owned()),
        (
            TAG_LABEL.to_owned(),
            image.label.chars().take(256).collect(),
        ),
    ];
    if let Some(p) = &image.store_path {
        tags.push((TAG_STORE_PATH.to_owned(), p.clone()));
    }
    tags
}

/// `{prefix}{label}-{system}-{first 12 hex of the digest}` (then `-sparse` for a sparse
/// snapshot, so the two publications of one image never compete for a name), with
/// characters AMI names do not allow replaced by `-`, cut to 128 characters keeping the hash.
pub fn ami_name(prefix: &str, label: &str, arch: Arch, digest: &str, sparse: bool) -> String {
    let suffix = format!(
        "-{}-{}{}",
        arch.nix_system(),
        &digest[..12.min(digest.len())],
        if sparse { "-sparse" } else { "" }
    );
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "().-/_".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let mut head = format!("{}{}", clean(prefix), clean(label));
    head.truncate(MAX_NAME - suffix.len());
    format!("{head}{suffix}")
}

pub fn validate_prefix(prefix: &str) -> Result<(), SpecError> {
    if prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "().-/_".contains(c))
    {
        Ok(())
    } else {
        Err(SpecError::Prefix(prefix.to_owned()))
    }
}

pub fn build_spec(
    image: &ImageSource,
    digest: &str,
    snapshot_id: &str,
    prefix: &str,
    tpm_v2: bool,
    sparse: bool,
) -> Result<RegisterSpec, SpecError> {
    validate_prefix(prefix)?;
    if tpm_v2 && (image.arch != Arch::X86_64 || image.boot_mode == BootMode::LegacyBios) {
        return Err(SpecError::Tpm {
            arch: image.arch,
            boot: image.boot_mode.as_aws(),
        });
    }
    let name = ami_name(prefix, &image.label, image.arch, digest, sparse);
    let mut tags = tags(image, digest, prefix, &name);
    if sparse {
        tags.push((TAG_SPARSE.to_owned(), "true".to_owned()));
    }
    // Lets `image gc` find the snapshot even where the block device mapping is not reported.
    tags.push((TAG_SNAPSHOT.to_owned(), snapshot_id.to_owned()));
    let mut description = format!(
        "{} {} ({})",
        image.label,
        image.arch.nix_system(),
        digest_tag(digest)
    );
    // RegisterImage descriptions are at most 255 characters.
    description.truncate(255);
    Ok(RegisterSpec {
        tags,
        name,
        description,
        arch: image.arch,
        boot_mode: image.boot_mode,
        snapshot_id: snapshot_id.to_owned(),
        volume_size_gib: image.volume_size_gib(),
        tpm_v2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn image(arch: Arch, boot: BootMode) -> ImageSource {
        ImageSource {
            path: PathBuf::from("/x/nixos.img"),
            size: 3 << 30,
            boot_mode: boot,
            arch,
            label: "26.05.20260801.02e0898".into(),
            store_path: Some(
                "/nix/store/aaaabbbbccccddddeeeeffffgggghhhh-nixos-amazon-image".into(),
            ),
        }
    }
    const D: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn spec_from_image() {
        let s = build_spec(
            &image(Arch::X86_64, BootMode::LegacyBios),
            D,
            "snap-1",
            "demo-",
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            s.name,
            "demo-26.05.20260801.02e0898-x86_64-linux-0123456789ab"
        );
        assert_eq!(s.volume_size_gib, 3);
        assert_eq!(s.snapshot_id, "snap-1");
        assert!(s.description.contains("sha256-blocks-512k:0123"));
        let tag = |k: &str| {
            s.tags
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            tag(TAG_DIGEST),
            Some(format!("sha256-blocks-512k:{D}").as_str())
        );
        assert_eq!(
            tag(TAG_STORE_PATH),
            image(Arch::X86_64, BootMode::Uefi).store_path.as_deref()
        );
        assert_eq!(tag(TAG_PREFIX), Some("demo-"));
        assert_eq!(tag("Name"), Some(s.name.as_str()));
        assert_eq!(tag(TAG_SPARSE), None);
        assert_eq!(sparse_refusal("ami-1", &s.tags), None);
    }

    #[test]
    fn a_sparse_image_is_named_and_tagged_so_and_refused_for_launch() {
        let s = build_spec(
            &image(Arch::X86_64, BootMode::Uefi),
            D,
            "s",
            "demo-",
            false,
            true,
        )
        .unwrap();
        assert_eq!(
            s.name,
            "demo-26.05.20260801.02e0898-x86_64-linux-0123456789ab-sparse"
        );
        assert!(s.tags.contains(&(TAG_SPARSE.to_owned(), "true".to_owned())));
        let why = sparse_refusal("ami-1", &s.tags).unwrap();
        assert!(why.contains("ami-1") && why.contains("encrypted"), "{why}");
        assert!(why.contains("without --omit-zero-blocks"), "{why}");
        let long = ami_name("p-", &"x".repeat(300), Arch::X86_64, D, true);
        assert!(
            long.len() <= 128 && long.ends_with("-0123456789ab-sparse"),
            "{long}"
        );
    }

    #[test]
    fn tpm_only_for_uefi_x86() {
        assert!(
            build_spec(
                &image(Arch::X86_64, BootMode::Uefi),
                D,
                "s",
                "",
                true,
                false
            )
            .unwrap()
            .tpm_v2
        );
        assert!(build_spec(&image(Arch::Arm64, BootMode::Uefi), D, "s", "", true, false).is_err());
        assert!(build_spec(
            &image(Arch::X86_64, BootMode::LegacyBios),
            D,
            "s",
            "",
            true,
            false
        )
        .is_err());
    }

    #[test]
    fn names_are_cleaned_and_bounded() {
        let n = ami_name("my prefix!", &"x".repeat(300), Arch::Arm64, D, false);
        assert!(n.len() <= 128);
        assert!(n.starts_with("my-prefix-"));
        assert!(n.ends_with("-aarch64-linux-0123456789ab"));
        assert!(build_spec(
            &image(Arch::X86_64, BootMode::Uefi),
            D,
            "s",
            "bad prefix",
            false,
            false
        )
        .is_err());
    }
}
