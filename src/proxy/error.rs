//! The one place proxy errors become HTTP statuses.

use http::{header, HeaderValue, Response, StatusCode};

use super::response::ResponseBody;

/// Why a request was answered by the proxy itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no usable backend")]
    NoBackend,
    #[error("could not connect to a backend")]
    Connect,
    #[error("backend closed the connection before answering")]
    Reset,
    #[error("backend did not answer in time")]
    Timeout,
    #[error("both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    #[error("{0}")]
    BadRequest(&'static str),
    /// The client's request body broke off or was malformed (bad chunking, the client gone):
    /// the client's error, never counted against the backend.
    #[error("bad or incomplete request body")]
    ClientBody,
    #[error("transfer coding not implemented (only chunked is)")]
    UnknownCoding,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An HTTP/1 backend's answer could not be passed on (ambiguous framing, an unsolicited 101).
    #[error("backend sent a malformed answer: {0}")]
    BadResponse(&'static str),
    /// No service takes the request's host and path, and `default` has no backends.
    #[error("no service for host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect | ProxyError::Reset | ProxyError::BadResponse(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::AmbiguousFraming | ProxyError::BadRequest(_) | ProxyError::ClientBody => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
        }
    }

    /// A short text response; client errors also close the connection.
    pub fn response(&self) -> Response<ResponseBody> {
        let status = self.status();
        let text = format!(
            "{} {}: {self}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        let mut resp = Response::new(ResponseBody::full(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),
            );
        }
        // A client error, or a request whose body the proxy did not read: the connection ends.
        if status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_status() {
        let cases = [
            (ProxyError::NoBackend, 503),
            (ProxyError::Connect, 502),
            (ProxyError::Reset, 502),
            (ProxyError::Timeout, 504),
            (ProxyError::AmbiguousFraming, 400),
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::ClientBody, 400),
            (ProxyError::UnknownCoding, 501),
            (ProxyError::MethodNotAllowed, 405),
            (ProxyError::BadResponse("x"), 502),
            (
                ProxyError::NoRoute {
                    host: "h".into(),
                    path: "/p".into(),
                },
                404,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e:?}");
            let r = e.response();
            assert_eq!(r.status().as_u16(), code);
            assert_eq!(
                r.headers().get(header::CONNECTION).is_some(),
                matches!(code, 400 | 404 | 405 | 501)
            );
        }
    }
}
