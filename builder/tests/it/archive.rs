//! `amictl archive`: the same tree gives the same bytes, whatever the clock, the umask or
//! the order the files were written in; only the files that belong to the source go in.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use amictl::archive::{self, ArchiveError, Listing};
use sha2::{Digest, Sha256};

/// Writes `content` to `root/relative` with `mode`, creating parent directories.
fn write(root: &Path, relative: &str, content: &str, mode: u32) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets the modification time of `root/relative`.
fn touch(root: &Path, relative: &str, when: SystemTime) {
    File::options()
        .write(true)
        .open(root.join(relative))
        .unwrap()
        .set_modified(when)
        .unwrap();
}

/// The files of the fixture tree: path, content, executable.
const TREE: &[(&str, &str, bool)] = &[
    ("Cargo.toml", "[workspace]\n", false),
    ("README.md", "# amictl\n", false),
    ("builder/src/lib.rs", "pub mod cmd;\n", false),
    ("scripts/release.sh", "#!/bin/sh\necho release\n", true),
    ("site/index.html", "<p>Hello, world!</p>\n", false),
];

/// Builds the fixture tree in `root`, in `order`, with non-executable files at `file_mode`
/// and every mtime at `when`.
fn build_tree(root: &Path, order: &[usize], file_mode: u32, when: SystemTime) {
    for &i in order {
        let (path, content, executable) = TREE[i];
        write(
            root,
            path,
            content,
            if executable { 0o755 } else { file_mode },
        );
        touch(root, path, when);
    }
}

/// Archives `dir` into a fresh file and returns the zip's bytes and the outcome.
fn archive_bytes(dir: &Path) -> (Vec<u8>, archive::Archive) {
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("source.zip");
    let archive = archive::create(dir, &output).unwrap();
    let bytes = fs::read(&output).unwrap();
    assert_eq!(
        archive.sha256,
        hex::encode(Sha256::digest(&bytes)),
        "printed sha256 is the file's"
    );
    (bytes, archive)
}

/// Name, unix mode and time of each entry, in archive order.
fn entries(bytes: &[u8]) -> Vec<(String, u32, String)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..zip.len())
        .map(|i| {
            let file = zip.by_index(i).unwrap();
            let time = file
                .last_modified()
                .map(|t| t.to_string())
                .unwrap_or_default();
            (file.name().to_string(), file.unix_mode().unwrap(), time)
        })
        .collect()
}

fn names(bytes: &[u8]) -> Vec<String> {
    entries(bytes)
        .into_iter()
        .map(|(name, _, _)| name)
        .collect()
}

/// The content of one entry.
fn content(bytes: &[u8], name: &str) -> String {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = String::new();
    zip.by_name(name).unwrap().read_to_string(&mut out).unwrap();
    out
}

/// A scratch directory that is not inside any git work tree (asserted by the walk listing).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Runs git in `dir` isolated from the user's and the system's configuration; `None` when
/// git is not installed, so the git cases skip rather than fail on a machine without it.
fn git(dir: &Path, args: &[&str]) -> Option<()> {
    let home = dir.join(".git-test-home");
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .status()
        .ok()?;
    assert!(status.success(), "git {args:?} failed");
    Some(())
}

fn git_init(dir: &Path) -> Option<()> {
    git(dir, &["init", "-q"])
}

#[test]
fn same_tree_gives_same_bytes_whatever_the_mtimes_modes_and_order() {
    let a = scratch();
    let b = scratch();
    build_tree(a.path(), &[0, 1, 2, 3, 4], 0o644, SystemTime::now());
    build_tree(
        b.path(),
        &[4, 3, 2, 1, 0],
        0o600,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );

    let (bytes_a, archive_a) = archive_bytes(a.path());
    let (bytes_b, archive_b) = archive_bytes(b.path());
    assert_eq!(
        archive_a.listing,
        Listing::Walk,
        "scratch dirs must not be inside a git work tree"
    );
    assert_eq!(bytes_a, bytes_b);
    assert_eq!(archive_a.sha256, archive_b.sha256);

    // Sorted, with the zip epoch as every entry's time.
    let listed = entries(&bytes_a);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    assert_eq!(listed.len(), TREE.len());
    for (name, _, time) in &listed {
        assert_eq!(time, "1980-01-01 00:00:00", "{name}");
    }
}

#[test]
fn archiving_twice_gives_the_same_bytes() {
    let dir = scratch();
    build_tree(dir.path(), &[0, 1, 2, 3, 4], 0o644, SystemTime::now());
    let (first, _) = archive_bytes(dir.path());
    for (path, _, _) in TREE {
        touch(
            dir.path(),
            path,
            SystemTime::now() + Duration::from_secs(3600),
        );
    }
    let (second, _) = archive_bytes(dir.path());
    assert_eq!(first, second);
}

#[test]
fn executable_bit_is_kept_and_other_modes_are_normalised() {
    let dir = scratch();
    write(dir.path(), "run.sh", "#!/bin/sh\n", 0o700);
    write(
        dir.path(),
        "private.txt",
        "secret-looking but public\n",
        0o600,
    );
    write(dir.path(), "wide.txt", "group-writable\n", 0o666);
    let (bytes, _) = archive_bytes(dir.path());
    let modes: Vec<(String, u32)> = entries(&bytes)
        .into_iter()
        .map(|(name, mode, _)| (name, mode))
        .collect();
    assert_eq!(
        modes,
        vec![
            ("private.txt".to_string(), 0o100644),
            ("run.sh".to_string(), 0o100755),
            ("wide.txt".to_string(), 0o100644),
        ]
    );
}

#[test]
fn walk_leaves_out_git_target_and_out_links() {
    let dir = scratch();
    build_tree(dir.path(), &[0, 1, 2, 3, 4], 0o644, SystemTime::now());
    write(dir.path(), ".git/config", "[core]\n", 0o644);
    write(
        dir.path(),
        "vendor/dep/.git",
        "gitdir: ../../.git/modules/dep\n",
        0o644,
    );
    write(dir.path(), "vendor/dep/lib.rs", "// vendored\n", 0o644);
    write(dir.path(), "target/debug/amictl", "ELF", 0o755);
    write(
        dir.path(),
        "target/CACHEDIR.TAG",
        "Signature: 8a477f597d28d172789f06886806bc55\n",
        0o644,
    );
    write(
        dir.path(),
        "agent/src/target/mod.rs",
        "// a module named target\n",
        0o644,
    );
    symlink(
        "/nix/store/00000000000000000000000000000000-site",
        dir.path().join("result"),
    )
    .unwrap();
    symlink(
        "/nix/store/00000000000000000000000000000000-ami",
        dir.path().join("result-ami"),
    )
    .unwrap();
    symlink("README.md", dir.path().join("LINK.md")).unwrap();
    write(dir.path(), "results.md", "not an out-link\n", 0o644);

    let (bytes, archive) = archive_bytes(dir.path());
    assert_eq!(archive.listing, Listing::Walk);
    assert_eq!(
        names(&bytes),
        vec![
            "Cargo.toml",
            "LINK.md",
            "README.md",
            "agent/src/target/mod.rs",
            "builder/src/lib.rs",
            "results.md",
            "scripts/release.sh",
            "site/index.html",
            "vendor/dep/lib.rs",
        ]
    );
    // Symlinks stay symlinks, stored with their target.
    let link = entries(&bytes)
        .into_iter()
        .find(|(name, _, _)| name == "LINK.md")
        .unwrap();
    assert_eq!(link.1 & 0o170000, 0o120000);
    assert_eq!(content(&bytes, "LINK.md"), "README.md");
}

#[test]
fn git_work_tree_archives_only_tracked_files() {
    let dir = scratch();
    if git_init(dir.path()).is_none() {
        eprintln!("skipping: git is not installed");
        return;
    }
    build_tree(dir.path(), &[0, 1, 2, 3, 4], 0o644, SystemTime::now());
    write(
        dir.path(),
        "deleted.txt",
        "tracked, then deleted from the working tree\n",
        0o644,
    );
    git(dir.path(), &["add", "--", "."]).unwrap();
    fs::remove_file(dir.path().join("deleted.txt")).unwrap();
    write(dir.path(), "untracked.txt", "not in git\n", 0o644);
    write(dir.path(), "target/debug/amictl", "ELF", 0o755);
    // Tracked files are archived as they are in the working tree.
    write(dir.path(), "README.md", "# amictl, edited\n", 0o644);

    let (bytes, archive) = archive_bytes(dir.path());
    assert_eq!(archive.listing, Listing::Git);
    assert_eq!(
        names(&bytes),
        vec![
            "Cargo.toml",
            "README.md",
            "builder/src/lib.rs",
            "scripts/release.sh",
            "site/index.html"
        ]
    );
    assert_eq!(content(&bytes, "README.md"), "# amictl, edited\n");
    let script = entries(&bytes)
        .into_iter()
        .find(|(name, _, _)| name == "scripts/release.sh")
        .unwrap();
    assert_eq!(script.1, 0o100755);

    // A subdirectory archives its own tracked files, relative to itself.
    let (sub, _) = archive_bytes(&dir.path().join("builder"));
    assert_eq!(names(&sub), vec!["src/lib.rs"]);
}

#[test]
fn git_listing_and_walk_of_a_clean_copy_agree() {
    // The Nix sandbox archives a copy of the flake without `.git`; a developer archives the
    // checkout. Both must publish the same bytes.
    let repo = scratch();
    if git_init(repo.path()).is_none() {
        eprintln!("skipping: git is not installed");
        return;
    }
    build_tree(repo.path(), &[0, 1, 2, 3, 4], 0o644, SystemTime::now());
    git(repo.path(), &["add", "--", "."]).unwrap();
    write(repo.path(), "untracked.txt", "left out\n", 0o644);

    let copy = scratch();
    build_tree(
        copy.path(),
        &[4, 2, 0, 3, 1],
        0o444,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1),
    );

    let (from_git, git_archive) = archive_bytes(repo.path());
    let (from_walk, walk_archive) = archive_bytes(copy.path());
    assert_eq!(git_archive.listing, Listing::Git);
    assert_eq!(walk_archive.listing, Listing::Walk);
    assert_eq!(from_git, from_walk);
}

#[test]
fn default_output_inside_the_tree_does_not_archive_itself() {
    let dir = scratch();
    build_tree(dir.path(), &[0, 1], 0o644, SystemTime::now());
    let output = dir.path().join(archive::DEFAULT_OUTPUT);
    let first = archive::create(dir.path(), &output).unwrap();
    let second = archive::create(dir.path(), &output).unwrap();
    assert_eq!(
        first.sha256, second.sha256,
        "the previous source.zip must not be archived"
    );
    assert_eq!(
        names(&fs::read(&output).unwrap()),
        vec!["Cargo.toml", "README.md"]
    );
    // No temporary file is left beside the output.
    let leftovers: Vec<PathBuf> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".amictl-archive-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_dir_is_a_clear_error_and_writes_nothing() {
    let out = scratch();
    let output = out.path().join("source.zip");

    let missing = out.path().join("no-such-dir");
    match archive::create(&missing, &output) {
        Err(err @ ArchiveError::Missing { .. }) => {
            assert!(err.to_string().contains("no-such-dir"), "{err}");
        }
        other => panic!("expected a missing-directory error, got {other:?}"),
    }

    let file = out.path().join("a-file");
    fs::write(&file, "not a directory").unwrap();
    assert!(matches!(
        archive::create(&file, &output),
        Err(ArchiveError::NotADirectory { .. })
    ));

    let left: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("a-file")],
        "nothing but the fixture"
    );
}

#[test]
fn cli_prints_the_sha256sum_line_and_fails_cleanly_on_a_bad_dir() {
    let dir = scratch();
    build_tree(dir.path(), &[0, 1, 2, 3, 4], 0o644, SystemTime::now());
    let out = scratch();
    let output = out.path().join("site/source.zip");
    fs::create_dir_all(output.parent().unwrap()).unwrap();

    let run = Command::new(env!("CARGO_BIN_EXE_amictl"))
        .arg("archive")
        .arg("--output")
        .arg(&output)
        .arg(dir.path())
        .env("AMICTL_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = fs::read(&output).unwrap();
    let expected = format!(
        "{}  {}\n",
        hex::encode(Sha256::digest(&bytes)),
        output.display()
    );
    assert_eq!(String::from_utf8(run.stdout).unwrap(), expected);

    let bad_output = out.path().join("bad.zip");
    let run = Command::new(env!("CARGO_BIN_EXE_amictl"))
        .arg("archive")
        .arg("--output")
        .arg(&bad_output)
        .arg(out.path().join("no-such-dir"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(
        stderr.contains("no-such-dir") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(run.stdout.is_empty());
    assert!(!bad_output.exists());
}
