//! What `deploy/` ships, checked: the Kubernetes manifest against a current Kubernetes schema and
//! `shoal check` with each pod's environment; the systemd unit with `systemd-analyze`; the
//! Dockerfile's toolchain against `rust-version`. The validators are outside tools: without one a
//! test prints why and passes, except under `CI=true`, where a missing tool is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{have_tool, shoal_bin, shoal_cert};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The manifest's documents as JSON (PyYAML), with the sha256 of the ConfigMap's shoal.toml.
fn manifest() -> Option<(Vec<Value>, String)> {
    if !have_tool("python3", &["-c", "import yaml"]) {
        return None;
    }
    let script = r#"
import hashlib, json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
toml = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["shoal.toml"]
print(json.dumps({"docs": docs, "sha256": hashlib.sha256(toml.encode()).hexdigest()}))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(repo().join("deploy/kubernetes/shoal.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Some((
        v["docs"].as_array().unwrap().clone(),
        v["sha256"].as_str().unwrap().to_string(),
    ))
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifest"))
}

fn seconds(text: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key} =")))
        .unwrap_or_else(|| panic!("{key} not in the ConfigMap"));
    let v = line.split('"').nth(1).unwrap();
    v.trim_end_matches('s').parse().unwrap()
}

#[test]
fn kubernetes_manifest_passes_the_schema_of_a_current_release() {
    if !have_tool("kubernetes-validate", &["--version"]) {
        return;
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.37.0"])
        .arg(repo().join("deploy/kubernetes/shoal.yaml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    for resource in [
        "configmap/shoal",
        "service/shoal-peers",
        "service/shoal",
        "poddisruptionbudget/shoal",
        "statefulset/shoal",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{resource}: {text}"
        );
    }
    assert!(
        !text.contains("ERROR") && !text.contains("failed"),
        "{text}"
    );
}

#[test]
fn kubernetes_manifest_runs_safely_and_each_pod_config_checks() {
    let Some((docs, sha)) = manifest() else {
        return;
    };
    let sts = kind(&docs, "StatefulSet");
    let pod = &sts["spec"]["template"];
    let spec = &pod["spec"];
    // A config edit rolls the pods: the checksum annotation matches the ConfigMap.
    assert_eq!(
        pod["metadata"]["annotations"]["checksum/config"],
        format!("sha256:{sha}"),
        "update the checksum/config annotation after editing the ConfigMap"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    for svc in docs.iter().filter(|d| d["kind"] == "Service") {
        assert!(
            svc["metadata"]["annotations"].is_null(),
            "scrape annotations belong on pods"
        );
    }
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(
        kind(&docs, "PodDisruptionBudget")["spec"]["maxUnavailable"],
        1
    );
    let anti =
        &spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(anti[0]["topologyKey"], "kubernetes.io/hostname");
    let sc = &spec["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["fsGroup"], 65532);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let c = &spec["containers"][0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(
            m["subPath"].is_null(),
            "subPath mounts never see edits: {m}"
        );
    }
    // The grace period covers shutdown_delay + shutdown_grace.
    let toml = kind(&docs, "ConfigMap")["data"]["shoal.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let need = seconds(&toml, "shutdown_delay") + seconds(&toml, "shutdown_grace");
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > need,
        "terminationGracePeriodSeconds {grace} <= {need}"
    );

    // `shoal check` on the ConfigMap's config with each pod's environment, the secrets made by
    // `shoal cert` where the pod mounts them.
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let t = tls.to_str().unwrap();
    shoal_cert(&["ca", "--out", t]);
    let admin = dir.path().join("admin");
    std::fs::create_dir_all(&admin).unwrap();
    std::fs::write(admin.join("token"), "k8s-token\n").unwrap();
    let mounted = |p: &str| {
        p.replace("/etc/shoal/tls", t)
            .replace("/etc/shoal/admin", admin.to_str().unwrap())
    };
    let config = dir.path().join("shoal.toml");
    std::fs::write(&config, mounted(&toml)).unwrap();
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    let cpu = c["resources"]["requests"]["cpu"].as_str().unwrap();
    for i in 0..replicas {
        let name = format!("shoal-{i}");
        shoal_cert(&["issue", &name, "--ca", t, "--out", t]);
        let env = pod_env(c, &name, cpu);
        let mut cmd = Command::new(shoal_bin());
        cmd.args(["check", "--config"]).arg(&config).env_clear();
        for (k, v) in &env {
            if k.starts_with("SHOAL__") {
                cmd.env(k, mounted(v));
            }
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {env:?}\n{text}");
        assert!(
            text.contains(&format!("node {name} (voter):"))
                && text.contains("with 2 other peer(s)"),
            "{name}: {text}"
        );
    }
}

/// A container's environment as Kubernetes would give it to pod `name`: fieldRef to the pod name,
/// resourceFieldRef to the CPU request (rounded up), `$(VAR)` expanded from earlier entries.
fn pod_env(container: &Value, name: &str, cpu_request: &str) -> Vec<(String, String)> {
    let cpu = match cpu_request.strip_suffix('m') {
        Some(milli) => milli.parse::<u64>().unwrap().div_ceil(1000),
        None => cpu_request.parse::<f64>().unwrap().ceil() as u64,
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().unwrap() {
        let key = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            name.to_string()
        } else if e["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu" {
            cpu.max(1).to_string()
        } else {
            panic!("unexpected env entry {e}")
        };
        env.push((key, value));
    }
    env
}

#[test]
fn systemd_unit_is_verified_and_hardened() {
    if !have_tool("systemd-analyze", &["--version"]) {
        return;
    }
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/shoal.service")).unwrap();
    assert!(unit.contains("\nType=notify\n"));
    assert!(unit.contains("\nStateDirectory=shoal\n"));
    // ExecReload checks the file before it signals.
    let reloads: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        reloads,
        vec![
            "ExecReload=/usr/local/bin/shoal check",
            "ExecReload=/bin/kill -HUP $MAINPID"
        ]
    );
    // verify wants the programs to exist: point the unit at this build's binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shoal.service");
    let bin = shoal_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/shoal", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    let exposure = security_exposure(&path);
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0");
}

fn security_exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--no-pager", "--offline=true"])
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"))
}

#[test]
fn the_dockerfile_builds_with_the_rust_version_the_crate_declares() {
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let docker = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let build = docker
        .lines()
        .find_map(|l| l.strip_prefix("ARG BUILD_IMAGE="))
        .unwrap();
    assert!(
        build.contains(&format!("rust:{msrv}-")),
        "BUILD_IMAGE {build} is not Rust {msrv}"
    );
    // rust-version is true: no locked dependency needs a newer Rust.
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = |v: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = v.split('.').map(|x| x.parse().unwrap_or(0)).collect();
        parts.resize(3, 0);
        parts
    };
    for p in meta["packages"].as_array().unwrap() {
        if let Some(need) = p["rust_version"].as_str() {
            assert!(
                version(need) <= version(msrv),
                "{} {} needs Rust {need} > rust-version {msrv}",
                p["name"],
                p["version"]
            );
        }
    }
}
