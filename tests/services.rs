//! Services: several web services behind the same peers, routed by Host and path, each with its
//! own agreed pool. Real processes on loopback.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;

/// The entry of service `name` in a `GET /services` answer.
fn service_in(list: &serde_json::Value, name: &str) -> serde_json::Value {
    list["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {list}"))
        .clone()
}

/// One request with `host` on a keep-alive connection; the echo's `name` and `path`.
async fn via(
    c: &mut hyper::client::conn::http1::SendRequest<Body>,
    host: &str,
    path: &str,
) -> (u16, String, String) {
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(empty())
        .unwrap();
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (
        status,
        v["name"].as_str().unwrap_or("").to_string(),
        v["path"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_one_connection_reach_the_service_their_host_and_path_name() {
    let d = Backend::start("d", Behavior::Echo).await;
    let a = Backend::start("a", Behavior::Echo).await;
    let s = Backend::start("s", Behavior::Echo).await;
    let v2 = Backend::start("v2", Behavior::Echo).await;
    let w = Backend::start("w", Behavior::Echo).await;
    let rest = [
        backends_toml(&[&d]),
        service_toml("api", "hosts = [\"api.localhost\"]", &[&a]),
        service_toml(
            "api-v2",
            "hosts = [\"api.localhost\"]\npath_prefix = \"/v2/\"\nstrip_prefix = true",
            &[&v2],
        ),
        service_toml("static", "path_prefix = \"/static/\"", &[&s]),
        service_toml("wild", "hosts = [\"*.example.org\"]", &[&w]),
    ]
    .concat();
    let shoal = Shoal::start("", &rest).await;
    let mut c = client(shoal.proxy).await;
    let cases = [
        ("api.localhost", "/x", "a", "/x"),
        ("API.localhost:8080", "/x", "a", "/x"),
        ("api.localhost", "/v2/users?id=1", "v2", "/users"),
        ("api.localhost", "/v2", "a", "/v2"),
        ("anything.test", "/static/app.js", "s", "/static/app.js"),
        ("api.localhost", "/static/app.js", "s", "/static/app.js"),
        ("www.example.org", "/", "w", "/"),
        ("example.org", "/", "d", "/"),
        ("localhost", "/", "d", "/"),
    ];
    for (host, path, want, seen) in cases {
        let (status, name, got) = via(&mut c, host, path).await;
        assert_eq!(
            (status, name.as_str(), got.as_str()),
            (200, want, seen),
            "{host} {path}"
        );
    }
    let text = shoal.metrics().await;
    assert_eq!(
        metric(
            &text,
            "shoal_requests_total{backend=\"v2\",code=\"2xx\",service=\"api-v2\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "shoal_requests_total{backend=\"d\",code=\"2xx\",service=\"default\"}"
        ),
        Some(2.0)
    );
    assert!(text.contains("shoal_backend_up{backend=\"w\",service=\"wild\"} 1"));

    // The services as the API shows them: sorted, default included, effective settings.
    let (code, list) = get_json(shoal.admin, "/services").await;
    assert_eq!(code, 200);
    let names: Vec<&str> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "api-v2", "default", "static", "wild"]);
    let v2s = &list["services"][1];
    assert_eq!(v2s["path_prefix"], "/v2/");
    assert_eq!(v2s["strip_prefix"], true);
    assert_eq!(v2s["balance"]["algorithm"], "round_robin");
    assert_eq!(v2s["backends"][0]["id"], "v2");
    let (code, pool) = get_json(shoal.admin, "/services/wild/pool").await;
    assert_eq!(code, 200);
    assert_eq!(pool["backends"][0]["addr"], w.addr.to_string());
    let (code, _) = get_json(shoal.admin, "/services/nope/pool").await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_matching_and_an_empty_default_is_a_404_that_reaches_no_backend() {
    let a = Backend::start("a", Behavior::Echo).await;
    let rest = service_toml("api", "hosts = [\"api.localhost\"]", &[&a]);
    let shoal = Shoal::start("", &rest).await;
    let answer = raw(
        shoal.proxy,
        b"GET /some/where HTTP/1.1\r\nHost: other.localhost\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("other.localhost"), "{answer}");
    assert!(answer.contains("/some/where"), "{answer}");
    assert_eq!(a.hits(), 0);
    shoal
        .metric_reaches("shoal_route_misses_total", 1.0, Duration::from_secs(2))
        .await;
    let (code, _, _) = via(&mut client(shoal.proxy).await, "api.localhost", "/").await;
    assert_eq!(code, 200);
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_defines_services_and_refuses_bad_ones() {
    let d = Backend::start("d", Behavior::Echo).await;
    let n = Backend::start("n", Behavior::Echo).await;
    let shoal = Shoal::start("", &backends_toml(&[&d])).await;
    let put = |body: serde_json::Value| admin_call(shoal.admin, "PUT", "/services/api", Some(body));
    for (body, key) in [
        (serde_json::json!({"hosts": ["bad host"]}), "hosts[0]"),
        (serde_json::json!({"path_prefix": "v1"}), "path_prefix"),
        (
            serde_json::json!({"balance": {"algorithm": "fastest"}}),
            "balance.algorithm",
        ),
        (serde_json::json!({"health": {"rise": 0}}), "health.rise"),
        (
            serde_json::json!({"health": {"colour": "blue"}}),
            "health.colour",
        ),
        (serde_json::json!({"strip_prefix": true}), "strip_prefix"),
    ] {
        let (code, e) = put(body.clone()).await;
        assert_eq!(code, 400, "{body}: {e}");
        assert!(e["error"].as_str().unwrap().contains(key), "{body}: {e}");
    }
    let (_, pool) = get_json(shoal.admin, "/pool").await;
    let before = pool["version"].as_u64().unwrap();

    let body = serde_json::json!({
        "hosts": ["api.localhost"],
        "balance": {"algorithm": "consistent_hash", "hash_key": "header:x-user"},
        "health": {"path": "/healthz"},
    });
    let (code, svc) = put(body.clone()).await;
    assert_eq!(code, 201, "{svc}");
    assert_eq!(svc["balance"]["algorithm"], "consistent_hash");
    assert_eq!(svc["balance"]["hash_key"], "header:x-user");
    assert_eq!(svc["version"].as_u64(), Some(before + 1));
    let (code, _) = put(body).await;
    assert_eq!(code, 200, "replacing");
    let (code, one) = get_json(shoal.admin, "/services/api").await;
    assert_eq!(
        (code, one["hosts"][0].as_str()),
        (200, Some("api.localhost"))
    );
    let (code, _) = get_json(shoal.admin, "/services/nope").await;
    assert_eq!(code, 404);
    // Another service may not take the same host and prefix.
    let (code, e) = admin_call(
        shoal.admin,
        "PUT",
        "/services/other",
        Some(serde_json::json!({"hosts": ["api.localhost"]})),
    )
    .await;
    assert_eq!(code, 409, "{e}");
    let (code, e) = admin_call(
        shoal.admin,
        "PUT",
        "/services/Bad_Name",
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(code, 400, "{e}");

    // Its backends, through the service's paths; routing follows at once.
    let (code, pool) = admin_call(
        shoal.admin,
        "POST",
        "/services/api/backends",
        Some(serde_json::json!({"addr": n.addr.to_string(), "id": "n"})),
    )
    .await;
    assert_eq!(code, 201, "{pool}");
    assert_eq!(pool["backends"][0]["id"], "n");
    let mut c = client(shoal.proxy).await;
    assert_eq!(via(&mut c, "api.localhost", "/").await.1, "n");
    assert_eq!(via(&mut c, "localhost", "/").await.1, "d");
    let (code, pool) =
        admin_call(shoal.admin, "POST", "/services/api/backends/n/drain", None).await;
    assert_eq!(
        (code, pool["backends"][0]["state"].as_str()),
        (200, Some("draining"))
    );
    let (code, _) = admin_call(shoal.admin, "DELETE", "/services/api/backends/zz", None).await;
    assert_eq!(code, 404);
    // The default pool is untouched by all of it.
    let (_, pool) = get_json(shoal.admin, "/pool").await;
    assert_eq!(pool["backends"].as_array().unwrap().len(), 1);

    let (code, _) = admin_call(shoal.admin, "DELETE", "/services/default", None).await;
    assert_eq!(code, 409);
    let (code, _) = admin_call(shoal.admin, "DELETE", "/services/nope", None).await;
    assert_eq!(code, 404);
    let (code, _) = admin_call(shoal.admin, "DELETE", "/services/api", None).await;
    assert_eq!(code, 200);
    let mut c = client(shoal.proxy).await;
    assert_eq!(via(&mut c, "api.localhost", "/").await.1, "d");
    // Its series went with it.
    eventually(Duration::from_secs(2), "api's series gone", || async {
        (!shoal.metrics().await.contains("service=\"api\"")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_applies_and_removes_services() {
    let d = Backend::start("d", Behavior::Echo).await;
    let n = Backend::start("n", Behavior::Echo).await;
    let shoal = Shoal::start("", &backends_toml(&[&d])).await;
    let admin = format!("http://{}", shoal.admin);
    let run = |args: &[&str]| {
        let out = Command::new(shoal_bin())
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A file with a service: `apply` commits its definition, not its backends.
    let file = shoal.dir.path().join("services.toml");
    std::fs::write(
        &file,
        format!(
            "[node]\nid = \"x\"\n\n{}",
            service_toml(
                "web",
                "hosts = [\"web.localhost\"]\npath_prefix = \"/app/\"",
                &[&n]
            )
        ),
    )
    .unwrap();
    let (code, out, err) = run(&["services", "apply", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("web") && out.contains("web.localhost"),
        "{out}"
    );
    let (_, pool) = get_json(shoal.admin, "/services/web/pool").await;
    assert_eq!(pool["backends"].as_array().unwrap().len(), 0, "{pool}");

    let n_addr = n.addr.to_string();
    let (code, out, err) = run(&["pool", "add", &n_addr, "--id", "n", "--service", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&n_addr), "{out}");
    let (code, out, _) = run(&["pool", "list", "--service", "web"]);
    assert_eq!(code, 0);
    assert!(out.contains("n ") && out.contains("active"), "{out}");
    let (code, out, _) = run(&["pool", "list"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&n_addr), "default's pool: {out}");
    let mut c = client(shoal.proxy).await;
    assert_eq!(via(&mut c, "web.localhost", "/app/x").await.1, "n");

    let (code, out, _) = run(&["services"]);
    assert_eq!(code, 0);
    assert!(out.contains("default") && out.contains("web"), "{out}");
    let (code, out, err) = run(&["services", "remove", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, _) = run(&["services", "remove", "default"]);
    assert_ne!(code, 0);
    let (_, list) = get_json(shoal.admin, "/services").await;
    assert_eq!(list["services"].as_array().unwrap().len(), 1);

    // `shoal check` names each bad key of a service.
    std::fs::write(
        &file,
        "[node]\nid = \"x\"\n\n[[services]]\nname = \"ok\"\nhosts = [\"a.test\"]\n\n[[services]]\nname = \"ok\"\nhosts = [\"a.test\", \"bad host\"]\npath_prefix = \"nope\"\n[services.balance]\nalgorithm = \"fastest\"\n[[services.backends]]\naddr = \"x\"\n",
    )
    .unwrap();
    let out = Command::new(shoal_bin())
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for key in [
        "services[1].name",
        "services[1].hosts[1]",
        "services[1].path_prefix",
        "services[1].balance.algorithm",
        "services[1].backends[0].addr",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_agree_on_changes_to_different_services_made_through_each() {
    let d = Backend::start("d", Behavior::Echo).await;
    let a = Backend::start("a", Behavior::Echo).await;
    let w = Backend::start("w", Behavior::Echo).await;
    let extra: Vec<Backend> = vec![
        Backend::start("a2", Behavior::Echo).await,
        Backend::start("w2", Behavior::Echo).await,
        Backend::start("n1", Behavior::Echo).await,
    ];
    let config = [
        backends_toml(&[&d]),
        service_toml("api", "hosts = [\"api.localhost\"]", &[&a]),
        service_toml("web", "hosts = [\"web.localhost\"]", &[&w]),
    ]
    .concat();
    let nodes = start_cluster(3, |_| String::new(), |_| config.clone()).await;
    let body = |b: &Backend| serde_json::json!({"addr": b.addr.to_string(), "id": b.name});
    let (r1, r2, r3) = tokio::join!(
        commit_eventually(
            &nodes[0],
            &nodes,
            ("POST", "/services/api/backends", body(&extra[0])),
            Duration::from_secs(20),
        ),
        commit_eventually(
            &nodes[1],
            &nodes,
            ("POST", "/services/web/backends", body(&extra[1])),
            Duration::from_secs(20),
        ),
        commit_eventually(
            &nodes[2],
            &nodes,
            (
                "PUT",
                "/services/new",
                serde_json::json!({"hosts": ["new.localhost"]}),
            ),
            Duration::from_secs(20),
        ),
    );
    assert_eq!((r1.0, r2.0, r3.0), (201, 201, 201), "{r1:?} {r2:?} {r3:?}");
    let (code, _) = commit_eventually(
        &nodes[2],
        &nodes,
        ("POST", "/services/new/backends", body(&extra[2])),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(code, 201);
    // Every peer holds the same services at the same version, and routes by them.
    let want = eventually(Duration::from_secs(10), "peers agreeing", || async {
        let mut seen = Vec::new();
        for n in &nodes {
            let (_, mut v) = get_json(n.admin, "/services").await;
            for s in v["services"].as_array_mut().unwrap() {
                // Effective settings are each peer's own; the agreed parts must be equal.
                s.as_object_mut().unwrap().remove("balance");
                s.as_object_mut().unwrap().remove("health");
            }
            seen.push(v);
        }
        (seen.iter().all(|v| *v == seen[0]) && seen[0]["version"].as_u64() >= Some(5))
            .then(|| seen[0].clone())
    })
    .await;
    let ids = |name: &str| -> Vec<String> {
        want["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids("api"), ["a", "a2"]);
    assert_eq!(ids("web"), ["w", "w2"]);
    assert_eq!(ids("new"), ["n1"]);
    assert_eq!(ids("default"), ["d"]);
    for n in &nodes {
        let mut c = client(n.proxy).await;
        assert_eq!(via(&mut c, "new.localhost", "/").await.1, "n1");
        assert_eq!(via(&mut c, "nothing.localhost", "/").await.1, "d");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_from_its_service_and_no_other() {
    let d1 = Backend::start("d1", Behavior::Echo).await;
    let d2 = Backend::start("d2", Behavior::Echo).await;
    let a1 = Backend::start("a1", Behavior::Echo).await;
    let a2 = Backend::start("a2", Behavior::Echo).await;
    // The same address in two services is checked for each, by each one's settings: `shared`
    // is probed at /healthz for default and at /ready (which it answers 200) for api.
    let shared = Backend::start("shared", Behavior::Echo).await;
    let config = format!(
        "[health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\nmax_ejected_percent = 50\n\n{}\n[[backends]]\nid = \"shared\"\naddr = \"{}\"\n\n{}[[services.backends]]\nid = \"shared\"\naddr = \"{}\"\n",
        backends_toml(&[&d1, &d2]),
        shared.addr,
        service_toml(
            "api",
            "hosts = [\"api.localhost\"]\n[services.health]\npath = \"/ready\"\nmax_ejected_percent = 34",
            &[&a1, &a2],
        ),
        shared.addr,
    );
    let nodes = start_cluster(3, |_| String::new(), |_| config.clone()).await;
    a1.health_ok
        .store(false, std::sync::atomic::Ordering::SeqCst);
    shared
        .health_ok
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // a1 answers /healthz with 503 but api probes /ready: it stays. shared fails default's
    // /healthz: ejected from default (1 of 3 is within 50%), not from api.
    let state = |pool: &serde_json::Value, id: &str| {
        pool["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .map(|b| b["state"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    for n in &nodes {
        eventually(
            Duration::from_secs(15),
            "shared ejected from default",
            || async {
                let (_, pool) = get_json(n.admin, "/pool").await;
                (state(&pool, "shared") == "ejected").then_some(())
            },
        )
        .await;
    }
    // Now make a1 fail api's own probe path: it goes too, from api only (1 of 3 within 34%).
    a1.set(Behavior::Status(503));
    for n in &nodes {
        eventually(Duration::from_secs(15), "a1 ejected from api", || async {
            let (_, pool) = get_json(n.admin, "/services/api/pool").await;
            (state(&pool, "a1") == "ejected").then_some(())
        })
        .await;
    }
    for n in &nodes {
        let (_, api) = get_json(n.admin, "/services/api/pool").await;
        assert_eq!(state(&api, "shared"), "active", "{api}");
        assert_eq!(state(&api, "a2"), "active", "{api}");
        let (_, def) = get_json(n.admin, "/pool").await;
        assert_eq!(state(&def, "d1"), "active", "{def}");
        assert_eq!(state(&def, "d2"), "active", "{def}");
        n.metric_reaches(
            "shoal_backend_state{backend=\"a1\",state=\"ejected\",service=\"api\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        // Requests for api go to its usable backends only.
        let mut c = client(n.proxy).await;
        for _ in 0..6 {
            let (code, name, _) = via(&mut c, "api.localhost", "/").await;
            assert_eq!(code, 200);
            assert_ne!(name, "a1");
        }
    }
    let (_, events) = get_json(nodes[0].admin, "/events").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "ejected" && e["service"] == "api" && e["backend"] == "a1"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_file_differs_from_the_agreed_services_says_so_and_routes_by_the_agreed() {
    let a = Backend::start("a", Behavior::Echo).await;
    let rest = service_toml("api", "hosts = [\"api.localhost\"]", &[&a]);
    let shoal = Shoal::start("", &rest).await;
    let (code, e) = admin_call(
        shoal.admin,
        "PUT",
        "/services/api",
        Some(serde_json::json!({"hosts": ["api2.localhost"], "path_prefix": "/x/"})),
    )
    .await;
    assert_eq!(code, 200, "{e}");
    shoal.signal("-HUP");
    eventually(Duration::from_secs(5), "the warning on reload", || async {
        let log = shoal.log();
        (log.contains("services.api.hosts") && log.contains("services.api.path_prefix"))
            .then_some(())
    })
    .await;
    let mut c = client(shoal.proxy).await;
    assert_eq!(via(&mut c, "api2.localhost", "/x/1").await.1, "a");
    let (code, _, _) = via(&mut c, "api.localhost", "/x/1").await;
    assert_eq!(
        code, 404,
        "the file's host no longer routes: default is empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_one_http2_connection_reach_the_service_their_authority_names() {
    let d = Backend::start("d", Behavior::Echo).await;
    let a = Backend::start("a", Behavior::Echo).await;
    let rest = [
        backends_toml(&[&d]),
        service_toml(
            "api",
            "hosts = [\"api.localhost\"]\npath_prefix = \"/api/\"\nstrip_prefix = true",
            &[&a],
        ),
    ]
    .concat();
    let shoal = Shoal::start("", &rest).await;
    let mut h2 = common::dataplane::h2c_client(shoal.proxy).await;
    let port = shoal.proxy.port();
    for (authority, path, want, seen) in [
        ("api.localhost", "/api/users", "a", "/users"),
        ("other.localhost", "/api/users", "d", "/api/users"),
        ("api.localhost", "/", "d", "/"),
        ("API.LOCALHOST", "/api/", "a", "/"),
    ] {
        let resp = h2
            .send_request(
                http::Request::get(format!("http://{authority}:{port}{path}"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["name"].as_str(), v["path"].as_str()),
            (Some(want), Some(seen)),
            "{authority}{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_formed_without_services_takes_the_files_at_the_next_start_and_keeps_them() {
    let d = Backend::start("d", Behavior::Echo).await;
    let a = Backend::start("a", Behavior::Echo).await;
    let mut shoal = Shoal::start("", &backends_toml(&[&d])).await;
    let (_, list) = get_json(shoal.admin, "/services").await;
    assert_eq!(list["services"].as_array().unwrap().len(), 1);
    // The same peer, its file now with a service: the agreed state has none, so the file's go in.
    shoal.kill9();
    let text = std::fs::read_to_string(&shoal.config).unwrap();
    std::fs::write(
        &shoal.config,
        format!(
            "{text}\n{}",
            service_toml("api", "hosts = [\"api.localhost\"]", &[&a])
        ),
    )
    .unwrap();
    shoal.spawn();
    shoal.wait_ready().await;
    eventually(
        Duration::from_secs(10),
        "api seeded from the file",
        || async {
            let (_, pool) = get_json(shoal.admin, "/services/api/pool").await;
            (pool["backends"][0]["id"] == "a").then_some(())
        },
    )
    .await;
    let mut c = client(shoal.proxy).await;
    assert_eq!(via(&mut c, "api.localhost", "/").await.1, "a");
    // Once agreed, services come from the register: a restart keeps a change made through the
    // API, whatever the file says.
    let (code, _) = admin_call(
        shoal.admin,
        "PUT",
        "/services/api",
        Some(serde_json::json!({"hosts": ["api2.localhost"]})),
    )
    .await;
    assert_eq!(code, 200);
    shoal.kill9();
    shoal.spawn();
    shoal.wait_ready().await;
    let (_, list) = get_json(shoal.admin, "/services").await;
    let api = service_in(&list, "api");
    assert_eq!(
        api["hosts"],
        serde_json::json!(["api2.localhost"]),
        "{list}"
    );
    let mut c = client(shoal.proxy).await;
    assert_eq!(via(&mut c, "api2.localhost", "/").await.1, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_own_hashing_sends_each_key_to_one_backend_on_every_peer() {
    let d = Backend::start("d", Behavior::Echo).await;
    let bs = [
        Backend::start("h1", Behavior::Echo).await,
        Backend::start("h2", Behavior::Echo).await,
        Backend::start("h3", Behavior::Echo).await,
    ];
    let config = [
        backends_toml(&[&d]),
        service_toml(
            "api",
            "hosts = [\"api.localhost\"]\n[services.balance]\nalgorithm = \"consistent_hash\"\nhash_key = \"header:x-user\"",
            &[&bs[0], &bs[1], &bs[2]],
        ),
    ]
    .concat();
    let nodes = start_cluster(3, |_| String::new(), |_| config.clone()).await;
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..30 {
        let mut chosen = Vec::new();
        for n in &nodes {
            let req = http::Request::get("/")
                .header(http::header::HOST, "api.localhost")
                .header("x-user", format!("user-{user}"))
                .body(empty())
                .unwrap();
            let r = send(n.proxy, req).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            chosen.push(v["name"].as_str().unwrap().to_string());
        }
        assert!(
            chosen.iter().all(|c| *c == chosen[0]),
            "user-{user}: {chosen:?}"
        );
        seen.insert(chosen[0].clone());
    }
    // Hashing spread the keys over the service's backends (round robin on default is untouched).
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.starts_with('h')), "{seen:?}");
    let (_, list) = get_json(nodes[0].admin, "/services").await;
    let api = service_in(&list, "api");
    assert_eq!(api["balance"]["algorithm"], "consistent_hash");
    let default = service_in(&list, "default");
    assert_eq!(default["balance"]["algorithm"], "round_robin");
}

/// Routing and stripping change the target only: a chunked body reaches the service's backend
/// framed as the proxy decided, and ambiguous framing sent to a service's host is refused before
/// any backend (the same 400 as for `default`), as is a 404's unread body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_to_a_service_leaves_framing_as_decided_once() {
    let a = Backend::start("a", Behavior::Echo).await;
    let rest = service_toml(
        "api",
        "hosts = [\"api.localhost\"]\npath_prefix = \"/v1/\"\nstrip_prefix = true",
        &[&a],
    );
    let shoal = Shoal::start("", &rest).await;
    let wait = Duration::from_secs(2);
    let chunked = b"POST /v1/up?x=1 HTTP/1.1\r\nHost: api.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let answer = raw(shoal.proxy, chunked, wait).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (v["path"].as_str(), v["query"].as_str()),
        (Some("/up"), Some("x=1"))
    );
    assert_eq!(v["body_len"], 5);
    assert_eq!(v["headers"]["transfer-encoding"], "chunked", "{v}");
    assert!(v["headers"]["content-length"].is_null(), "{v}");
    assert_eq!(a.hits(), 1);
    for bad in [
        &b"POST /v1/x HTTP/1.1\r\nHost: api.localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST /v1/x HTTP/1.1\r\nHost: api.localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET /v1/x HTTP/1.1\r\nHost: api.localhost\r\nHost: other\r\n\r\n",
    ] {
        let answer = raw(shoal.proxy, bad, wait).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    // Routed nowhere (default is empty) with a body: 404, and the connection closes rather
    // than read the body as a next request.
    let smuggle = b"POST /x HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 43\r\n\r\nGET /v1/s HTTP/1.1\r\nHost: api.localhost\r\n\r\n";
    let answer = raw(shoal.proxy, smuggle, wait).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert_eq!(a.hits(), 1, "nothing more reached the backend");
}
