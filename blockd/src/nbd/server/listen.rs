//! Listeners: the unix socket and the TLS listener, the accept loop, and the server's
//! control over its connections (unexport, listener shutdown, connection counts).
//!
//! Every accepted stream gets a [`ConnSlot`] in the server's table before its task starts,
//! so [`Server::close_export`] and listener shutdown see every connection.
//!
//! Invariants:
//! - a unix socket is bound by [`blockd_proto::unix_socket`], owner-only (whoever can
//!   connect can read and write volumes): a stale socket file (no server answering) is
//!   replaced, a live one or any other file is an error;
//! - a transient accept error (descriptor or memory exhaustion, an aborted connection) is
//!   logged and retried after a pause; any other ends the listener;
//! - a listener that stops asks each of its connections to shut down and returns only
//!   once every one of them has ended.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockd_proto::unix_socket;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use super::handshake::{run_plain, run_tls, Accepted};
use super::{is_disconnect, ConnError, ConnGuard, ConnSlot, ErrorChain, Server, ServerError, Stop};
use crate::nbd::tls::TlsConfig;

impl Server {
    /// Serves clients on unix socket `path` until `shutdown` resolves, then closes this
    /// listener's connections gracefully and removes the socket file.
    ///
    /// A stale socket file (no server answering) is removed first; a live one is an error.
    pub async fn serve_unix(
        &self,
        path: &Path,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let (listener, previous) = unix_socket::bind_tokio(path, unix_socket::PRIVATE_SOCKET_MODE)?;
        info!(path = %path.display(), ?previous, "nbd server listening on unix socket");
        let result = self
            .accept_loop(shutdown, || async {
                let (stream, _) = listener.accept().await?;
                Ok(Accepted::Unix(stream))
            })
            .await;
        drop(listener);
        let _ = std::fs::remove_file(path);
        result
    }

    /// Serves TLS clients on `listener` until `shutdown` resolves. The listener is in
    /// FORCEDTLS mode: every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused
    /// with `NBD_REP_ERR_TLS_REQD` until TLS is up; plain-text transmission never happens.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: TlsConfig,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, client_auth = tls.verifies_clients(), "nbd server listening on TCP with TLS");
        }
        self.accept_loop(shutdown, || async {
            let (stream, _) = listener.accept().await?;
            // The spec asks both sides to disable Nagle on TCP.
            stream.set_nodelay(true)?;
            Ok(Accepted::Tls(stream, tls.clone()))
        })
        .await
    }

    async fn accept_loop<A, F>(
        &self,
        shutdown: impl Future<Output = ()>,
        mut accept: A,
    ) -> Result<(), ServerError>
    where
        A: FnMut() -> F,
        F: Future<Output = io::Result<Accepted>>,
    {
        let listener_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        tokio::pin!(shutdown);
        let result = loop {
            let stream = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                s = accept() => s,
            };
            match stream {
                Ok(stream) => self.spawn_connection(listener_id, stream),
                Err(err) if is_transient_accept_error(&err) => {
                    warn!(error = %err, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => break Err(ServerError::Accept(err)),
            }
        };
        self.stop_listener(listener_id).await;
        result
    }

    /// Enters a new connection of `listener` (0: none) in the table, before its task
    /// starts; the guard takes it out again when the connection ends.
    fn register_connection(&self, listener: u64) -> (u64, ConnGuard, watch::Receiver<Stop>) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (stop_tx, stop_rx) = watch::channel(Stop::Run);
        let (done_tx, done_rx) = watch::channel(());
        self.shared.conns.lock().insert(
            id,
            ConnSlot {
                listener,
                stop: stop_tx,
                done: done_rx,
                attached: None,
            },
        );
        let guard = ConnGuard {
            shared: self.shared.clone(),
            id,
            _done: done_tx,
        };
        (id, guard, stop_rx)
    }

    fn spawn_connection(&self, listener: u64, stream: Accepted) {
        let (id, guard, stop_rx) = self.register_connection(listener);
        let span = tracing::info_span!("nbd_conn", conn = id);
        tokio::spawn(
            async move {
                debug!("client connected");
                let result = match stream {
                    Accepted::Unix(s) => {
                        let fd = s.as_raw_fd();
                        run_plain(guard, s, stop_rx, Some(fd)).await
                    }
                    Accepted::Tls(s, tls) => run_tls(guard, s, stop_rx, tls).await,
                };
                match result {
                    Ok(()) => debug!("client disconnected"),
                    // Probes and clients that hang up mid-handshake are routine.
                    Err(ConnError::Io(e)) if is_disconnect(&e) => {
                        debug!(error = %e, "client hung up")
                    }
                    Err(err) => info!(error = %ErrorChain(&err), "connection closed"),
                }
            }
            .instrument(span),
        );
    }

    /// Closes every connection using export `name` gracefully (in-flight requests finish,
    /// the target is flushed) and returns once none uses it; returns how many there were.
    /// Call it after removing the export from the registry, so no new client gets in.
    pub async fn close_export(&self, name: &str) -> usize {
        let waits: Vec<watch::Receiver<()>> = {
            let conns = self.shared.conns.lock();
            conns
                .values()
                .filter_map(|slot| {
                    let att = slot.attached.as_ref()?;
                    if att.export != name {
                        return None;
                    }
                    slot.stop.send_if_modified(|s| {
                        if *s == Stop::Run {
                            *s = Stop::ExportClosed;
                            true
                        } else {
                            false
                        }
                    });
                    Some(att.released.clone())
                })
                .collect()
        };
        let n = waits.len();
        for mut w in waits {
            while w.changed().await.is_ok() {}
        }
        if n > 0 {
            info!(export = name, connections = n, "closed export connections");
        }
        n
    }

    /// Number of open connections, and how many of them use export `name`.
    pub fn connection_count(&self, name: Option<&str>) -> usize {
        let conns = self.shared.conns.lock();
        match name {
            None => conns.len(),
            Some(name) => conns
                .values()
                .filter(|s| s.attached.as_ref().is_some_and(|a| a.export == name))
                .count(),
        }
    }

    async fn stop_listener(&self, listener: u64) {
        let waits: Vec<watch::Receiver<()>> = {
            let conns = self.shared.conns.lock();
            conns
                .values()
                .filter(|slot| slot.listener == listener)
                .map(|slot| {
                    slot.stop.send_replace(Stop::Shutdown);
                    slot.done.clone()
                })
                .collect()
        };
        info!(connections = waits.len(), "nbd listener stopping");
        for mut w in waits {
            while w.changed().await.is_ok() {}
        }
    }

    /// Serves one already-connected stream (plain text) until it ends. For tests and for
    /// callers with their own transport (socketpair, inherited fd).
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (_, guard, stop_rx) = self.register_connection(0);
        if let Err(err) = run_plain(guard, stream, stop_rx, None).await {
            debug!(error = %err, "connection closed");
        }
    }
}

fn is_transient_accept_error(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || err.kind() == io::ErrorKind::ConnectionAborted
}
