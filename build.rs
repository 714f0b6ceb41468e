//! Build script: names the git commit the binary is built from, for `--version` and the
//! `membersync_build_info` metric (`membersync::BUILD_COMMIT`).
//!
//! It asks `git` for the checkout's commit (`rev-parse --short=12 HEAD`) and whether a
//! tracked file differs from it (`status --porcelain --untracked-files=no`). Without `git`,
//! or outside a checkout of this package (a source tarball, a vendored copy), the commit is
//! `MEMBERSYNC_BUILD_COMMIT` from the environment, else `unknown`.
//!
//! It runs again when HEAD moves (a commit, a checkout: HEAD, the branch it points to,
//! `packed-refs`) and when what is compiled in changes (`src/`, `build.rs`, `Cargo.toml`,
//! `Cargo.lock`): those are what `, modified` speaks of. An edit elsewhere (tests, docs) is
//! seen at the next of those. Not the index: `git status` or `git add` rewrite it without
//! changing a commit or a compiled file, and each rewrite would compile the crate again.
//!
//! What this module must never do: fail the build for lack of git, or write to the
//! repository (the index is read with `--no-optional-locks`, never refreshed).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The longest `MEMBERSYNC_BUILD_COMMIT` taken.
const MAX_GIVEN: usize = 64;

fn main() {
    println!("cargo:rerun-if-env-changed=MEMBERSYNC_BUILD_COMMIT");
    for compiled_in in ["src", "build.rs", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={compiled_in}");
    }
    let (commit, modified) = match from_git() {
        Some(found) => found,
        None => (given_commit(), false),
    };
    println!("cargo:rustc-env=MEMBERSYNC_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=MEMBERSYNC_BUILD_MODIFIED={}", if modified { "modified" } else { "" });
}

/// `git` with `args` in the package's directory: its trimmed output when it ran and
/// succeeded.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("--no-optional-locks").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The commit and whether tracked files differ from it, when this package is a git
/// checkout; `None` when `git` is missing or the package is not tracked by the repository
/// around it (a tarball unpacked inside some other checkout must not take its commit).
fn from_git() -> Option<(String, bool)> {
    git(&["ls-files", "--error-unmatch", "Cargo.toml"])?;
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    watch_git_files();
    let modified = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some((commit, modified))
}

/// `cargo:rerun-if-changed` for the files whose change means another commit: found with `rev-parse --git-path`, which also answers in a worktree (where `.git`
/// is a file and HEAD lives apart from the refs). Only paths that exist: cargo runs a build
/// script again at every build while one it watches is missing.
fn watch_git_files() {
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git_path(name).filter(|p| p.exists()) {
            watch(&path);
        }
    }
    // The branch HEAD points to (none when HEAD is detached). A branch kept only in
    // `packed-refs` gets a file of its own at its next commit: its folder is watched until
    // then (the nearest that exists, `refs/heads` at least).
    let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]).filter(|b| !b.is_empty()) else { return };
    let (Some(path), Some(heads)) = (git_path(&branch), git_path("refs/heads")) else { return };
    // Never above `refs/heads`: cargo would scan the whole repository at every build.
    if let Some(existing) = path.ancestors().find(|p| p.exists()).filter(|p| p.starts_with(&heads)) {
        watch(existing);
    }
}

fn git_path(name: &str) -> Option<PathBuf> {
    git(&["rev-parse", "--git-path", name]).map(|p| absolute(&p))
}

fn watch(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// `path` as `git` printed it (relative to the package's directory, or absolute).
fn absolute(path: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_default();
    dir.join(Path::new(path))
}

/// `MEMBERSYNC_BUILD_COMMIT`, else `unknown`. A value that is not a plain name (letters,
/// digits, `.`, `_`, `-`, at most 64) fails the build: it would be printed and put in a
/// metric label as it is.
fn given_commit() -> String {
    match std::env::var("MEMBERSYNC_BUILD_COMMIT") {
        Ok(given) if given.is_empty() => "unknown".to_string(),
        Ok(given) => {
            let plain = given.len() <= MAX_GIVEN
                && given.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !plain {
                panic!(
                    "MEMBERSYNC_BUILD_COMMIT={given:?} is not a commit name: use letters, digits, `.`, `_` or `-` \
                     (at most {MAX_GIVEN}), e.g. the output of `git rev-parse --short=12 HEAD`, or unset it"
                );
            }
            given
        }
        Err(_) => "unknown".to_string(),
    }
}
