//! The binary's CLI: check, exit codes, messages that name keys.

mod common;

use std::process::Command;

use common::shoal_bin;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(shoal_bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file under config/ is a valid config.
#[test]
fn every_shipped_config_checks() {
    let mut n = 0;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                let (code, out, err) = check(&p);
                assert_eq!(code, 0, "{}: {out}{err}", p.display());
                assert!(out.contains("ok"));
                n += 1;
            }
        }
    }
    assert!(n >= 1);
}

#[test]
fn bad_config_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[node]\nid = \"a\"\n[balance]\nhash_key = \"foo\"\n[[backends]]\naddr = \"127.0.0.1:1\"\n[[backends]]\naddr = \"127.0.0.1:2\"\nweight = 0\n",
    )
    .unwrap();
    let (code, _, err) = check(&p);
    assert_eq!(code, 2);
    assert!(err.contains(r#"balance.hash_key: unknown source "foo" (expected header:NAME, cookie:NAME, query:NAME, path or client_ip)"#), "{err}");
    assert!(
        err.contains("backends[1].weight: must be 1..=1000, got 0"),
        "{err}"
    );
}

#[test]
fn missing_file_exits_2_and_run_refuses_bad_config() {
    let (code, _, err) = check(std::path::Path::new("/nonexistent/shoal.toml"));
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[node]\nid = \"UPPER\"\n").unwrap();
    let out = Command::new(shoal_bin())
        .args(["run", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.id: bad id"));
}

#[test]
fn version_and_bad_arguments() {
    let out = Command::new(shoal_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shoal "));
    let out = Command::new(shoal_bin())
        .args(["run", "--nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn pool_client_reports_unreachable_admin() {
    let port = common::free_port();
    let out = Command::new(shoal_bin())
        .args([
            "pool",
            "list",
            "--admin",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
