//! libpq's `require_auth`: which authentication requests from the server the client answers.
//!
//! tokio-postgres answers whatever the server asks for, the password in cleartext included, and
//! offers no hook to refuse: that hands the password to anyone who can pose as the server (a
//! man in the middle below `verify-full`, or a rogue server at the configured address). So the
//! driver gets its socket through an [`AuthGuard`], which reads the server's messages until
//! authentication ends and fails the read, before the driver sees the request, when the server
//! asks for a method the settings refuse. After `AuthenticationOk` the guard only passes bytes.
//!
//! Unset, `require_auth` refuses the cleartext password only (libpq allows it; labkit does not
//! send a password unprotected unless told to). Set, it follows libpq: a comma-separated list
//! of the methods the server may use (`password`, `md5`, `gss`, `sspi`, `scram-sha-256`, and
//! `none` for no authentication at all), or the same names each prefixed with `!` for methods
//! it may not use.
//!
//! Below TLS the guard must not parse ciphertext: it watches for the driver's `SSLRequest` and
//! steps aside when the server answers `S`; the TLS stream then carries a guard of its own.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An authentication method, as `require_auth` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// The password in cleartext (`password`).
    Password,
    /// An MD5 hash of the password (`md5`).
    Md5,
    /// GSSAPI (`gss`).
    Gss,
    /// SSPI (`sspi`).
    Sspi,
    /// SCRAM-SHA-256 (`scram-sha-256`).
    ScramSha256,
    /// No authentication (`none`).
    None,
}

const METHODS: [AuthMethod; 6] = [
    AuthMethod::Password,
    AuthMethod::Md5,
    AuthMethod::Gss,
    AuthMethod::Sspi,
    AuthMethod::ScramSha256,
    AuthMethod::None,
];

impl AuthMethod {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::None => "none",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The authentication methods the client accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequireAuth {
    allowed: u8,
}

impl Default for RequireAuth {
    /// Everything but the cleartext password.
    fn default() -> RequireAuth {
        RequireAuth {
            allowed: METHODS
                .iter()
                .filter(|m| **m != AuthMethod::Password)
                .fold(0, |bits, m| bits | m.bit()),
        }
    }
}

impl fmt::Debug for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = METHODS
            .iter()
            .filter(|m| self.allows(**m))
            .map(|m| m.as_str())
            .collect();
        write!(f, "RequireAuth({})", names.join(","))
    }
}

impl RequireAuth {
    /// Parses libpq's `require_auth` value; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<RequireAuth, String> {
        let mut listed = 0u8;
        let mut negated = None;
        for item in text.split(',') {
            let item = item.trim();
            let (negate, name) = match item.strip_prefix('!') {
                Some(name) => (true, name),
                None => (false, item),
            };
            if *negated.get_or_insert(negate) != negate {
                return Err("negative and positive methods cannot be mixed".to_owned());
            }
            let method = METHODS
                .into_iter()
                .find(|m| m.as_str() == name)
                .ok_or_else(|| format!("unknown method {name:?}"))?;
            if listed & method.bit() != 0 {
                return Err(format!("method {name:?} is listed more than once"));
            }
            listed |= method.bit();
        }
        let all = METHODS.iter().fold(0, |bits, m| bits | m.bit());
        Ok(RequireAuth {
            allowed: if negated == Some(true) {
                all & !listed
            } else {
                listed
            },
        })
    }

    /// Whether the server may use `method`.
    pub fn allows(self, method: AuthMethod) -> bool {
        self.allowed & method.bit() != 0
    }

    fn check(self, method: AuthMethod) -> io::Result<()> {
        if self.allows(method) {
            return Ok(());
        }
        let message = match method {
            AuthMethod::Password => "the server asked for the password in cleartext, which \
                 require_auth does not allow (set require_auth=password to send it anyway)"
                .to_owned(),
            AuthMethod::None => {
                "the server let the client in without authentication, which require_auth does \
                 not allow"
                    .to_owned()
            }
            other => format!(
                "the server asked for {} authentication, which require_auth does not allow",
                other.as_str()
            ),
        };
        Err(io::Error::new(io::ErrorKind::PermissionDenied, message))
    }
}

/// The start of the `SSLRequest` message: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing written yet: the driver may ask for TLS first.
    Start,
    /// `SSLRequest` sent; the server's one-byte answer comes next.
    SslAnswer,
    /// Reading the server's messages.
    Messages,
    /// Authentication is over (or the stream is TLS below us): bytes pass untouched.
    Done,
}

/// A stream between the driver and the server that refuses authentication requests
/// [`RequireAuth`] does not allow.
pub struct AuthGuard<S> {
    inner: S,
    policy: RequireAuth,
    state: State,
    /// The message header being read: type, length, and for `R` the request code.
    header: [u8; 9],
    have: usize,
    /// Body bytes of the current message still to pass.
    skip: u32,
    /// Whether the server has asked for any authentication yet.
    asked: bool,
}

impl<S> AuthGuard<S> {
    /// A guard on a socket, before the driver has written anything.
    pub fn on_socket(inner: S, policy: RequireAuth) -> AuthGuard<S> {
        AuthGuard::new(inner, policy, State::Start)
    }

    /// A guard on a stream that carries protocol messages from its start (inside TLS).
    pub fn on_messages(inner: S, policy: RequireAuth) -> AuthGuard<S> {
        AuthGuard::new(inner, policy, State::Messages)
    }

    fn new(inner: S, policy: RequireAuth, state: State) -> AuthGuard<S> {
        AuthGuard {
            inner,
            policy,
            state,
            header: [0; 9],
            have: 0,
            skip: 0,
            asked: false,
        }
    }

    /// Follows the server's bytes; an error means the connection must end here.
    fn inspect(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.state == State::SslAnswer {
            let Some((&answer, rest)) = data.split_first() else {
                return Ok(());
            };
            if answer == b'S' {
                self.state = State::Done;
                return Ok(());
            }
            self.state = State::Messages;
            if answer == b'N' {
                data = rest;
            }
        }
        while self.state == State::Messages && !data.is_empty() {
            if self.skip > 0 {
                let n = data.len().min(self.skip as usize);
                self.skip -= n as u32;
                data = &data[n..];
                continue;
            }
            // Byte by byte: the header's length depends on its first byte, and this runs
            // only until authentication ends.
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            let want = if self.header[0] == b'R' { 9 } else { 5 };
            if self.have == want {
                self.message()?;
            }
        }
        Ok(())
    }

    /// A whole header is in: judge the message.
    fn message(&mut self) -> io::Result<()> {
        let kind = self.header[0];
        let len = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]);
        self.have = 0;
        if kind != b'R' {
            // An error, or anything the driver will reject itself: nothing more to judge.
            if kind == b'v' && len >= 4 {
                // NegotiateProtocolVersion may precede authentication.
                self.skip = len - 4;
            } else {
                self.state = State::Done;
            }
            return Ok(());
        }
        if len < 8 {
            self.state = State::Done; // malformed: the driver fails on it
            return Ok(());
        }
        self.skip = len - 8;
        let code = u32::from_be_bytes([
            self.header[5],
            self.header[6],
            self.header[7],
            self.header[8],
        ]);
        let method = match code {
            0 => {
                self.state = State::Done;
                if !self.asked {
                    self.policy.check(AuthMethod::None)?;
                }
                return Ok(());
            }
            3 => AuthMethod::Password,
            5 => AuthMethod::Md5,
            7 | 8 => AuthMethod::Gss,
            9 => AuthMethod::Sspi,
            10 => AuthMethod::ScramSha256,
            // SASL continuations, and methods the driver refuses by itself.
            _ => return Ok(()),
        };
        self.asked = true;
        self.policy.check(method)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if this.state != State::Done => {
                if let Err(err) = this.inspect(&buf.filled()[before..]) {
                    // The driver must never see the refused request.
                    buf.set_filled(before);
                    this.state = State::Done;
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.state == State::Start && !data.is_empty() {
            // tokio-postgres writes its SSLRequest whole, in one call.
            this.state = if data.starts_with(&SSL_REQUEST) {
                State::SslAnswer
            } else {
                State::Messages
            };
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_auth_parses_like_libpq() {
        let default = RequireAuth::default();
        assert!(!default.allows(AuthMethod::Password));
        assert!(default.allows(AuthMethod::ScramSha256));
        assert!(default.allows(AuthMethod::None));

        let scram = RequireAuth::parse("scram-sha-256").unwrap();
        assert!(scram.allows(AuthMethod::ScramSha256));
        assert!(!scram.allows(AuthMethod::Md5));
        assert!(!scram.allows(AuthMethod::None));

        let not_md5 = RequireAuth::parse("!md5,!none").unwrap();
        assert!(not_md5.allows(AuthMethod::Password));
        assert!(!not_md5.allows(AuthMethod::Md5));
        assert!(!not_md5.allows(AuthMethod::None));

        for (bad, needle) in [
            ("md5,!none", "mixed"),
            ("scram", "unknown method \"scram\""),
            ("md5,md5", "more than once"),
        ] {
            let err = RequireAuth::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    fn auth_request(code: u32) -> Vec<u8> {
        let mut message = vec![b'R', 0, 0, 0, 8];
        message.extend_from_slice(&code.to_be_bytes());
        message
    }

    #[test]
    fn a_cleartext_request_split_across_reads_is_refused() {
        let mut guard = AuthGuard::on_messages((), RequireAuth::default());
        let request = auth_request(3);
        for byte in &request[..request.len() - 1] {
            guard.inspect(std::slice::from_ref(byte)).unwrap();
        }
        let err = guard.inspect(&request[request.len() - 1..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("cleartext"), "{err}");
    }

    #[test]
    fn the_guard_steps_aside_once_tls_is_agreed_and_after_authentication() {
        let mut below_tls = AuthGuard::on_socket((), RequireAuth::default());
        below_tls.state = State::SslAnswer;
        below_tls.inspect(b"S").unwrap();
        below_tls.inspect(&auth_request(3)).unwrap();
        assert_eq!(below_tls.state, State::Done);

        let mut plain = AuthGuard::on_socket((), RequireAuth::default());
        plain.state = State::SslAnswer;
        let mut refused = b"N".to_vec();
        refused.extend(auth_request(3));
        assert!(plain.inspect(&refused).is_err());

        let mut scram = AuthGuard::on_messages((), RequireAuth::default());
        let mut bytes = auth_request(10);
        bytes.extend(auth_request(0));
        bytes.extend(auth_request(3)); // after AuthenticationOk nothing is judged
        scram.inspect(&bytes).unwrap();
        assert_eq!(scram.state, State::Done);
    }

    #[test]
    fn without_none_a_server_that_asks_nothing_is_refused() {
        let mut guard = AuthGuard::on_messages((), RequireAuth::parse("scram-sha-256").unwrap());
        let err = guard.inspect(&auth_request(0)).unwrap_err();
        assert!(err.to_string().contains("without authentication"), "{err}");
    }
}
