//! Shoal's own HTTP/1.1 ends, tried from outside: every framing a backend may send, what the
//! server answers to what clients send, and hop-by-hop fields.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::dataplane::*;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The upstream HTTP/1.1 client against a backend's raw bytes: chunked answers (with
/// extensions and trailers), interim 1xx answers skipped, bodies read to the close, Content-Length
/// beside Transfer-Encoding (body by chunks, connection not reused), HEAD answers without a body
/// (connection reused), conflicting lengths and an endless head refused with 502, bytes behind a
/// 101 passed into the tunnel, request bodies without a length sent chunked, and an answer that
/// comes before the request body was taken passed on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_client_reads_every_framing_a_backend_may_send() {
    let huge = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (addr, accepted) = scripted_backend(vec![
        ("/chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n".to_vec(), false),
        ("/interim", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone".to_vec(), false),
        ("/to-end", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close".to_vec(), true),
        ("/both", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(), false),
        ("/head", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec(), false),
        ("/plain", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        ("/conflict", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(), true),
        ("/huge", huge.into_bytes(), true),
        ("/switch", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\nEARLY".to_vec(), false),
    ])
    .await;
    let s = Shoal::start(
        "retries = 0\nworkers = 1",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let get = |path: &str| {
        send(
            s.proxy,
            request("GET", s.proxy, path).body(empty()).unwrap(),
        )
    };

    let r = get("/chunked").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), &r.body()[..]),
        (200, &b"hello world"[..])
    );
    assert_eq!(r.headers()["content-type"], "text/plain");
    // Trailers reach a client that takes them (an HTTP/2 one here).
    let resp = h2c_get(s.proxy, "/chunked").await;
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
    assert_eq!(&collected.to_bytes()[..], b"hello world");

    let r = get("/interim").await.unwrap();
    assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"done"[..]));

    let r = get("/to-end").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), &r.body()[..]),
        (200, &b"until the close"[..])
    );

    // Both Content-Length and Transfer-Encoding: ambiguous (SPEC: 502), and that connection is
    // not used again.
    let before = accepted.load(Ordering::SeqCst);
    let r = get("/both").await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let r = get("/plain").await.unwrap();
    assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"ok"[..]));
    // Two new connections: the one before ended with `/to-end`, and `/both` left its own.
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before + 2,
        "a connection that carried both lengths was reused"
    );

    // HEAD: the length is the GET's, no body follows, and the connection carries on.
    let before = accepted.load(Ordering::SeqCst);
    let r = send(
        s.proxy,
        request("HEAD", s.proxy, "/head").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    assert!(r.body().is_empty());
    let r = get("/plain").await.unwrap();
    assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"ok"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "the HEAD's connection was not reused"
    );

    // An upgrade: what the backend sent right behind its 101 reaches the client first.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(
        b"GET /switch HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"EARLY") {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
            .await
            .expect("the 101 and the early bytes")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    c.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    drop(c);

    for bad in ["/conflict", "/huge"] {
        let r = get(bad).await.unwrap();
        assert_eq!(r.status(), 502, "{bad}");
    }

    // A body without a length (an HTTP/2 client's) goes out chunked; one with a length as is.
    let (mut tx, rx) = http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(4);
    let sending = tokio::spawn(async move {
        tx.send_data(bytes::Bytes::from_static(b"abc"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_data(bytes::Bytes::from_static(b"defg"))
            .await
            .unwrap();
    });
    let mut h2 = h2c_client(s.proxy).await;
    let resp = h2
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri(format!("http://{}/upload", s.proxy))
                .body(rx.boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    sending.await.unwrap();
    let head = resp.headers()["x-request-head"]
        .to_str()
        .unwrap()
        .to_string();
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        head.contains("transfer-encoding: chunked") && !head.contains("content-length"),
        "{head}"
    );
    assert_eq!(&raw[..], b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n");
    let r = send(
        s.proxy,
        request("POST", s.proxy, "/upload")
            .body(full("field=1"))
            .unwrap(),
    )
    .await
    .unwrap();
    let head = r.headers()["x-request-head"].to_str().unwrap().to_string();
    assert!(
        head.contains("content-length: 7") && !head.contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(&r.body()[..], b"field=1");

    // An answer before the body is taken ends the upload: the client gets the 413 (not a 504
    // after the request timeout, with 16 MiB stuck behind full socket buffers).
    let (mut tx, rx) = http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(4);
    tokio::spawn(async move {
        for _ in 0..256 {
            if tx
                .send_data(bytes::Bytes::from(vec![b'x'; 64 * 1024]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let resp = tokio::time::timeout(
        Duration::from_secs(4),
        h2.send_request(
            http::Request::builder()
                .method("POST")
                .uri(format!("http://{}/reject", s.proxy))
                .body(rx.boxed())
                .unwrap(),
        ),
    )
    .await
    .expect("the backend's early answer")
    .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"too long"
    );
}

/// Read one answer (head and a Content-Length or chunked body) off a raw connection.
async fn read_answer(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    read_answer_to(s, buf, false).await
}

/// `read_answer`, for the answer to a HEAD when `head` (no body, whatever the fields say).
async fn read_answer_to(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head_req: bool,
) -> (String, Vec<u8>) {
    let deadline = Duration::from_secs(5);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let lower = head.to_ascii_lowercase();
            let rest = buf[end + 4..].to_vec();
            let head_only = head.starts_with("HTTP/1.1 100") || head_req;
            if head_only {
                *buf = rest;
                return (head, Vec::new());
            }
            if let Some(n) = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                if rest.len() >= n {
                    *buf = rest[n..].to_vec();
                    return (head, rest[..n].to_vec());
                }
            } else if lower.contains("transfer-encoding: chunked") {
                if let Some((used, data)) = dechunk(&rest) {
                    *buf = rest[used..].to_vec();
                    return (head, data);
                }
            } else {
                *buf = rest;
                return (head, Vec::new());
            }
        }
        let n = tokio::time::timeout(deadline, s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed early; had {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A whole chunked body at the start of `b`: bytes used (trailers included) and the data.
fn dechunk(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let eol = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[at..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at = eol + 2;
        if size == 0 {
            let end = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
            if end == at {
                return Some((at + 2, data));
            }
            // Trailer fields, then an empty line.
            let end = at + b[at..].windows(4).position(|w| w == b"\r\n\r\n")?;
            return Some((end + 4, data));
        }
        if b.len() < at + size + 2 {
            return None;
        }
        data.extend_from_slice(&b[at..at + size]);
        at += size + 2;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_server_answers_what_clients_send() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let m = Backend::start("m1", Behavior::Mirror).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let sm = Shoal::start("", &backends_toml(&[&m])).await;
    let json = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).unwrap() };

    // Pipelined: three requests in one write, three answers in order on one connection, each
    // with a Date.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nHEAD /3 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    for path in ["/1", "/2"] {
        let (head, body) = read_answer(&mut c, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
        assert_eq!(json(&body)["path"], path);
    }
    // HEAD: the length a GET would get, and no body (the next answer starts right after).
    let (head, _) = read_answer_to(&mut c, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.write_all(b"GET /4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert!(buf.is_empty(), "bytes after a HEAD answer: {buf:?}");
    assert_eq!(json(&body)["path"], "/4");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the connection closes after Connection: close");

    // HTTP/1.0: kept alive only when asked, and told so.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..2 {
        c.write_all(
            format!("GET /old{i} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let (head, body) = read_answer(&mut c, &mut buf).await;
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
        assert_eq!(json(&body)["path"], format!("/old{i}"));
    }
    let got = raw(
        s.proxy,
        b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );

    // A chunked upload with a trailer and an Expect: 100-continue upload, mirrored back.
    let mut c = tokio::net::TcpStream::connect(sm.proxy).await.unwrap();
    let mut buf = Vec::new();
    c.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 1\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"hello world");
    c.write_all(
        b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    c.write_all(b"data").await.unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"data");

    // A body whose bytes look like a smuggled head is a body: the request after it is the next
    // one, answered in turn.
    let body = "a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    c.write_all(
        format!(
            "POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (head, echoed) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(echoed, body.as_bytes());
    let (head, _) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Refused before any backend: a coding that is not chunked (501), and one in HTTP/1.0.
    let before = a.hits();
    for (bad, want) in [
        (
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            "HTTP/1.1 501",
        ),
        (
            b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ] {
        let got = raw(s.proxy, bad, Duration::from_secs(3)).await;
        assert!(got.starts_with(want), "{bad:?}: {got}");
    }
    assert_eq!(a.hits(), before);
}

/// A backend's answer goes to the client without its hop-by-hop fields (RFC 9110 §7.6.1):
/// Connection and the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade (not
/// a 101), Transfer-Encoding (the client's own framing is used); every other field goes on with
/// its value and repeats. The same for an HTTP/1.1 client (the fields are written as they came)
/// and an HTTP/2 one (they are made into a map).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_hop_by_hop_fields_never_reach_the_client() {
    let (addr, _) = scripted_backend(vec![
        ("/hop", b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTrailer: x-sum\r\nTE: trailers\r\nX-Kept: one\r\nSet-Cookie: a=1\r\nx-kept: two\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        ("/coded", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: three\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(), true),
    ])
    .await;
    let s = Shoal::start(
        "retries = 0",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let gone = [
        "connection",
        "x-internal",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "trailer",
        "te",
        "transfer-encoding",
    ];

    // HTTP/1.1, read off the socket as it comes.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let mut buf = Vec::new();
    c.write_all(b"GET /hop HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert_eq!(body, b"ok", "{head}");
    let lines: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    for name in gone {
        assert!(
            lines.iter().all(|(n, _)| n != name),
            "{name} reached the client:\n{head}"
        );
    }
    let values = |name: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(values("x-kept"), ["one", "two"], "{head}");
    assert_eq!(values("set-cookie"), ["a=1", "b=2"], "{head}");
    assert_eq!(values("content-length"), ["2"], "{head}");
    // The connection is kept (the backend's Connection said nothing to the client).
    c.write_all(b"GET /coded HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert_eq!(body, b"abc", "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-kept: three"), "{head}");

    // HTTP/2: the same fields, none of the hop-by-hop ones (which HTTP/2 forbids).
    let resp = h2c_get(s.proxy, "/hop").await;
    assert_eq!(resp.status(), 200);
    for name in gone {
        assert!(
            !resp.headers().contains_key(name),
            "{name} reached the HTTP/2 client: {:?}",
            resp.headers()
        );
    }
    let all = |name: &str| -> Vec<&str> {
        resp.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-kept"), ["one", "two"]);
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}

/// A raw HTTP/1.1 backend that answers each request with the bytes scripted for its path (and
/// closes after the answers marked so); `/upload` answers with the request's raw body. Counts
/// the connections it accepted.
async fn scripted_backend(
    script: Vec<(&'static str, Vec<u8>, bool)>,
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match c.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    if head.starts_with("post /reject ") {
                        // Refuse the upload at once, read none of it, and hold the connection.
                        let answer =
                            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo long";
                        let _ = c.write_all(answer).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let len: Option<usize> = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap());
                    let chunked = head.contains("transfer-encoding: chunked");
                    // The body: by length, or up to the last chunk (no trailers sent here).
                    let body_end = loop {
                        let rest = &buf[end + 4..];
                        if let Some(n) = len {
                            if rest.len() >= n {
                                break end + 4 + n;
                            }
                        } else if !chunked {
                            break end + 4;
                        } else if let Some(p) = rest.windows(5).position(|w| w == b"0\r\n\r\n") {
                            break end + 4 + p + 5;
                        }
                        match c.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let body: Vec<u8> = buf[end + 4..body_end].to_vec();
                    buf.drain(..body_end);
                    let (answer, close) = if path == "/upload" {
                        let mut a = format!(
                            "HTTP/1.1 200 OK\r\nX-Request-Head: {}\r\nContent-Length: {}\r\n\r\n",
                            head.lines().skip(1).collect::<Vec<_>>().join("|"),
                            body.len()
                        )
                        .into_bytes();
                        a.extend_from_slice(&body);
                        (a, false)
                    } else {
                        match script.iter().find(|(p, _, _)| *p == path) {
                            Some((_, a, close)) => (a.clone(), *close),
                            None => (
                                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                                false,
                            ),
                        }
                    };
                    if c.write_all(&answer).await.is_err() || close {
                        return;
                    }
                    if answer.starts_with(b"HTTP/1.1 101") {
                        // Switched: echo whatever comes.
                        let (mut r, mut w) = c.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}
