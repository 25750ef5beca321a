//! `amictl image build`: `nix build` the image (progress on stderr), then publish the result
//! exactly as `image publish RESULT_DIR` does.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;

use crate::image::info::ImageSource;

use super::publish;

/// nixpkgs 26.05 needs Nix 2.18 or newer.
const MIN_NIX: (u32, u32) = (2, 18);
const FEATURES: &str = "nix-command flakes";
/// How to get a Nix that builds the image, said whenever it is missing or too old.
const NIX_HELP: &str = "amictl image build needs Nix 2.18 or newer with flakes: install it (https://nixos.org/download), and enable flakes with `experimental-features = nix-command flakes` in ~/.config/nix/nix.conf or /etc/nix/nix.conf (amictl passes --extra-experimental-features itself). Or build the image some other way and run `amictl image publish RESULT_DIR`";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The flake output to build (any installable `nix build` takes).
    #[arg(long, value_name = "REF", default_value = ".#ami")]
    pub flake: String,
    /// Seconds the build may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 4 * 3600)]
    pub build_timeout: u64,
    #[command(flatten)]
    pub publish: publish::Flags,
}

/// `nix --version` output → (major, minor, patch): `nix (Nix) 2.18.1`,
/// `nix (Determinate Nix 3.6.2) 2.29.0`, `nix (Lix, like Nix) 2.91.1`, `2.19.0pre2023…`.
pub fn parse_nix_version(output: &str) -> Option<(u32, u32, u32)> {
    let line = output.lines().find(|l| !l.trim().is_empty())?;
    let word = line.split_whitespace().last()?;
    let mut parts = word.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether the Nix that printed `output` is new enough; the error says what was found.
pub fn check_nix_version(output: &str) -> Result<(u32, u32, u32), String> {
    match parse_nix_version(output) {
        Some(v) if (v.0, v.1) >= MIN_NIX => Ok(v),
        Some((a, b, c)) => Err(format!("found Nix {a}.{b}.{c}, too old. {NIX_HELP}")),
        None => Err(format!(
            "cannot read the Nix version from `nix --version` ({:?}). {NIX_HELP}",
            output.trim()
        )),
    }
}

/// The out path holding the image (`nix-support/image-info.json`) among those `nix build
/// --print-out-paths` printed.
pub fn pick_result(stdout: &str, has_info: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let paths: Vec<PathBuf> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    paths
        .iter()
        .find(|p| has_info(p))
        .or(paths.first().filter(|_| paths.len() == 1))
        .cloned()
}

async fn nix_version() -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("nix")
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("`nix --version` did not answer within 60 s. {NIX_HELP}"))?;
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("nix is not on PATH. {NIX_HELP}")
        }
        Err(e) => return Err(e).context("running `nix --version`"),
    };
    if !out.status.success() {
        anyhow::bail!(
            "`nix --version` failed ({}): {}. {NIX_HELP}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v = check_nix_version(&String::from_utf8_lossy(&out.stdout)).map_err(anyhow::Error::msg)?;
    tracing::debug!(version = ?v, "nix");
    Ok(())
}

/// Runs the build with Nix's progress on our stderr; the out paths it printed.
async fn nix_build(flake: &str, timeout: Duration) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("nix");
    cmd.args(["--extra-experimental-features", FEATURES, "build", flake])
        .args(["--print-out-paths", "--no-link"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    eprintln!("nix build {flake}");
    let child = cmd.spawn().context("starting `nix build`")?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "`nix build {flake}` did not finish within {} s (--build-timeout); stopped it",
                timeout.as_secs()
            )
        })?
        .context("waiting for `nix build`")?;
    if !out.status.success() {
        anyhow::bail!(
            "`nix build {flake}` failed ({}); its messages are above",
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    nix_version().await?;
    let stdout = nix_build(&args.flake, Duration::from_secs(args.build_timeout)).await?;
    let result = pick_result(&stdout, |p| p.join("nix-support/image-info.json").is_file())
        .with_context(|| {
            format!(
                "`nix build {}` printed no single image result (a directory with nix-support/image-info.json): {:?}",
                args.flake,
                stdout.trim()
            )
        })?;
    eprintln!("built {}", result.display());
    let image = ImageSource::from_result_dir(&result, args.publish.boot_mode)?;
    publish::publish_image(image, args.publish).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_versions() {
        assert_eq!(parse_nix_version("nix (Nix) 2.18.1\n"), Some((2, 18, 1)));
        assert_eq!(
            parse_nix_version("nix (Determinate Nix 3.6.2) 2.29.0"),
            Some((2, 29, 0))
        );
        assert_eq!(
            parse_nix_version("nix (Lix, like Nix) 2.91.1"),
            Some((2, 91, 1))
        );
        assert_eq!(
            parse_nix_version("nix (Nix) 2.19.0pre20231011_abcdef"),
            Some((2, 19, 0))
        );
        assert_eq!(parse_nix_version("nix (Nix) 2.3"), Some((2, 3, 0)));
        assert_eq!(parse_nix_version("nix (Nix) 3.0"), Some((3, 0, 0)));
        assert_eq!(parse_nix_version(""), None);
        assert_eq!(parse_nix_version("command not found"), None);
    }

    #[test]
    fn nix_must_be_2_18_or_newer() {
        assert!(check_nix_version("nix (Nix) 2.18.0").is_ok());
        assert!(check_nix_version("nix (Nix) 3.0.0").is_ok());
        let e = check_nix_version("nix (Nix) 2.17.9").unwrap_err();
        assert!(e.contains("found Nix 2.17.9") && e.contains("2.18"), "{e}");
        assert!(
            e.contains("experimental-features = nix-command flakes"),
            "{e}"
        );
        let e = check_nix_version("garbage").unwrap_err();
        assert!(e.contains("2.18"), "{e}");
        // Not 2.3 < 2.18 read as a string comparison.
        assert!(check_nix_version("nix (Nix) 2.3.18").is_err());
    }

    #[test]
    fn the_result_is_the_path_with_image_info() {
        let has = |p: &Path| p.to_string_lossy().ends_with("-image");
        assert_eq!(
            pick_result("/nix/store/a-doc\n/nix/store/b-image\n", has),
            Some(PathBuf::from("/nix/store/b-image"))
        );
        assert_eq!(
            pick_result("/nix/store/x\n", |_| false),
            Some(PathBuf::from("/nix/store/x"))
        );
        assert_eq!(pick_result("/nix/store/x\n/nix/store/y\n", |_| false), None);
        assert_eq!(pick_result("\n", |_| false), None);
    }
}
