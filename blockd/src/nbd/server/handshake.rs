//! The handshake: fixed newstyle negotiation up to transmission.
//!
//! Greeting, client flags, then options until `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME` opens an
//! export through the [`ExportRegistry`](crate::nbd::ExportRegistry) and hands a
//! [`Session`] to [`transmit`](super::transmit). Unknown options get `NBD_REP_ERR_UNSUP`;
//! malformed ones `NBD_REP_ERR_INVALID`.
//!
//! Invariants:
//! - the whole handshake runs under [`ServerConfig::handshake_timeout`](super::ServerConfig);
//! - option data is bounded ([`MAX_OPTION_LEN`], drained and answered
//!   `NBD_REP_ERR_TOO_BIG` beyond it) and so is the number of options ([`MAX_OPTIONS`]);
//! - on a TLS listener nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is accepted
//!   before TLS is up, and no negotiation state survives STARTTLS;
//! - a connection is attached to its export ([`AttachGuard`]) *before* the export is
//!   opened, so an unexport racing with `NBD_OPT_GO` either sees the connection or makes
//!   the GO fail.

use std::os::fd::RawFd;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info};

use super::transmit::transmit;
use super::{
    blocking, drain, AttachGuard, ConnError, ConnGuard, Shared, Stop, BASE_ALLOCATION,
    BASE_ALLOCATION_ID, MAX_OPTIONS, MAX_OPTION_LEN, MAX_PAYLOAD, MIN_BLOCK_SIZE,
    PREFERRED_BLOCK_SIZE,
};
use crate::nbd::codec::*;
use crate::nbd::tls::TlsConfig;
use crate::nbd::{ExportTarget, OpenError};

/// A freshly accepted client.
pub(super) enum Accepted {
    Unix(UnixStream),
    /// A TCP client that must upgrade to TLS with `NBD_OPT_STARTTLS`.
    Tls(TcpStream, TlsConfig),
}

pub(super) async fn run_tls(
    guard: ConnGuard,
    mut stream: TcpStream,
    stop: watch::Receiver<Stop>,
    tls: TlsConfig,
) -> Result<(), ConnError> {
    let timeout = guard.shared.config.handshake_timeout;
    let mut neg = Negotiation::new(&guard, stop.clone(), TlsState::Required);
    let negotiated = tokio::time::timeout(timeout, async {
        neg.greet(&mut stream).await?;
        match neg.options(&mut stream).await? {
            Step::StartTls => {}
            Step::Close => return Ok(None),
            // Options other than STARTTLS/ABORT are refused before TLS is up.
            Step::Transmit(_) => return Err(ConnError::TlsRequired),
        }
        let mut tls_stream = tls.accept(stream).await.map_err(ConnError::Tls)?;
        neg.tls = TlsState::Active;
        match neg.options(&mut tls_stream).await? {
            Step::Transmit(session) => Ok(Some((session, tls_stream))),
            Step::Close | Step::StartTls => Ok(None),
        }
    })
    .await
    .map_err(|_| ConnError::HandshakeTimeout(timeout))??;
    match negotiated {
        Some((session, tls_stream)) => {
            transmit(&guard.shared, session, tls_stream, stop, None).await
        }
        None => Ok(()),
    }
}

/// `socket`: the stream's descriptor when it is a socket whose bytes are the protocol's
/// (not TLS), which lets the transmission busy-poll it (see `transmit`).
pub(super) async fn run_plain<S>(
    guard: ConnGuard,
    mut stream: S,
    stop: watch::Receiver<Stop>,
    socket: Option<RawFd>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = guard.shared.config.handshake_timeout;
    let mut neg = Negotiation::new(&guard, stop.clone(), TlsState::NotOffered);
    let step = tokio::time::timeout(timeout, async {
        neg.greet(&mut stream).await?;
        neg.options(&mut stream).await
    })
    .await
    .map_err(|_| ConnError::HandshakeTimeout(timeout))??;
    match step {
        Step::Transmit(session) => transmit(&guard.shared, session, stream, stop, socket).await,
        Step::Close | Step::StartTls => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// Unix socket: TLS is not offered (`NBD_REP_ERR_POLICY`).
    NotOffered,
    /// TLS listener before `NBD_OPT_STARTTLS`: only STARTTLS and ABORT are accepted.
    Required,
    Active,
}

enum Step {
    Transmit(Session),
    StartTls,
    Close,
}

/// Metadata contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`.
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

/// Negotiation state of one connection.
struct Negotiation {
    shared: Arc<Shared>,
    conn: u64,
    stop: watch::Receiver<Stop>,
    tls: TlsState,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    options_seen: usize,
}

/// Everything transmission needs, fixed at `NBD_OPT_GO`.
pub(super) struct Session {
    pub(super) export: String,
    pub(super) target: Arc<dyn ExportTarget>,
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) structured: bool,
    pub(super) base_allocation: bool,
    pub(super) strict_alignment: bool,
    pub(super) _attach: AttachGuard,
}

/// What the option handler decided about one option.
enum Handled {
    Continue,
    Done(Step),
}

impl Negotiation {
    fn new(guard: &ConnGuard, stop: watch::Receiver<Stop>, tls: TlsState) -> Self {
        Self {
            shared: guard.shared.clone(),
            conn: guard.id,
            stop,
            tls,
            no_zeroes: false,
            structured: false,
            meta: None,
            options_seen: 0,
        }
    }

    async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
    ) -> Result<(), ConnError> {
        let server_flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
        s.write_all(
            &Greeting {
                handshake_flags: server_flags,
            }
            .encode(),
        )
        .await?;
        s.flush().await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        let flags = ClientFlags::decode(&buf, server_flags)?;
        if !flags.fixed_newstyle() && self.tls != TlsState::NotOffered {
            // TLS needs fixed newstyle, and this listener never speaks plain text.
            return Err(ConnError::TlsRequired);
        }
        // A client without NBD_FLAG_C_FIXED_NEWSTYLE is still answered the fixed-newstyle
        // way (the spec allows it); such old clients only send NBD_OPT_EXPORT_NAME.
        self.no_zeroes = flags.no_zeroes();
        Ok(())
    }

    async fn options<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
    ) -> Result<Step, ConnError> {
        loop {
            let mut hdr = [0u8; OPTION_HEADER_LEN];
            let stop = &mut self.stop;
            tokio::select! {
                biased;
                _ = stop.wait_for(|st| *st == Stop::Shutdown) => return Ok(Step::Close),
                r = s.read_exact(&mut hdr) => { r?; }
            }
            let header = OptionHeader::decode(&hdr)?;
            self.options_seen += 1;
            if self.options_seen > MAX_OPTIONS {
                return Err(ConnError::TooManyOptions);
            }
            if header.len > MAX_OPTION_LEN {
                if header.option == NBD_OPT_EXPORT_NAME {
                    // Cannot be answered with an error: the spec says end the session.
                    return Err(ConnError::ExportName {
                        name: format!("<{} bytes>", header.len),
                    });
                }
                drain(s, header.len as u64).await?;
                self.reply(
                    s,
                    OptionReply::error(
                        header.option,
                        NBD_REP_ERR_TOO_BIG,
                        format!("option data of {} bytes is too large", header.len),
                    ),
                )
                .await?;
                continue;
            }
            let mut data = vec![0u8; header.len as usize];
            s.read_exact(&mut data).await?;
            match self.handle(s, header.option, &data).await? {
                Handled::Continue => {}
                Handled::Done(step) => return Ok(step),
            }
        }
    }

    async fn reply<S: AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        reply: OptionReply,
    ) -> Result<(), ConnError> {
        s.write_all(&reply.encode()).await?;
        Ok(())
    }

    async fn reply_error<S: AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        option: u32,
        code: u32,
        message: impl Into<String>,
    ) -> Result<Handled, ConnError> {
        let message = message.into();
        debug!(option, code = code & !NBD_REP_FLAG_ERROR, message = %message, "option refused");
        self.reply(s, OptionReply::error(option, code, message))
            .await?;
        s.flush().await?;
        Ok(Handled::Continue)
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Handled, ConnError> {
        let stop_now = *self.stop.borrow();
        if stop_now == Stop::Shutdown {
            if option == NBD_OPT_ABORT {
                let _ = self.ack(s, option).await;
            } else {
                let _ = self
                    .reply_error(s, option, NBD_REP_ERR_SHUTDOWN, "server is shutting down")
                    .await;
            }
            return Ok(Handled::Done(Step::Close));
        }
        if self.tls == TlsState::Required && option != NBD_OPT_STARTTLS && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(ConnError::TlsRequired);
            }
            return self
                .reply_error(s, option, NBD_REP_ERR_TLS_REQD, "TLS is required")
                .await;
        }
        let opt = match ClientOption::decode(option, data) {
            Ok(opt) => opt,
            Err(err) if option == NBD_OPT_EXPORT_NAME => {
                debug!(error = %err, "invalid NBD_OPT_EXPORT_NAME");
                return Err(ConnError::ExportName {
                    name: String::from_utf8_lossy(data).into_owned(),
                });
            }
            Err(err) => {
                return self
                    .reply_error(s, option, NBD_REP_ERR_INVALID, err.to_string())
                    .await
            }
        };
        match opt {
            ClientOption::Abort => {
                // The client may already have closed; a failed ACK changes nothing.
                let _ = self.ack(s, option).await;
                Ok(Handled::Done(Step::Close))
            }
            ClientOption::List => {
                let registry = self.shared.registry.clone();
                let exports = blocking(move || registry.list()).await.unwrap_or_default();
                for e in exports {
                    self.reply(
                        s,
                        OptionReply::new(
                            option,
                            OptionReplyBody::Server {
                                name: e.name,
                                description: e.description,
                            },
                        ),
                    )
                    .await?;
                }
                self.ack(s, option).await?;
                Ok(Handled::Continue)
            }
            ClientOption::StartTls => match self.tls {
                TlsState::NotOffered => {
                    self.reply_error(s, option, NBD_REP_ERR_POLICY, "TLS is not offered here")
                        .await
                }
                TlsState::Active => {
                    self.reply_error(s, option, NBD_REP_ERR_INVALID, "TLS is already active")
                        .await
                }
                TlsState::Required => {
                    self.ack(s, option).await?;
                    // The spec: no negotiation state survives STARTTLS.
                    self.structured = false;
                    self.meta = None;
                    Ok(Handled::Done(Step::StartTls))
                }
            },
            ClientOption::StructuredReply => {
                self.structured = true;
                self.ack(s, option).await?;
                Ok(Handled::Continue)
            }
            ClientOption::ListMetaContext(req) => self.meta_context(s, option, req, false).await,
            ClientOption::SetMetaContext(req) => self.meta_context(s, option, req, true).await,
            ClientOption::Info(req) => self.info(s, option, req, false).await,
            ClientOption::Go(req) => self.info(s, option, req, true).await,
            ClientOption::ExportName(name) => self.export_name(s, name).await,
            ClientOption::Unknown(code) => {
                self.reply_error(s, code, NBD_REP_ERR_UNSUP, "option not supported")
                    .await
            }
        }
    }

    async fn ack<S: AsyncWrite + Unpin>(&self, s: &mut S, option: u32) -> Result<(), ConnError> {
        self.reply(s, OptionReply::new(option, OptionReplyBody::Ack))
            .await?;
        s.flush().await?;
        Ok(())
    }

    /// Opens export `name`; on failure, the option error code and message to send.
    async fn open(&self, name: &str) -> Result<Opened, (u32, String)> {
        let registry = self.shared.registry.clone();
        let owned = name.to_owned();
        let opened = blocking(move || {
            let target = registry.open(&owned)?;
            let size = target.size().map_err(OpenError::Io)?;
            let description = target.description();
            Ok::<_, OpenError>(Opened {
                target,
                size,
                description,
            })
        })
        .await;
        match opened {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(OpenError::NotFound)) => {
                Err((NBD_REP_ERR_UNKNOWN, format!("export {name:?} not found")))
            }
            Ok(Err(OpenError::Refused { reason })) => Err((
                NBD_REP_ERR_POLICY,
                format!("export {name:?} refused: {reason}"),
            )),
            Ok(Err(OpenError::Io(errno))) => Err((
                NBD_REP_ERR_UNKNOWN,
                format!("export {name:?} cannot be opened: {errno}"),
            )),
            Err(_) => Err((
                NBD_REP_ERR_UNKNOWN,
                format!("export {name:?} cannot be opened"),
            )),
        }
    }

    async fn meta_context<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        option: u32,
        req: MetaContextRequest,
        set: bool,
    ) -> Result<Handled, ConnError> {
        if set {
            // The spec: SET replaces the previous selection even when it fails.
            self.meta = None;
        }
        if !self.structured {
            return self
                .reply_error(
                    s,
                    option,
                    NBD_REP_ERR_INVALID,
                    "structured replies must be negotiated first",
                )
                .await;
        }
        if let Some(bad) = req.queries.iter().find(|q| !q.contains(':')) {
            return self
                .reply_error(
                    s,
                    option,
                    NBD_REP_ERR_INVALID,
                    format!("query {bad:?} has no namespace"),
                )
                .await;
        }
        if let Err((code, message)) = self.open(&req.export).await {
            return self.reply_error(s, option, code, message).await;
        }
        let base_allocation = if set {
            // "base:" alone selects nothing in SET (spec); unknown names are ignored.
            req.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == BASE_ALLOCATION)
        };
        if base_allocation {
            self.reply(
                s,
                OptionReply::new(
                    option,
                    OptionReplyBody::MetaContext {
                        // LIST replies carry id 0 (reserved); SET replies the real id.
                        id: if set { BASE_ALLOCATION_ID } else { 0 },
                        name: BASE_ALLOCATION.to_owned(),
                    },
                ),
            )
            .await?;
        }
        if set {
            self.meta = Some(MetaSelection {
                export: req.export,
                base_allocation,
            });
        }
        self.ack(s, option).await?;
        Ok(Handled::Continue)
    }

    async fn info<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        option: u32,
        req: InfoRequest,
        go: bool,
    ) -> Result<Handled, ConnError> {
        // Attach before opening so that an unexport racing with this GO sees us.
        let attach = go.then(|| AttachGuard::new(&self.shared, self.conn, &req.name));
        let Opened {
            target,
            size,
            description,
        } = match self.open(&req.name).await {
            Ok(v) => v,
            Err((code, message)) => return self.reply_error(s, option, code, message).await,
        };
        let stop_now = *self.stop.borrow();
        match stop_now {
            Stop::Run => {}
            Stop::ExportClosed if go => {
                drop(attach);
                return self
                    .reply_error(
                        s,
                        option,
                        NBD_REP_ERR_UNKNOWN,
                        format!("export {:?} is being removed", req.name),
                    )
                    .await;
            }
            Stop::ExportClosed => {}
            Stop::Shutdown => {
                let _ = self
                    .reply_error(s, option, NBD_REP_ERR_SHUTDOWN, "server is shutting down")
                    .await;
                return Ok(Handled::Done(Step::Close));
            }
        }
        let read_only = target.read_only();
        let flags = transmission_flags(read_only, self.structured);
        let mut replies = vec![Info::Export { size, flags }];
        if req.requests.contains(&NBD_INFO_NAME) {
            replies.push(Info::Name(req.name.clone()));
        }
        if req.requests.contains(&NBD_INFO_DESCRIPTION) && !description.is_empty() {
            replies.push(Info::Description(description));
        }
        // Always sent: the spec says a server with non-default constraints SHOULD
        // advertise them; clients that did not ask are free to ignore it.
        replies.push(Info::BlockSize {
            min: MIN_BLOCK_SIZE,
            preferred: PREFERRED_BLOCK_SIZE,
            max: MAX_PAYLOAD,
        });
        for info in replies {
            self.reply(s, OptionReply::new(option, OptionReplyBody::Info(info)))
                .await?;
        }
        self.ack(s, option).await?;
        let Some(attach) = attach else {
            return Ok(Handled::Continue);
        };
        let base_allocation = self
            .meta
            .as_ref()
            .is_some_and(|m| m.base_allocation && m.export == req.name);
        info!(export = %req.name, size, read_only, structured = self.structured, base_allocation, "client entered transmission");
        Ok(Handled::Done(Step::Transmit(Session {
            export: req.name,
            target,
            size,
            flags,
            structured: self.structured,
            base_allocation,
            strict_alignment: req.requests.contains(&NBD_INFO_BLOCK_SIZE),
            _attach: attach,
        })))
    }

    async fn export_name<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        name: String,
    ) -> Result<Handled, ConnError> {
        let attach = AttachGuard::new(&self.shared, self.conn, &name);
        let Opened { target, size, .. } = match self.open(&name).await {
            Ok(v) => v,
            Err((_, message)) => {
                debug!(message = %message, "NBD_OPT_EXPORT_NAME failed");
                return Err(ConnError::ExportName { name });
            }
        };
        let stop_now = *self.stop.borrow();
        if stop_now != Stop::Run {
            return Err(ConnError::ExportName { name });
        }
        let read_only = target.read_only();
        let flags = transmission_flags(read_only, self.structured);
        s.write_all(&encode_export_name_reply(size, flags, self.no_zeroes))
            .await?;
        s.flush().await?;
        let base_allocation = self
            .meta
            .as_ref()
            .is_some_and(|m| m.base_allocation && m.export == name);
        info!(export = %name, size, read_only, "client entered transmission (NBD_OPT_EXPORT_NAME)");
        Ok(Handled::Done(Step::Transmit(Session {
            export: name,
            target,
            size,
            flags,
            structured: self.structured,
            base_allocation,
            strict_alignment: false,
            _attach: attach,
        })))
    }
}

/// An export opened for a connection.
struct Opened {
    target: Arc<dyn ExportTarget>,
    size: u64,
    description: String,
}

/// Transmission flags for an export.
fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        flags |= NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO;
    }
    if structured {
        // DF is only meaningful (and only allowed) with structured replies.
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}
