//! What `nix build .#ami` produced: `nix-support/image-info.json` and the raw disk it names,
//! or a bare raw file described by flags. Parsing and validation are pure.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BootMode {
    #[value(name = "uefi")]
    Uefi,
    #[value(name = "legacy-bios")]
    LegacyBios,
    /// UEFI where the instance type supports it, legacy BIOS elsewhere.
    #[value(name = "uefi-preferred")]
    UefiPreferred,
}

impl BootMode {
    /// The value RegisterImage takes.
    pub fn as_aws(self) -> &'static str {
        match self {
            BootMode::Uefi => "uefi",
            BootMode::LegacyBios => "legacy-bios",
            BootMode::UefiPreferred => "uefi-preferred",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "arm64")]
    Arm64,
}

impl Arch {
    pub fn as_aws(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The Nix system double the architecture runs.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_aws())
    }
}

/// A raw disk image ready for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub path: PathBuf,
    /// The disk's size in bytes (the file's length).
    pub size: u64,
    pub boot_mode: BootMode,
    pub arch: Arch,
    /// A human name for the image, e.g. `nixos-amazon-image-26.05.20260801.02e0898-x86_64-linux`.
    pub label: String,
    /// The Nix store path the image lives in, when it does: a second content address that
    /// can be looked up before reading a byte.
    pub store_path: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("{} does not exist; pass the result of `nix build .#ami` (a directory with nix-support/image-info.json) or --image FILE", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid image-info JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} names no root disk (neither `file` nor `disks.root.file`)", path.display())]
    NoRootDisk { path: PathBuf },
    #[error("{path}: {field} is {value:?}; expected {expected}")]
    BadField {
        path: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{} is a {format} image; EBS direct upload needs a raw disk: build it with `amazonImage.format = \"raw\"` (or convert it: `qemu-img convert -O raw {} disk.raw`)", path.display(), path.display())]
    NotRaw { path: PathBuf, format: &'static str },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
    #[error(
        "a bare image needs --boot-mode and --arch (image-info.json is what normally says them)"
    )]
    NeedsFlags,
}

/// nixpkgs' `nix-support/image-info.json`: `logical_bytes` is a string there.
#[derive(Debug, Deserialize)]
struct RawInfo {
    label: Option<String>,
    boot_mode: Option<String>,
    system: Option<String>,
    file: Option<PathBuf>,
    disks: Option<Disks>,
}

#[derive(Debug, Deserialize)]
struct Disks {
    root: Option<Disk>,
}

#[derive(Debug, Deserialize)]
struct Disk {
    file: Option<PathBuf>,
}

/// Parses image-info.json text (pure). `origin` names the file in errors.
pub fn parse_info(
    text: &str,
    origin: &Path,
) -> Result<(PathBuf, BootMode, Arch, String), InfoError> {
    let raw: RawInfo = serde_json::from_str(text).map_err(|source| InfoError::Json {
        path: origin.to_owned(),
        source,
    })?;
    let origin_s = origin.display().to_string();
    // ZFS images list `disks.boot` and `disks.root` and no top-level `file`: the root disk
    // is what becomes the AMI's root volume.
    let file = raw
        .disks
        .and_then(|d| d.root)
        .and_then(|r| r.file)
        .or(raw.file)
        .ok_or_else(|| InfoError::NoRootDisk {
            path: origin.to_owned(),
        })?;
    let boot_mode = match raw.boot_mode.as_deref() {
        Some("uefi") => BootMode::Uefi,
        Some("legacy-bios") => BootMode::LegacyBios,
        Some("uefi-preferred") => BootMode::UefiPreferred,
        other => {
            return Err(InfoError::BadField {
                path: origin_s,
                field: "boot_mode",
                value: other.unwrap_or("(missing)").to_owned(),
                expected: "\"uefi\" or \"legacy-bios\"",
            })
        }
    };
    let arch = match raw.system.as_deref() {
        Some("x86_64-linux") => Arch::X86_64,
        Some("aarch64-linux") => Arch::Arm64,
        other => {
            return Err(InfoError::BadField {
                path: origin_s,
                field: "system",
                value: other.unwrap_or("(missing)").to_owned(),
                expected: "\"x86_64-linux\" or \"aarch64-linux\"",
            })
        }
    };
    let label = raw.label.unwrap_or_else(|| "nixos".to_owned());
    Ok((file, boot_mode, arch, label))
}

impl ImageSource {
    /// From a `nix build` result directory (or a symlink to one).
    pub fn from_result_dir(dir: &Path, boot_mode: Option<BootMode>) -> Result<Self, InfoError> {
        if !dir.exists() {
            return Err(InfoError::Missing {
                path: dir.to_owned(),
            });
        }
        let info_path = dir.join("nix-support/image-info.json");
        let text = std::fs::read_to_string(&info_path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InfoError::Missing {
                path: info_path.clone(),
            },
            _ => InfoError::Io {
                path: info_path.clone(),
                source,
            },
        })?;
        let (file, info_boot, arch, label) = parse_info(&text, &info_path)?;
        // image-info names the file by its store path; resolve relative names in `dir`.
        let file = if file.is_absolute() {
            file
        } else {
            dir.join(file)
        };
        let store_path =
            store_path_of(&std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned()));
        Self::from_file(
            &file,
            boot_mode.unwrap_or(info_boot),
            arch,
            label,
            store_path,
        )
    }

    /// A bare raw file.
    pub fn from_file(
        path: &Path,
        boot_mode: BootMode,
        arch: Arch,
        label: String,
        store_path: Option<String>,
    ) -> Result<Self, InfoError> {
        let io = |source| InfoError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InfoError::Missing {
                path: path.to_owned(),
            },
            _ => io(source),
        })?;
        if meta.len() == 0 {
            return Err(InfoError::Empty {
                path: path.to_owned(),
            });
        }
        let mut file = std::fs::File::open(path).map_err(io)?;
        if let Some(format) = detect_non_raw(&mut file, meta.len()).map_err(io)? {
            return Err(InfoError::NotRaw {
                path: path.to_owned(),
                format,
            });
        }
        Ok(ImageSource {
            path: path.to_owned(),
            size: meta.len(),
            boot_mode,
            arch,
            label,
            store_path: store_path.or_else(|| store_path_of(&std::fs::canonicalize(path).ok()?)),
        })
    }

    /// The EBS volume size: whole GiB, rounded up.
    pub fn volume_size_gib(&self) -> i32 {
        self.size.div_ceil(1 << 30).max(1) as i32
    }
}

/// `/nix/store/<hash>-<name>` when `path` is in (or is) a store path.
pub fn store_path_of(path: &Path) -> Option<String> {
    let s = path.to_str()?;
    let rest = s.strip_prefix("/nix/store/")?;
    let name = rest.split('/').next()?;
    // A store path's hash part is 32 base-32 characters followed by `-`.
    (name.len() > 33 && name.as_bytes()[32] == b'-').then(|| format!("/nix/store/{name}"))
}

/// Recognises the formats nixpkgs can build instead of raw.
fn detect_non_raw(file: &mut std::fs::File, len: u64) -> std::io::Result<Option<&'static str>> {
    let mut head = [0u8; 8];
    let n = file.read(&mut head)?;
    if n >= 4 && &head[..4] == b"QFI\xfb" {
        return Ok(Some("qcow2"));
    }
    if n == 8 && &head == b"conectix" {
        return Ok(Some("VHD (vpc)"));
    }
    // A fixed VHD is raw data followed by a 512-byte footer that starts with `conectix`.
    if len >= 512 {
        file.seek(SeekFrom::Start(len - 512))?;
        let mut footer = [0u8; 8];
        if file.read(&mut footer)? == 8 && &footer == b"conectix" {
            return Ok(Some("VHD (vpc)"));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = r#"{"label":"26.05.20260801.02e0898","boot_mode":"legacy-bios","system":"x86_64-linux","logical_bytes":"3221225472","file":"/nix/store/abc-nixos-amazon-image/nixos.img"}"#;
    const ZFS: &str = r#"{"label":"l","boot_mode":"uefi","system":"aarch64-linux","disks":{"boot":{"logical_bytes":"1","file":"/x/boot.img"},"root":{"logical_bytes":"2","file":"/x/root.img"}}}"#;

    #[test]
    fn parses_both_shapes() {
        let (file, boot, arch, label) = parse_info(PLAIN, Path::new("i.json")).unwrap();
        assert_eq!(
            file,
            PathBuf::from("/nix/store/abc-nixos-amazon-image/nixos.img")
        );
        assert_eq!((boot, arch), (BootMode::LegacyBios, Arch::X86_64));
        assert_eq!(label, "26.05.20260801.02e0898");
        let (file, boot, arch, _) = parse_info(ZFS, Path::new("i.json")).unwrap();
        assert_eq!(file, PathBuf::from("/x/root.img"));
        assert_eq!((boot, arch), (BootMode::Uefi, Arch::Arm64));
    }

    #[test]
    fn rejects_bad_info() {
        let e = parse_info(
            r#"{"boot_mode":"uefi","system":"x86_64-linux","disks":{"boot":{"file":"/b"}}}"#,
            Path::new("i.json"),
        );
        assert!(matches!(e, Err(InfoError::NoRootDisk { .. })));
        let e = parse_info(
            r#"{"boot_mode":"bios","system":"x86_64-linux","file":"/f"}"#,
            Path::new("i.json"),
        );
        assert!(e.unwrap_err().to_string().contains("boot_mode is \"bios\""));
        let e = parse_info(
            r#"{"boot_mode":"uefi","system":"riscv64-linux","file":"/f"}"#,
            Path::new("i.json"),
        );
        assert!(e.unwrap_err().to_string().contains("riscv64-linux"));
        assert!(matches!(
            parse_info("{", Path::new("i.json")),
            Err(InfoError::Json { .. })
        ));
    }

    #[test]
    fn store_paths() {
        let p = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-amazon-image/nixos.img";
        assert_eq!(
            store_path_of(Path::new(p)).as_deref(),
            Some("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-amazon-image")
        );
        assert_eq!(store_path_of(Path::new("/tmp/nixos.img")), None);
        assert_eq!(store_path_of(Path::new("/nix/store/short")), None);
    }

    #[test]
    fn refuses_vhd_and_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.qcow2");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let e =
            ImageSource::from_file(&q, BootMode::Uefi, Arch::X86_64, "l".into(), None).unwrap_err();
        assert!(
            e.to_string().contains("qcow2")
                && e.to_string().contains("amazonImage.format = \"raw\""),
            "{e}"
        );
        let v = dir.path().join("a.vhd");
        let mut data = vec![0u8; 4096];
        data[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        std::fs::write(&v, &data).unwrap();
        let e =
            ImageSource::from_file(&v, BootMode::Uefi, Arch::X86_64, "l".into(), None).unwrap_err();
        assert!(e.to_string().contains("VHD"), "{e}");
        let r = dir.path().join("a.raw");
        std::fs::write(&r, vec![1u8; 4096]).unwrap();
        let s = ImageSource::from_file(&r, BootMode::Uefi, Arch::X86_64, "l".into(), None).unwrap();
        assert_eq!((s.size, s.volume_size_gib()), (4096, 1));
    }

    #[test]
    fn result_dir_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let e = ImageSource::from_result_dir(&dir.path().join("nope"), None).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = ImageSource::from_result_dir(dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("image-info.json"), "{e}");
        std::fs::create_dir(dir.path().join("nix-support")).unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![7u8; 1024]).unwrap();
        std::fs::write(
            dir.path().join("nix-support/image-info.json"),
            r#"{"label":"x","boot_mode":"uefi","system":"x86_64-linux","logical_bytes":"1024","file":"disk.img"}"#,
        )
        .unwrap();
        let s = ImageSource::from_result_dir(dir.path(), Some(BootMode::UefiPreferred)).unwrap();
        assert_eq!(s.boot_mode, BootMode::UefiPreferred);
        assert_eq!(s.size, 1024);
    }
}
