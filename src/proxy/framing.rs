//! Message framing (RFC 9112 §6): the one place that decides how long a request's or a
//! response's body is, from the fields that came with its head.
//!
//! A head's framing fields are collected as it is read (`Framing::field`); `Framing::request`
//! and `Framing::response` then decide the body's length, or refuse the message. Nothing else
//! decides it: a received `Content-Length` or `Transfer-Encoding` is never passed on as it came,
//! the proxy writes the framing of what it forwards from this decision alone, so no field named
//! in `Connection`, no trailer field and no coding can change it.
//!
//! The rules, stricter than RFC 9112 allows a recipient to be (as nginx and HAProxy are), so that
//! no two readers of the same bytes can disagree about where a message ends:
//! - a request's framing is exactly one `Content-Length` of one decimal number, or exactly one
//!   `Transfer-Encoding: chunked` (HTTP/1.1 only), or neither (no body); both, a list, a repeat,
//!   a sign or anything else is 400; a coding other than chunked is 501;
//! - a response's framing follows the same rules (anything else is 502 and the connection
//!   closes); a response with neither is read to the close; a response to HEAD, a 204 and a 304
//!   have no body whatever they say; a 101 is only taken when the request asked to upgrade.

/// How long a message's body is, as decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// This many bytes (0: no body).
    Length(u64),
    /// Chunked (RFC 9112 §7.1).
    Chunked,
    /// Until the connection closes (a response with neither field).
    ToClose,
}

/// What a head's framing fields said, gathered field by field.
#[derive(Debug, Default, Clone)]
pub struct Framing {
    /// `Content-Length` fields seen.
    length_fields: u32,
    /// The value of the only `Content-Length` field, when it is one decimal number.
    length: Option<u64>,
    /// A `Content-Length` value that is not one decimal number (a list, a sign, junk, overflow).
    bad_length: bool,
    /// `Transfer-Encoding` fields seen.
    coding_fields: u32,
    /// Every coding listed is a well-formed token, the list has no empty element.
    codings_well_formed: bool,
    /// Codings listed, over every field, and how many of them are `chunked`.
    codings: u32,
    chunked: u32,
    /// The last coding listed is `chunked`.
    chunked_last: bool,
    /// `Connection` tokens.
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
}

/// Why a request's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400, with the reason.
    Bad(&'static str),
    /// 400: both Content-Length and Transfer-Encoding.
    Ambiguous,
    /// 501: a transfer coding the proxy does not implement.
    Coding,
}

/// How a response's body is read and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    /// How the body is read from the backend.
    pub body: BodyLength,
    /// The length a bodiless answer announces (HEAD, 304): the client's `Content-Length`.
    pub announced: Option<u64>,
    /// The connection may carry another exchange once the body ends where it should.
    pub reusable: bool,
}

/// What the request asked that decides its answer's framing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    pub head: bool,
    /// `Connection: upgrade` with an `Upgrade` field.
    pub upgrade: bool,
}

impl Framing {
    /// Take in one field of the head (name as received, any case).
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_length(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.connection(value);
        }
    }

    fn content_length(&mut self, value: &[u8]) {
        self.length_fields += 1;
        let v = value.trim_ascii();
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            self.bad_length = true;
            return;
        }
        self.length = Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        if self.coding_fields == 0 {
            self.codings_well_formed = true;
        }
        self.coding_fields += 1;
        for coding in value.split(|b| *b == b',') {
            // A coding's parameters (`gzip;q=1`) do not make it chunked.
            let coding = coding.trim_ascii();
            if coding.is_empty() || !coding.iter().all(|b| is_tchar(*b)) {
                self.codings_well_formed = false;
            }
            self.codings += 1;
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            self.chunked += u32::from(chunked);
            self.chunked_last = chunked;
        }
    }

    /// A `Connection` value's tokens; true when one names a field to drop (not close,
    /// keep-alive or upgrade).
    pub fn connection(&mut self, value: &[u8]) -> bool {
        let mut names = false;
        for token in value.split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if !token.is_empty() {
                names = true;
            }
        }
        names
    }

    /// A Transfer-Encoding field is there.
    pub fn transfer_coded(&self) -> bool {
        self.coding_fields > 0
    }

    /// Exactly one `Transfer-Encoding: chunked`.
    fn only_chunked(&self) -> bool {
        self.coding_fields == 1
            && self.codings == 1
            && self.chunked == 1
            && self.codings_well_formed
    }

    /// The length the fields announce: exactly one valid Content-Length, else none (an HTTP/2
    /// backend's HEAD or 304 answer, whose length the client is told).
    pub fn announced_length(&self) -> Option<u64> {
        self.one_length().ok().flatten()
    }

    /// The one valid Content-Length, if there is exactly that.
    fn one_length(&self) -> Result<Option<u64>, &'static str> {
        match self.length_fields {
            0 => Ok(None),
            1 if !self.bad_length => Ok(self.length),
            1 => Err("bad Content-Length"),
            _ => Err("more than one Content-Length"),
        }
    }

    /// Whether a Transfer-Encoding refused by `only_chunked` names codings Shoal does not
    /// implement (501) rather than being malformed (400).
    fn unknown_coding(&self) -> bool {
        self.codings_well_formed && self.chunked == 0
            || (self.codings_well_formed && self.chunked == 1 && self.chunked_last)
    }

    /// A request's body length (RFC 9112 §6.3), or why it is refused.
    pub fn request(&self, http10: bool) -> Result<BodyLength, Refusal> {
        if self.transfer_coded() {
            if self.length_fields > 0 {
                return Err(Refusal::Ambiguous);
            }
            if http10 {
                return Err(Refusal::Bad("Transfer-Encoding in HTTP/1.0"));
            }
            if self.only_chunked() {
                return Ok(BodyLength::Chunked);
            }
            if self.unknown_coding() {
                return Err(Refusal::Coding);
            }
            return Err(Refusal::Bad("Transfer-Encoding is not exactly chunked"));
        }
        match self.one_length() {
            Ok(n) => Ok(BodyLength::Length(n.unwrap_or(0))),
            Err(why) => Err(Refusal::Bad(why)),
        }
    }

    /// A response's body length (RFC 9112 §6.3) and whether its connection may be reused, or
    /// why the answer cannot be passed on (a 502; its connection is closed).
    pub fn response(
        &self,
        status: u16,
        http10: bool,
        asked: Asked,
    ) -> Result<ResponseFraming, &'static str> {
        if status == 101 && !asked.upgrade {
            return Err("101 to a request that asked for no upgrade");
        }
        let coded = self.transfer_coded();
        if coded && self.length_fields > 0 {
            return Err("both Content-Length and Transfer-Encoding");
        }
        if coded && (http10 || !self.only_chunked()) {
            return Err("Transfer-Encoding is not exactly chunked");
        }
        let length = self.one_length()?;
        let persistent = !self.close && (!http10 || self.keep_alive);
        let bodiless = asked.head || (100..200).contains(&status) || status == 204 || status == 304;
        if bodiless {
            return Ok(ResponseFraming {
                body: BodyLength::Length(0),
                // A 204 has no content, nor a length to announce (RFC 9110 §8.6).
                announced: length.filter(|_| status != 204),
                reusable: persistent && status != 101,
            });
        }
        let (body, reusable) = match (coded, length) {
            (true, _) => (BodyLength::Chunked, persistent),
            (false, Some(n)) => (BodyLength::Length(n), persistent),
            // Neither: the body runs to the close (RFC 9112 §6.3 rule 8).
            (false, None) => (BodyLength::ToClose, false),
        };
        Ok(ResponseFraming {
            body,
            announced: None,
            reusable,
        })
    }
}

/// RFC 9110 §5.6.2 token characters.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Fields that never travel in a trailer section (RFC 9110 §6.5.1): framing, routing,
/// hop-by-hop, authentication, cookies and content metadata. A trailer carrying one is dropped
/// from what is passed on; the rest (checksums, gRPC's status) go on.
pub fn forbidden_in_trailers(name: &[u8]) -> bool {
    const NAMES: &[&[u8]] = &[
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"max-forwards",
        b"authorization",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"www-authenticate",
        b"cookie",
        b"set-cookie",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"cache-control",
        b"range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"location",
        b"retry-after",
        b"date",
        b"age",
        b"vary",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields<'a> = &'a [(&'a str, &'a str)];
    type RequestCase<'a> = (Fields<'a>, bool, Result<BodyLength, Refusal>);
    type ResponseCase<'a> = (
        Fields<'a>,
        u16,
        bool,
        Asked,
        Result<ResponseFraming, &'a str>,
    );

    fn framing(fields: &[(&str, &str)]) -> Framing {
        let mut f = Framing::default();
        for (n, v) in fields {
            f.field(n.as_bytes(), v.as_bytes());
        }
        f
    }

    #[test]
    fn request_framing_table() {
        use Refusal::*;
        let len = |n| Ok(BodyLength::Length(n));
        let chunked = Ok(BodyLength::Chunked);
        #[rustfmt::skip]
        let cases: &[RequestCase] = &[
            (&[], false, len(0)),
            (&[("Content-Length", "0")], false, len(0)),
            (&[("Content-Length", "42")], false, len(42)),
            (&[("content-length", " 7 ")], false, len(7)),
            (&[("Content-Length", "007")], false, len(7)),
            (&[("Content-Length", "18446744073709551615")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "9999999999999999999")], false, len(9999999999999999999)),
            (&[("Content-Length", "5, 5")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "5,")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "5"), ("Content-Length", "5")], false, Err(Bad("more than one Content-Length"))),
            (&[("Content-Length", "5"), ("Content-Length", "6")], false, Err(Bad("more than one Content-Length"))),
            (&[("Content-Length", "+5")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "-1")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "0x10")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "1 2")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "")], false, Err(Bad("bad Content-Length"))),
            (&[("Content-Length", "1e3")], false, Err(Bad("bad Content-Length"))),
            (&[("Transfer-Encoding", "chunked")], false, chunked),
            (&[("Transfer-Encoding", "Chunked")], false, chunked),
            (&[("transfer-encoding", " CHUNKED ")], false, chunked),
            (&[("Transfer-Encoding", "chunked")], true, Err(Bad("Transfer-Encoding in HTTP/1.0"))),
            (&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")], false, Err(Ambiguous)),
            (&[("Content-Length", "3"), ("Transfer-Encoding", "chunked")], false, Err(Ambiguous)),
            (&[("Content-Length", "3"), ("Transfer-Encoding", "identity")], false, Err(Ambiguous)),
            (&[("Transfer-Encoding", "gzip")], false, Err(Coding)),
            (&[("Transfer-Encoding", "identity")], false, Err(Coding)),
            (&[("Transfer-Encoding", "gzip, chunked")], false, Err(Coding)),
            (&[("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], false, Err(Coding)),
            (&[("Transfer-Encoding", "chunked, gzip")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "chunked, chunked")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", ", chunked")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "chunked,")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "xchunked")], false, Err(Coding)),
            (&[("Transfer-Encoding", "chunked;q=1")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "\"chunked\"")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            (&[("Transfer-Encoding", "chun ked")], false, Err(Bad("Transfer-Encoding is not exactly chunked"))),
            // A Connection field naming the framing fields changes nothing.
            (&[("Connection", "Content-Length"), ("Content-Length", "40")], false, len(40)),
            (&[("Connection", "Transfer-Encoding"), ("Transfer-Encoding", "chunked")], false, chunked),
            (&[("Connection", "close, Content-Length, Transfer-Encoding"), ("Content-Length", "4")], false, len(4)),
        ];
        for (fields, http10, want) in cases {
            assert_eq!(
                framing(fields).request(*http10),
                *want,
                "{fields:?} http10={http10}"
            );
        }
    }

    #[test]
    fn response_framing_table() {
        let get = Asked::default();
        let head = Asked {
            head: true,
            upgrade: false,
        };
        let upgrade = Asked {
            head: false,
            upgrade: true,
        };
        let ok = |body, announced, reusable| {
            Ok(ResponseFraming {
                body,
                announced,
                reusable,
            })
        };
        let chunked = BodyLength::Chunked;
        #[rustfmt::skip]
        let cases: &[ResponseCase] = &[
            (&[("Content-Length", "5")], 200, false, get, ok(BodyLength::Length(5), None, true)),
            (&[("Transfer-Encoding", "chunked")], 200, false, get, ok(chunked, None, true)),
            (&[], 200, false, get, ok(BodyLength::ToClose, None, false)),
            (&[("Connection", "close"), ("Content-Length", "5")], 200, false, get, ok(BodyLength::Length(5), None, false)),
            (&[("Connection", "Content-Length"), ("Content-Length", "5")], 200, false, get, ok(BodyLength::Length(5), None, true)),
            (&[("Content-Length", "5")], 200, true, get, ok(BodyLength::Length(5), None, false)),
            (&[("Connection", "keep-alive"), ("Content-Length", "5")], 200, true, get, ok(BodyLength::Length(5), None, true)),
            (&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 200, false, get, Err("both Content-Length and Transfer-Encoding")),
            (&[("Content-Length", "5, 5")], 200, false, get, Err("bad Content-Length")),
            (&[("Content-Length", "5"), ("Content-Length", "5")], 200, false, get, Err("more than one Content-Length")),
            (&[("Transfer-Encoding", "gzip, chunked")], 200, false, get, Err("Transfer-Encoding is not exactly chunked")),
            (&[("Transfer-Encoding", "gzip")], 200, false, get, Err("Transfer-Encoding is not exactly chunked")),
            (&[("Transfer-Encoding", "chunked")], 200, true, get, Err("Transfer-Encoding is not exactly chunked")),
            (&[("Content-Length", "1000")], 200, false, head, ok(BodyLength::Length(0), Some(1000), true)),
            (&[("Transfer-Encoding", "chunked")], 200, false, head, ok(BodyLength::Length(0), None, true)),
            (&[("Content-Length", "10")], 304, false, get, ok(BodyLength::Length(0), Some(10), true)),
            (&[("Content-Length", "10")], 204, false, get, ok(BodyLength::Length(0), None, true)),
            (&[], 204, false, get, ok(BodyLength::Length(0), None, true)),
            (&[("Content-Length", "x")], 304, false, get, Err("bad Content-Length")),
            (&[], 101, false, get, Err("101 to a request that asked for no upgrade")),
            (&[], 101, false, upgrade, ok(BodyLength::Length(0), None, false)),
            (&[("Content-Length", "2")], 200, false, upgrade, ok(BodyLength::Length(2), None, true)),
            (&[], 103, false, get, ok(BodyLength::Length(0), None, true)),
        ];
        for (fields, status, http10, asked, want) in cases {
            assert_eq!(
                framing(fields).response(*status, *http10, *asked),
                *want,
                "{fields:?} {status} http10={http10} {asked:?}"
            );
        }
    }

    #[test]
    fn an_announced_length_is_exactly_one_valid_content_length() {
        #[rustfmt::skip]
        let cases: &[(Fields, Option<u64>)] = &[
            (&[("content-length", "1000")], Some(1000)),
            (&[], None),
            (&[("content-length", "5, 5")], None),
            (&[("content-length", "5"), ("content-length", "5")], None),
            (&[("content-length", "+5")], None),
        ];
        for (fields, want) in cases {
            assert_eq!(framing(fields).announced_length(), *want, "{fields:?}");
        }
    }

    #[test]
    fn trailers_never_carry_framing_or_routing() {
        for name in [
            "Content-Length",
            "transfer-encoding",
            "Host",
            "Connection",
            "Set-Cookie",
        ] {
            assert!(forbidden_in_trailers(name.as_bytes()), "{name}");
        }
        for name in ["grpc-status", "x-checksum", "server-timing"] {
            assert!(!forbidden_in_trailers(name.as_bytes()), "{name}");
        }
    }
}
