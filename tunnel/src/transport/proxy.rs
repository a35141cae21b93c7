//! Reaching the server through a proxy: the client's `[client.transport.tcp] proxy`, as in
//! rathole 0.5. Every transport runs over the TCP connection this makes, so TLS, Noise and
//! WebSocket go through a proxy unchanged.
//!
//! - `http://[user:password@]host:port`: an HTTP/1.1 `CONNECT host:port` request, with
//!   `Proxy-Authorization: Basic` when credentials are given. The reply's header is read with a
//!   bound ([`MAX_REPLY`]) and no byte past it, so whatever follows belongs to the tunnel.
//! - `socks5://[user:password@]host:port`: SOCKS5 `CONNECT` by name (the proxy resolves the
//!   server's host), with user/password authentication (RFC 1929) when given; the `tokio-socks`
//!   crate speaks it.
//!
//! Credentials are [`labcore::Secret`]s: they never appear in logs or errors, and errors name
//! the proxy by its address alone.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{ProxyKind, ProxySettings};
use crate::error::Error;

/// The longest `CONNECT` reply header read.
pub(crate) const MAX_REPLY: usize = 8 * 1024;

/// A TCP connection to `target` (`HOST:PORT`) through `proxy`.
pub(crate) async fn connect(proxy: &ProxySettings, target: &str) -> Result<TcpStream, Error> {
    let failed = |reason: String| Error::Proxy {
        addr: proxy.addr.clone(),
        reason,
    };
    let stream = TcpStream::connect(&proxy.addr)
        .await
        .map_err(|e| failed(format!("connecting: {e}")))?;
    let (host, port) = split_target(target).ok_or_else(|| {
        failed(format!(
            "{target:?} is not HOST:PORT, so the proxy cannot be asked for it"
        ))
    })?;
    match proxy.kind {
        ProxyKind::Http => http_connect(stream, proxy, target)
            .await
            .map_err(|reason| failed(format!("CONNECT {target}: {reason}"))),
        ProxyKind::Socks5 => {
            let connected = match &proxy.auth {
                Some((user, password)) => {
                    tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                        stream,
                        (host, port),
                        user.expose(),
                        password.expose(),
                    )
                    .await
                }
                None => {
                    tokio_socks::tcp::Socks5Stream::connect_with_socket(stream, (host, port)).await
                }
            };
            // tokio-socks's messages name the SOCKS reply or the I/O error, never the password.
            connected
                .map(tokio_socks::tcp::Socks5Stream::into_inner)
                .map_err(|e| failed(format!("SOCKS5 CONNECT {target}: {e}")))
        }
    }
}

/// `host` and `port` of `HOST:PORT`, without an IPv6 address's brackets.
fn split_target(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok()?))
}

async fn http_connect(
    mut stream: TcpStream,
    proxy: &ProxySettings,
    target: &str,
) -> Result<TcpStream, String> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = &proxy.auth {
        let token = zeroize::Zeroizing::new(STANDARD.encode(format!(
            "{}:{}",
            user.expose(),
            password.expose()
        )));
        request.push_str(&format!("Proxy-Authorization: Basic {}\r\n", &*token));
    }
    request.push_str("\r\n");
    let request = zeroize::Zeroizing::new(request);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let head = read_head(&mut stream).await?;
    parse_reply(&head).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Reads the reply header up to and including its blank line, and nothing after it.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(512);
    let mut peeked = vec![0u8; MAX_REPLY];
    loop {
        let room = MAX_REPLY - head.len();
        if room == 0 {
            return Err(ReplyError::TooLong.to_string());
        }
        let n = stream
            .peek(&mut peeked[..room])
            .await
            .map_err(|e| format!("reading the reply: {e}"))?;
        if n == 0 {
            return Err("the proxy closed the connection before replying in full".into());
        }
        // Consume what belongs to the header: up to its end if it is in sight, else all of
        // it (none of it can be the tunnel's yet).
        let mut joined = head.clone();
        joined.extend_from_slice(&peeked[..n]);
        let take = match header_end(&joined) {
            Some(end) => end - head.len(),
            None => n,
        };
        let start = head.len();
        head.resize(start + take, 0);
        stream
            .read_exact(&mut head[start..])
            .await
            .map_err(|e| format!("reading the reply: {e}"))?;
        if header_end(&head).is_some() {
            return Ok(head);
        }
    }
}

/// The length of the header at the start of `bytes` (through its `\r\n\r\n`), if complete.
pub(crate) fn header_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Why a proxy's reply to `CONNECT` is not a yes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    /// Not an HTTP status line.
    #[error("the reply is not HTTP")]
    NotHttp,
    /// The header does not end within [`MAX_REPLY`] bytes.
    #[error("the reply header is longer than 8 KiB")]
    TooLong,
    /// 407 (or 401, which tinyproxy sends): credentials missing or wrong.
    #[error("the proxy wants authentication ({0}): give or correct user:password in the proxy URL")]
    AuthRequired(u16),
    /// Any other status outside 2xx.
    #[error("the proxy refused with status {status} {reason:?}")]
    Refused {
        /// The status code.
        status: u16,
        /// The reason phrase, cut to 64 characters.
        reason: String,
    },
}

/// Checks a complete reply header (`header_end` bytes): `HTTP/1.x 2xx` means connected.
pub(crate) fn parse_reply(head: &[u8]) -> Result<(), ReplyError> {
    if head.len() > MAX_REPLY {
        return Err(ReplyError::TooLong);
    }
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(ReplyError::NotHttp)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| ReplyError::NotHttp)?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(ReplyError::NotHttp);
    }
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ReplyError::NotHttp);
    }
    let status: u16 = code.parse().map_err(|_| ReplyError::NotHttp)?;
    match status {
        200..=299 => Ok(()),
        401 | 407 => Err(ReplyError::AuthRequired(status)),
        _ => Err(ReplyError::Refused {
            status,
            reason: parts
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn connect_replies_are_read_as_proxies_send_them() {
        assert_eq!(
            parse_reply(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            parse_reply(
                b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n"
            ),
            Ok(())
        );
        assert_eq!(
            parse_reply(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"),
            Err(ReplyError::AuthRequired(407))
        );
        assert_eq!(
            parse_reply(b"HTTP/1.1 403 Access violation\r\nContent-Length: 0\r\n\r\n"),
            Err(ReplyError::Refused {
                status: 403,
                reason: "Access violation".into()
            })
        );
        assert_eq!(
            parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(ReplyError::NotHttp)
        );
        assert_eq!(header_end(b"HTTP/1.1 200 OK\r\n\r\nextra"), Some(19));
        assert_eq!(header_end(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(split_target("[::1]:7000"), Some(("::1", 7000)));
        assert_eq!(
            split_target("lab.example.org:7000"),
            Some(("lab.example.org", 7000))
        );
        assert_eq!(split_target("nope"), None);
    }

    proptest! {
        #[test]
        fn any_reply_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_reply(&bytes);
            let _ = header_end(&bytes);
        }

        #[test]
        fn only_2xx_status_lines_connect(status in 100u16..1000, reason in "[ -~]{0,80}", headers in "([A-Za-z-]{1,20}: [ -~]{0,40}\r\n){0,5}") {
            let reply = format!("HTTP/1.1 {status} {reason}\r\n{headers}\r\n");
            let end = header_end(reply.as_bytes());
            prop_assert_eq!(end, Some(reply.len()));
            let parsed = parse_reply(reply.as_bytes());
            prop_assert_eq!(parsed.is_ok(), (200..300).contains(&status));
            if let Err(ReplyError::Refused { reason: shown, .. }) = parsed {
                prop_assert!(shown.chars().count() <= 64);
            }
        }

        #[test]
        fn a_reply_past_the_bound_is_refused(extra in 1usize..4096) {
            let mut reply = b"HTTP/1.1 200 OK\r\n".to_vec();
            reply.resize(MAX_REPLY + extra, b'a');
            prop_assert_eq!(parse_reply(&reply), Err(ReplyError::TooLong));
        }
    }
}
