//! Binding a listening unix socket at a path, the one way every blockd program does it
//! (blockd's API socket, csi-shim's CSI endpoint, csi-nbd-proxy's listener).
//!
//! Invariants:
//! - only a *socket* is ever replaced: a regular file, directory or link at the path is an
//!   error ([`BindError::NotASocket`]), so a mistyped `--endpoint` cannot delete data;
//! - a socket some process still accepts on is never stolen ([`BindError::InUse`]); one
//!   nobody answers on (left by a killed predecessor) is removed and bound again;
//! - the socket has the requested mode from the moment it exists: it is created under a
//!   umask that allows no more than the mode, then set to exactly the mode (whoever can
//!   connect can act on volumes, so 0600 is the usual answer).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Owner-only: the mode of every socket blockd programs listen on.
pub const PRIVATE_SOCKET_MODE: u32 = 0o600;

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("Cannot create the directory of {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it (remove it, or choose another path)")]
    NotASocket { path: PathBuf },
    #[error("Socket {path} is in use by another running process")]
    InUse { path: PathBuf },
    #[error("Cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot set the mode of {path} to {mode:o}")]
    SetMode {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

/// What [`bind`] found at the path before binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    Nothing,
    /// A socket nobody answered on, now replaced.
    StaleSocket,
}

/// Binds a listening socket at `path` with permission bits `mode` (see the module docs),
/// creating its directory if needed. Returns the blocking listener and what was there
/// before (for the caller's log).
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, Previous), BindError> {
    let at = || path.to_path_buf();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| BindError::CreateDir { path: at(), source })?;
    }
    let previous = remove_stale(path)?;
    // The umask covers the window between bind(2) and chmod(2): nobody outside `mode` can
    // ever connect. It is process-wide, so restore it at once.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(!mode & 0o777) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| BindError::Bind { path: at(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        BindError::SetMode {
            path: at(),
            mode,
            source,
        }
    })?;
    Ok((listener, previous))
}

/// [`bind`], as a tokio listener (call inside a runtime).
pub fn bind_tokio(
    path: &Path,
    mode: u32,
) -> Result<(tokio::net::UnixListener, Previous), BindError> {
    let (listener, previous) = bind(path, mode)?;
    let bind_err = |source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(bind_err)?;
    Ok((listener, previous))
}

/// Removes a stale socket at `path`; refuses a live socket or anything that is not one.
pub fn remove_stale(path: &Path) -> Result<Previous, BindError> {
    let at = || path.to_path_buf();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Previous::Nothing),
        Err(source) => return Err(BindError::Inspect { path: at(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket { path: at() });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(BindError::InUse { path: at() });
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(Previous::StaleSocket),
        // Gone meanwhile (a predecessor finishing its cleanup): nothing left to replace.
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Previous::Nothing),
        Err(source) => Err(BindError::RemoveStale { path: at(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn stale_sockets_are_replaced_and_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let live = UnixListener::bind(&path).unwrap();
        let err = bind(&path, PRIVATE_SOCKET_MODE).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(live);
        // The file stays behind after the listener is gone: a stale socket.
        assert!(path.exists());
        let (_listener, previous) = bind(&path, PRIVATE_SOCKET_MODE).unwrap();
        assert_eq!(previous, Previous::StaleSocket);
        UnixStream::connect(&path).expect("the new socket answers");
    }

    #[test]
    fn other_files_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = bind(&path, PRIVATE_SOCKET_MODE).unwrap_err();
        assert!(matches!(err, BindError::NotASocket { .. }), "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            bind(&sub, PRIVATE_SOCKET_MODE),
            Err(BindError::NotASocket { .. })
        ));
    }

    #[test]
    fn sockets_get_the_requested_mode_and_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/api.sock");
        let (_l, previous) = bind(&path, PRIVATE_SOCKET_MODE).unwrap();
        assert_eq!(previous, Previous::Nothing);
        assert_eq!(mode_of(&path), 0o600);
        let other = dir.path().join("group.sock");
        let (_l, _) = bind(&other, 0o660).unwrap();
        assert_eq!(mode_of(&other), 0o660);
    }

    #[tokio::test]
    async fn tokio_listeners_accept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        let (listener, _) = bind_tokio(&path, PRIVATE_SOCKET_MODE).unwrap();
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        accepted.unwrap();
        connected.unwrap();
    }
}
