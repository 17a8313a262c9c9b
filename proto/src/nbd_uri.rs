//! NBD URIs of exports, as libnbd, qemu and nbdfuse read them (the NBD project's
//! `doc/uri.md`): built by the daemon for `blockd.v1.ExportService`, parsed by its clients
//! (csi-shim's attachers take the socket path out of them).
//!
//! ```text
//!  nbd+unix:///EXPORT?socket=/abs/path/nbd.sock     (a unix socket)
//!  nbds://HOST:PORT/EXPORT                          (TCP with TLS; nbd:// without)
//! ```
//!
//! Invariants:
//! - `NbdUri::parse(&uri.to_string()) == Ok(uri)` for every URI (proptest below), whatever
//!   bytes the export name or the socket path hold: percent-encoding is done here, once,
//!   for every character but RFC 3986 unreserved ones, `/` and `@`;
//! - parsing is strict: a bad escape, a missing socket or a non-numeric port is an error,
//!   never a guess.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The IANA port of NBD, used when a TCP URI names none.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Where an export is served and under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdUri {
    /// `nbd+unix:///EXPORT?socket=PATH`.
    Unix { export: String, socket: PathBuf },
    /// `nbds://HOST:PORT/EXPORT` (TLS) or `nbd://HOST:PORT/EXPORT`. An IPv6 `host` is
    /// held without its brackets.
    Tcp {
        export: String,
        host: String,
        port: u16,
        tls: bool,
    },
}

/// A string that is not an NBD URI this module reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid NBD URI {uri:?}: {reason}")]
pub struct NbdUriError {
    pub uri: String,
    pub reason: &'static str,
}

impl NbdUri {
    /// The URI of `export` on the unix socket `socket`.
    pub fn unix(export: &str, socket: &Path) -> Self {
        NbdUri::Unix {
            export: export.to_string(),
            socket: socket.to_path_buf(),
        }
    }

    /// The URI of `export` over TCP with TLS. The client adds its own certificate options
    /// (libnbd: `?tls-certificates=DIR`).
    pub fn tls(export: &str, host: &str, port: u16) -> Self {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        NbdUri::Tcp {
            export: export.to_string(),
            host: bare.unwrap_or(host).to_string(),
            port,
            tls: true,
        }
    }

    /// The export (image) name.
    pub fn export(&self) -> &str {
        match self {
            NbdUri::Unix { export, .. } | NbdUri::Tcp { export, .. } => export,
        }
    }

    /// The unix socket, for a `nbd+unix` URI.
    pub fn socket(&self) -> Option<&Path> {
        match self {
            NbdUri::Unix { socket, .. } => Some(socket),
            NbdUri::Tcp { .. } => None,
        }
    }

    /// Parses `nbd+unix://`, `nbd://` and `nbds://` URIs (see the module docs).
    pub fn parse(uri: &str) -> Result<Self, NbdUriError> {
        let err = |reason| NbdUriError {
            uri: uri.to_string(),
            reason,
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| err("expected SCHEME://..."))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let export = decode_utf8(path.strip_prefix('/').unwrap_or(path)).map_err(err)?;
        match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(err(
                        "a nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                let raw = query
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .ok_or_else(|| err("no socket= in the query"))?;
                let socket = PathBuf::from(OsString::from_vec(decode(raw).map_err(err)?));
                if socket.as_os_str().is_empty() {
                    return Err(err("the socket path is empty"));
                }
                Ok(NbdUri::Unix { export, socket })
            }
            "nbd" | "nbds" => {
                let (host, port) = split_host_port(authority).map_err(err)?;
                Ok(NbdUri::Tcp {
                    export,
                    host: decode_utf8(host).map_err(err)?,
                    port,
                    tls: scheme == "nbds",
                })
            }
            _ => Err(err("the scheme is not nbd+unix, nbd or nbds")),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 host lacks its ']'")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the host is empty");
    }
    let port = match port {
        None => NBD_DEFAULT_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| "the port is not a number from 0 to 65535")?,
    };
    Ok((host, port))
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdUri::Unix { export, socket } => write!(
                f,
                "nbd+unix:///{}?socket={}",
                encode(export.as_bytes()),
                encode(socket.as_os_str().as_bytes())
            ),
            NbdUri::Tcp {
                export,
                host,
                port,
                tls,
            } => {
                let scheme = if *tls { "nbds" } else { "nbd" };
                let host = encode(host.as_bytes());
                if host.contains(':') {
                    write!(
                        f,
                        "{scheme}://[{host}]:{port}/{}",
                        encode(export.as_bytes())
                    )
                } else {
                    write!(f, "{scheme}://{host}:{port}/{}", encode(export.as_bytes()))
                }
            }
        }
    }
}

impl FromStr for NbdUri {
    type Err = NbdUriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, `/`, `@` and, so that
/// IPv6 hosts stay readable, `:` (which is allowed in both places it can appear).
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/@:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = |c: Option<u8>| match c {
            Some(c) => (c as char)
                .to_digit(16)
                .ok_or("a '%' is not followed by two hex digits"),
            None => Err("a '%' is not followed by two hex digits"),
        };
        let hi = hex(bytes.next())?;
        let lo = hex(bytes.next())?;
        out.push((hi * 16 + lo) as u8);
    }
    Ok(out)
}

fn decode_utf8(s: &str) -> Result<String, &'static str> {
    String::from_utf8(decode(s)?).map_err(|_| "an escaped name is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unix_uris_are_what_libnbd_reads() {
        let uri = NbdUri::unix("vol@s1", Path::new("/run/blockd/nbd.sock"));
        assert_eq!(
            uri.to_string(),
            "nbd+unix:///vol@s1?socket=/run/blockd/nbd.sock"
        );
        assert_eq!(
            NbdUri::unix("v", Path::new("/tmp/a b/nbd.sock")).to_string(),
            "nbd+unix:///v?socket=/tmp/a%20b/nbd.sock"
        );
        assert_eq!(
            NbdUri::unix("v", Path::new("/a%b/s")).to_string(),
            "nbd+unix:///v?socket=/a%25b/s"
        );
    }

    #[test]
    fn tls_uris_bracket_ipv6_hosts() {
        assert_eq!(
            NbdUri::tls("vol@s 1", "node-1.example", 10809).to_string(),
            "nbds://node-1.example:10809/vol@s%201"
        );
        assert_eq!(NbdUri::tls("v", "::1", 7).to_string(), "nbds://[::1]:7/v");
        assert_eq!(NbdUri::tls("v", "[::1]", 7).to_string(), "nbds://[::1]:7/v");
    }

    #[test]
    fn sockets_come_out_of_unix_uris() {
        let parse = |s: &str| NbdUri::parse(s).map(|u| u.socket().map(Path::to_path_buf));
        assert_eq!(
            parse("nbd+unix:///vol?socket=/run/blockd/nbd.sock"),
            Ok(Some(PathBuf::from("/run/blockd/nbd.sock")))
        );
        assert_eq!(
            parse("nbd+unix:///vol?tls=off&socket=/a%20b/nbd.sock"),
            Ok(Some(PathBuf::from("/a b/nbd.sock")))
        );
        assert_eq!(parse("nbds://h:1/v"), Ok(None));
        assert_eq!(
            NbdUri::parse("nbd://h/v").unwrap(),
            NbdUri::Tcp {
                export: "v".into(),
                host: "h".into(),
                port: NBD_DEFAULT_PORT,
                tls: false,
            }
        );
    }

    #[test]
    fn bad_uris_are_refused_with_a_reason() {
        for bad in [
            "nbd+unix:///vol",
            "nbd+unix:///vol?socket=",
            "nbd+unix://host/vol?socket=/s",
            "nbd+unix:///v?socket=/a%2",
            "nbd+unix:///v?socket=/a%zz",
            "nbd+unix:///%ff?socket=/s",
            "nbds://h:port/v",
            "nbds://:1/v",
            "nbds://[::1/v",
            "http://h/v",
            "vol",
        ] {
            let err = NbdUri::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    fn any_path() -> impl Strategy<Value = PathBuf> {
        proptest::collection::vec(1u8..=255, 1..64)
            .prop_map(|b| PathBuf::from(OsString::from_vec(b)))
    }

    proptest! {
        #[test]
        fn unix_uris_round_trip(export in any::<String>(), socket in any_path()) {
            let uri = NbdUri::unix(&export, &socket);
            prop_assert_eq!(NbdUri::parse(&uri.to_string()), Ok(uri));
        }

        #[test]
        fn tcp_uris_round_trip(
            export in any::<String>(),
            host in "[a-z0-9.-]{1,20}|[0-9a-f:]{2,39}",
            port in any::<u16>(),
            tls in any::<bool>(),
        ) {
            let uri = NbdUri::Tcp { export, host, port, tls };
            prop_assert_eq!(NbdUri::parse(&uri.to_string()), Ok(uri));
        }

        /// Built URIs are plain ASCII with no space, `?`, `&` or `#` but the separators:
        /// any shell or URI reader splits them where we do.
        #[test]
        fn built_uris_are_plain(export in any::<String>(), socket in any_path()) {
            let s = NbdUri::unix(&export, &socket).to_string();
            prop_assert!(s.is_ascii() && !s.contains(' ') && !s.contains('#'));
            prop_assert_eq!(s.matches('?').count(), 1);
            prop_assert!(!s.contains('&'));
        }

        #[test]
        fn parsing_never_panics(s in any::<String>()) {
            let _ = NbdUri::parse(&s);
        }
    }
}
