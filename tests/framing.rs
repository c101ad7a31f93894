//! Framing end to end (SPEC section 5, "Framing is decided once"): raw requests through a
//! running peer to a raw recording backend, which parses what reaches it strictly and records
//! every request (and any bytes it cannot parse). The backend must see exactly the requests the
//! proxy counted, each with the body its framing gave it; nothing a client hides in a body or a
//! field reaches it as a request; an answer's framing reaches the client from the proxy's own
//! decision; a client's broken body never counts against a backend.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What reached the recording backend.
#[derive(Debug, Clone)]
enum Seen {
    Request {
        method: String,
        path: String,
        /// The head's field lines, lowercased.
        head: String,
        body: Vec<u8>,
    },
    /// Bytes that are not a well-framed request (a smuggled fragment would land here).
    Garbage(String),
    /// A request whose head came whole and whose body did not before the proxy closed the
    /// connection (a client's body that broke off after its head went).
    Cut(String),
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A request read strictly: its method, path, lowercased head and body; None when more bytes
/// are needed; Err for anything not well framed.
#[allow(clippy::type_complexity)]
fn read_request(buf: &[u8]) -> Result<Option<(usize, String, String, String, Vec<u8>)>, String> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("{e}")),
    };
    let mut head = String::new();
    let (mut length, mut chunked) = (None, false);
    for f in req.headers.iter() {
        let v = String::from_utf8_lossy(f.value).to_string();
        head.push_str(&format!("{}: {}\n", f.name.to_ascii_lowercase(), v));
        if f.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err("two Content-Length".into());
            }
            length = Some(v.parse::<usize>().map_err(|_| "bad Content-Length")?);
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            if v != "chunked" || chunked {
                return Err(format!("Transfer-Encoding {v:?}"));
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err("both framings".into());
    }
    let (method, path) = (
        req.method.unwrap_or("").to_string(),
        req.path.unwrap_or("").to_string(),
    );
    let rest = &buf[n..];
    if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let line = std::str::from_utf8(&rest[at..at + eol]).map_err(|_| "size line")?;
            let size = usize::from_str_radix(line, 16).map_err(|_| format!("size {line:?}"))?;
            at += eol + 2;
            if size == 0 {
                // No trailers expected from the proxy in these cases; accept a field or two.
                loop {
                    let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") else {
                        return Ok(None);
                    };
                    at += eol + 2;
                    if eol == 0 {
                        return Ok(Some((n + at, method, path, head, body)));
                    }
                }
            }
            if rest.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&rest[at..at + size]);
            if &rest[at + size..at + size + 2] != b"\r\n" {
                return Err("chunk end".into());
            }
            at += size + 2;
        }
    }
    let len = length.unwrap_or(0);
    if rest.len() < len {
        return Ok(None);
    }
    Ok(Some((n + len, method, path, head, rest[..len].to_vec())))
}

/// The answer the recording backend gives to `path`: most get `200 ok` naming the path; some
/// paths script a misbehaving answer.
fn answer_for(path: &str) -> Vec<u8> {
    match path {
        "/resp/connection-named-length" => {
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello".to_vec()
        }
        "/resp/connection-named-coding" => {
            b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
        }
        "/resp/length-list" => b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec(),
        "/resp/two-lengths" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec()
        }
        "/resp/both" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
        }
        "/resp/gzip-chunked" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
        }
        "/resp/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec(),
        "/resp/unsolicited-101" => {
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n".to_vec()
        }
        "/resp/trailer-framing" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 40\r\nX-Sum: 1\r\n\r\n".to_vec()
        }
        _ => format!(
            "HTTP/1.1 200 OK\r\nx-path: {path}\r\ncontent-length: 2\r\n\r\nok"
        )
        .into_bytes(),
    }
}

async fn recording_backend() -> (SocketAddr, Log) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log: Log = Arc::default();
    let record = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let log = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    match read_request(&buf) {
                        Ok(Some((n, method, path, head, body))) => {
                            buf.drain(..n);
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                            let answer = answer_for(&path);
                            log.lock().unwrap().push(Seen::Request {
                                method,
                                path,
                                head,
                                body,
                            });
                            if s.write_all(&answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Ok(None) => {}
                        Err(why) => {
                            log.lock().unwrap().push(Seen::Garbage(format!(
                                "{why}: {:?}",
                                String::from_utf8_lossy(&buf)
                            )));
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            if !buf.is_empty() {
                                let mut fields = [httparse::EMPTY_HEADER; 64];
                                let mut req = httparse::Request::new(&mut fields);
                                let seen = match req.parse(&buf) {
                                    Ok(httparse::Status::Complete(_)) => {
                                        Seen::Cut(req.path.unwrap_or("").to_string())
                                    }
                                    _ => Seen::Garbage(format!(
                                        "left at close: {:?}",
                                        String::from_utf8_lossy(&buf)
                                    )),
                                };
                                log.lock().unwrap().push(seen);
                            }
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, log)
}

/// One answer off `s` (head, then a Content-Length or chunked body, or none for a 1xx/204/304
/// or HEAD): the head and body, the rest staying in `buf`.
async fn answer(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_string();
            let lower = head.to_ascii_lowercase();
            let status: u16 = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let chunked = lower.contains("\r\ntransfer-encoding: chunked\r\n");
            let bodiless = head_only || status < 200 || status == 204 || status == 304;
            if bodiless || (!chunked && length.is_none_or(|n| buf.len() >= end + 4 + n)) {
                let n = if bodiless { 0 } else { length.unwrap_or(0) };
                let body = buf[end + 4..end + 4 + n].to_vec();
                buf.drain(..end + 4 + n);
                return Some((head, body));
            }
            if chunked {
                if let Some(n) = chunked_len(&buf[end + 4..]) {
                    let body = buf[end + 4..end + 4 + n].to_vec();
                    buf.drain(..end + 4 + n);
                    return Some((head, body));
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// The length of a whole chunked body (with its trailer section) at the front of `b`.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let line = |at: usize| {
        b[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|e| at + e)
    };
    let mut at = 0;
    loop {
        let eol = line(at)?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[at..eol]).ok()?, 16).ok()?;
        at = eol + 2;
        if size == 0 {
            loop {
                let eol = line(at)?;
                let empty = eol == at;
                at = eol + 2;
                if empty {
                    return Some(at);
                }
            }
        }
        at += size + 2;
        if at > b.len() {
            return None;
        }
    }
}

/// Send `bytes` on a new connection; the status of the first answer (0: none came).
async fn status_of(proxy: SocketAddr, bytes: &[u8]) -> u16 {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    match answer(&mut s, &mut buf, false).await {
        Some((head, _)) => head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        None => 0,
    }
}

fn requests(log: &Log) -> Vec<(String, String, String, Vec<u8>)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|s| match s {
            Seen::Request {
                method,
                path,
                head,
                body,
            } => (method.clone(), path.clone(), head.clone(), body.clone()),
            Seen::Garbage(g) => panic!("the backend got bytes that are not a request: {g}"),
            Seen::Cut(path) => (String::new(), path.clone(), String::new(), Vec::new()),
        })
        .collect()
}

/// Every case: what the client sends, the status it gets, and the body the backend gets (None:
/// nothing reaches the backend). Each forwarded case names its own path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_reaches_the_backend_exactly_as_framed() {
    let (addr, log) = recording_backend().await;
    let s = Shoal::start(
        "retries = 0",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
    #[rustfmt::skip]
    let cases: Vec<(String, u16, Option<&[u8]>)> = vec![
        // The reported smuggle: a Content-Length named in Connection still frames the body.
        (format!("POST /c1 HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()), 200, Some(smuggled.as_bytes())),
        (format!("POST /c2 HTTP/1.1\r\nHost: h\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()), 200, Some(smuggled.as_bytes())),
        (format!("POST /c3 HTTP/1.1\r\nHost: h\r\nConnection: close, Content-Length, Transfer-Encoding\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()), 200, Some(smuggled.as_bytes())),
        // CL.0: a GET with a body that looks like a request.
        (format!("GET /c4 HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()), 200, Some(smuggled.as_bytes())),
        // Plain ones.
        ("POST /c5 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello".into(), 200, Some(b"hello")),
        ("POST /c6 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nContent-Length: 9\r\nX-Sum: 1\r\n\r\n".into(), 200, Some(b"hello")),
        ("GET /c7 HTTP/1.1\r\nHost: h\r\n\r\n".into(), 200, Some(b"")),
        ("POST /c8 HTTP/1.0\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc".into(), 200, Some(b"abc")),
        // Refused before the backend.
        (format!("POST /r1 HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), 400, None),
        (format!("POST /r2 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n{smuggled}"), 400, None),
        ("POST /r3 HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello".into(), 400, None),
        ("POST /r4 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".into(), 400, None),
        ("POST /r5 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), 501, None),
        ("POST /r6 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n".into(), 400, None),
        ("POST /r7 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n".into(), 501, None),
        ("POST /r8 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".into(), 400, None),
        ("POST /r9 HTTP/1.1\r\nHost: h\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, None),
        ("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\nGET /r10 HTTP/1.1\r\nHost: h\r\n\r\n".into(), 405, None),
        ("GET /r11 HTTP/1.1\r\nHost: a b\r\n\r\n".into(), 400, None),
        ("GET /r12 HTTP/1.1\r\nHost: u@h\r\n\r\n".into(), 400, None),
        ("GET r13 HTTP/1.1\r\nHost: h\r\n\r\n".into(), 400, None),
        ("GET /r14 HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n".into(), 400, None),
        ("POST /r15 HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, None),
        ("POST /r16 HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello".into(), 400, None),
        // A head refused after a clean request on the same connection: only the first goes.
        (format!("GET /c9 HTTP/1.1\r\nHost: h\r\n\r\nPOST /r17 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), 200, Some(b"")),
        // A bad chunked body: the head went, the body broke off; the client gets 400.
        ("POST /c10 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n".into(), 400, None),
        ("POST /c11 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(), 400, None),
    ];
    for (bytes, want, _) in &cases {
        let got = status_of(s.proxy, bytes.as_bytes()).await;
        assert_eq!(got, *want, "{bytes:?}");
    }
    // What reached the backend: exactly the forwarded cases' requests, with their bodies. The
    // bad-body cases may have sent their head (the body never completed), as nginx does.
    let seen = requests(&log);
    for (bytes, _, body) in &cases {
        let path = bytes.split(' ').nth(1).unwrap();
        let got: Vec<_> = seen.iter().filter(|r| r.1 == path).collect();
        match body {
            Some(b) => {
                assert_eq!(got.len(), 1, "{path}: {got:?}");
                assert_eq!(&got[0].3[..], *b, "{path}");
            }
            None if path == "/c10" || path == "/c11" => {
                // Its head may have gone before the body broke off; never a whole request.
                assert!(got.iter().all(|r| r.0.is_empty()), "{path}: {got:?}");
            }
            None => assert!(got.is_empty(), "{path} reached the backend: {got:?}"),
        }
    }
    assert!(
        !seen
            .iter()
            .any(|r| r.1.contains("smuggled") || r.1.starts_with("/r")),
        "{seen:?}"
    );
    // Every request the backend saw is one the proxy counted.
    let m = s.metrics().await;
    let counted: f64 = ["2xx", "3xx", "4xx", "5xx"]
        .iter()
        .filter_map(|c| {
            metric(
                &m,
                &format!(
                    "shoal_requests_total{{backend=\"raw\",code=\"{c}\",service=\"default\"}}"
                ),
            )
        })
        .sum();
    // A request cut off (no method recorded) is one only /c10 or /c11 may have left.
    for r in seen.iter().filter(|r| r.0.is_empty()) {
        assert!(r.1 == "/c10" || r.1 == "/c11", "a cut request: {r:?}");
    }
    // Shoal's own health probes (`X-Shoal-Peer`) reach the backend too; they are no client's.
    let probe = format!("{}:", shoal::net::PEER_HEADER);
    let complete = seen
        .iter()
        .filter(|r| !r.0.is_empty() && !r.2.contains(&probe))
        .count();
    assert_eq!(counted as usize, complete, "{seen:?}\n{m}");
    // The forwarded framing is the proxy's own: one Content-Length of the body's length.
    let c1 = seen.iter().find(|r| r.1 == "/c1").unwrap();
    assert!(
        c1.2.contains(&format!("content-length: {}\n", smuggled.len()))
            && !c1.2.contains("connection"),
        "{}",
        c1.2
    );
    // An absolute-form target's authority replaces Host.
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"GET http://target.example/abs HTTP/1.1\r\nHost: other\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = answer(&mut c, &mut Vec::new(), false).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let abs = requests(&log).into_iter().find(|r| r.1 == "/abs").unwrap();
    assert!(
        abs.2.contains("host: target.example\n") && !abs.2.contains("host: other"),
        "{}",
        abs.2
    );
}

/// The reported cross-client attack: the hidden request's answer must never reach another
/// client. The smuggler's body is a body; a second client on another connection gets its own
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_request_never_answers_another_client() {
    let (addr, log) = recording_backend().await;
    let s = Shoal::start(
        "retries = 0\nworkers = 1",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let hidden = "GET /slow HTTP/1.1\r\nHost: h\r\n\r\n";
    for round in 0..5 {
        let mut a = TcpStream::connect(s.proxy).await.unwrap();
        a.write_all(
            format!(
                "POST /smuggler HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n{hidden}",
                hidden.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (head, _) = answer(&mut a, &mut Vec::new(), false).await.unwrap();
        assert!(head.contains("x-path: /smuggler"), "{head}");
        let mut b = TcpStream::connect(s.proxy).await.unwrap();
        b.write_all(format!("GET /victim{round} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, _) = answer(&mut b, &mut Vec::new(), false).await.unwrap();
        assert!(head.contains(&format!("x-path: /victim{round}")), "{head}");
    }
    assert!(!requests(&log).iter().any(|r| r.1 == "/slow"));
}

/// Answers: the proxy frames what it passes on by its own decision; ambiguous framing and an
/// unsolicited 101 are 502; framing fields in trailers do not pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_framed_by_the_proxys_decision() {
    let (addr, _log) = recording_backend().await;
    let s = Shoal::start(
        "retries = 0",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    let mut buf = Vec::new();
    for path in [
        "/resp/connection-named-length",
        "/resp/connection-named-coding",
        "/resp/trailer-framing",
    ] {
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = answer(&mut c, &mut buf, false)
            .await
            .unwrap_or_else(|| panic!("{path}: no whole answer"));
        let lower = head.to_ascii_lowercase();
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            lower.contains("\r\ncontent-length: 5\r\n")
                || lower.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{path}: an answer without framing reached the client:\n{head}"
        );
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("hello"), "{path}: {text:?}");
        assert!(
            !text.to_ascii_lowercase().contains("content-length"),
            "{path}: {text:?}"
        );
    }
    // The same connection still works: each answer ended where its framing said.
    c.write_all(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = answer(&mut c, &mut buf, false).await.unwrap();
    assert!(head.contains("x-path: /after"), "{head}");

    for path in [
        "/resp/length-list",
        "/resp/two-lengths",
        "/resp/both",
        "/resp/gzip-chunked",
        "/resp/unsolicited-101",
    ] {
        let got = status_of(
            s.proxy,
            format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(got, 502, "{path}");
    }
}

/// A client's broken bodies are the client's: 50 through every peer of a cluster move no
/// backend's local view, count no upstream error and cast no vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_client_bodies_never_count_against_a_backend() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let b = Backend::start("b2", Behavior::Echo).await;
    let backends = backends_toml(&[&a, &b]);
    let peers = start_cluster(
        3,
        |_| String::new(),
        |_| format!("[health]\npassive_failures = 2\ninterval = \"1h\"\n{backends}"),
    )
    .await;
    for p in &peers {
        for i in 0..50 {
            let mut c = TcpStream::connect(p.proxy).await.unwrap();
            let head =
                format!("POST /up{i} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
            if i % 2 == 0 {
                // Malformed chunking: 400.
                c.write_all(format!("{head}5\r\nhello\r\nzz\r\n").as_bytes())
                    .await
                    .unwrap();
                let (h, _) = answer(&mut c, &mut Vec::new(), false).await.unwrap();
                assert!(h.starts_with("HTTP/1.1 400"), "{h}");
            } else {
                // Gone mid-body.
                c.write_all(format!("{head}5\r\nhel").as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(c);
            }
        }
    }
    // Clean requests still go to both backends, from every peer.
    for p in &peers {
        for _ in 0..4 {
            let r = send(p.proxy, request("GET", p.proxy, "/").body(empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    for p in &peers {
        let (_, st) = get_json(p.admin, "/status").await;
        for be in st["backends"].as_array().unwrap() {
            assert_eq!(be["local"], "up", "{st}");
            assert_eq!(be["down_votes"], serde_json::json!([]), "{st}");
            assert_eq!(be["state"], "active", "{st}");
        }
        let m = p.metrics().await;
        for id in ["b1", "b2"] {
            for kind in ["connect", "timeout", "reset", "status"] {
                let series =
                    format!("shoal_upstream_errors_total{{backend=\"{id}\",kind=\"{kind}\",service=\"default\"}}");
                assert_eq!(metric(&m, &series).unwrap_or(0.0), 0.0, "{series}");
            }
        }
    }
}

/// HTTP/2 clients, the same rules: a HEAD's length is the proxy's to announce (from the answer's
/// framing decision), an answer's framing named in Connection still frames it, CONNECT is 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_the_same_framing() {
    use http_body_util::BodyExt;
    let (addr, log) = recording_backend().await;
    let s = Shoal::start(
        "retries = 0",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let tcp = TcpStream::connect(s.proxy).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = |method: &str, uri: String| {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(empty())
            .unwrap()
    };
    let r = h2
        .send_request(req("HEAD", format!("http://{}/resp/head", s.proxy)))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000", "{:?}", r.headers());
    let r = h2
        .send_request(req(
            "GET",
            format!("http://{}/resp/connection-named-length", s.proxy),
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    let r = h2
        .send_request(req("CONNECT", "elsewhere.example:443".to_string()))
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 405),
        Err(e) => panic!("CONNECT: {e}"),
    }
    assert!(!requests(&log).iter().any(|r| r.0 == "CONNECT"));
}
