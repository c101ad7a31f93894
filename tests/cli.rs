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

#[test]
fn shoal_demo_serves_and_shows_the_cluster_react_to_a_killed_backend() {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = Command::new(shoal_bin())
        .arg("demo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let mut wait_for = |what: &dyn Fn(&str) -> bool, within: Duration| -> String {
        let deadline = Instant::now() + within;
        if let Some(l) = seen.iter().find(|l| what(l)) {
            return l.clone();
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if what(&l) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("demo output never matched; got:\n{}", seen.join("\n"));
    };
    let line = wait_for(
        &|l| l.starts_with("peer a  proxy http://"),
        Duration::from_secs(20),
    );
    let proxy = line.split_whitespace().nth(3).unwrap().to_string();
    wait_for(
        &|l| l.contains("[c] pool_changed") && l.contains("routing from pool version"),
        Duration::from_secs(10),
    );
    let get = |url: &str| {
        Command::new("curl")
            .args(["-s", "-m", "5", url])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    assert!(get(&format!("{proxy}/")).starts_with("hello from backend-"));
    // The second service, by Host, as the README's first curls show it.
    let api = Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            "-H",
            "Host: api.localhost",
            &format!("{proxy}/"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(api.starts_with("hello from api-1"), "{api}");

    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "kill backend-2").unwrap();
    wait_for(
        &|l| l.starts_with("> killed backend-2"),
        Duration::from_secs(5),
    );
    for peer in ["a", "b", "c"] {
        wait_for(
            &|l| l.contains(&format!("[{peer}] backend_local")) && l.contains("backend-2 down"),
            Duration::from_secs(10),
        );
        wait_for(
            &|l| l.contains(&format!("[{peer}] ejected")) && l.contains("backend-2"),
            Duration::from_secs(10),
        );
    }
    writeln!(stdin, "start backend-2").unwrap();
    for peer in ["a", "b", "c"] {
        wait_for(
            &|l| l.contains(&format!("[{peer}] restored")) && l.contains("backend-2"),
            Duration::from_secs(10),
        );
    }
    writeln!(stdin, "kill nothing").unwrap();
    wait_for(
        &|l| l.starts_with("> no backend \"nothing\""),
        Duration::from_secs(5),
    );
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "demo did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn completions_and_version() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(shoal_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("shoal") && text.contains("demo-backend"),
            "{shell}: {text}"
        );
    }
    let out = Command::new(shoal_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(shoal_bin()).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("shoal {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}
