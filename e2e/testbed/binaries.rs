//! The workspace's binaries, for tests of another package (Cargo gives a test the paths of its
//! own package's binaries only): built on first use, then found next to the test executable.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Every binary of the workspace, with its package.
const BINARIES: [(&str, &str); 4] = [
    ("ec2-kubelet", "ec2-kubelet"),
    ("ec2-kubelet-agent", "ec2-kubelet-agent"),
    ("ec2-kubelet-dev", "ec2-kubelet-testbed"),
    ("ec2-kubelet-bench", "ec2-kubelet-testbed"),
];

/// The path of the workspace binary `name`, built (once per process, with the profile of the
/// running test) so that a test never runs a stale one. Panics with Cargo's output when the
/// build fails: a test cannot go on without its binary.
pub fn binary(name: &str) -> PathBuf {
    assert!(
        BINARIES.iter().any(|(binary, _)| *binary == name),
        "{name} is not a binary of this workspace"
    );
    let dir = profile_dir();
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(|| build(&dir)) {
        panic!("building the workspace's binaries: {e}");
    }
    dir.join(name)
}

/// `target/<profile>`: the parent of the `deps` directory the test executable runs from.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe
        .parent()
        .expect("the test executable's directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn build(dir: &std::path::Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = dir.parent().ok_or("no target directory")?;
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "--locked"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for (binary, package) in BINARIES {
        command.args(["-p", package, "--bin", binary]);
    }
    if dir.ends_with("release") {
        command.arg("--release");
    }
    let output = command.output().map_err(|e| format!("running cargo: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}
