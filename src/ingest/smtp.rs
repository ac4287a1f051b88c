//! The embedded SMTP listener: mailin's protocol core driven from tokio.
//!
//! `mailin::Session` sequences the dialogue (HELO/EHLO, MAIL, RCPT, DATA, RSET, QUIT,
//! STARTTLS, 503 for commands out of order) and asks our [`Policy`] about recipients.
//! This driver does what mailin-embedded's blocking thread pool cannot:
//! - reads with bounds: a command line over 4 KiB closes the connection with `500`, the
//!   message size is enforced while reading (`SIZE` advertised and honoured), every read
//!   has a timeout and the whole session a deadline;
//! - caps connections in all and per client address, and shuts out addresses that fail
//!   AUTH too often;
//! - parses `MAIL FROM`/`RCPT TO` itself (mailin rejects the null sender `<>` and ESMTP
//!   parameters such as `SIZE=`), handing mailin a canonical line, and applies the sender
//!   allowlist, `require_tls` and `require_auth`;
//! - upgrades the stream on STARTTLS (rustls), throwing away anything the client pipelined
//!   in plain text, and answers AUTH PLAIN/LOGIN itself (only over TLS; mailin's own AUTH
//!   would make authentication mandatory for everyone);
//! - answers the end of DATA itself: `250` only after the alert is committed to the
//!   store, `451` when it cannot be stored, `552` when it was too big;
//! - answers `421` and closes when the daemon shuts down or the client goes silent.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use mailin::{Action, Handler, Response, SessionBuilder};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::alert::Envelope;
use crate::config::AddressPatterns;
use crate::metrics::Metrics;
use crate::settings::{Live, Settings};
use crate::store::{Inserted, NewAlert, Store};

/// The longest command line accepted outside DATA (RFC 5321 asks for 512).
pub const MAX_COMMAND_LINE: usize = 4096;
/// Recipients per message; RFC 5321 requires at least 100.
const MAX_RECIPIENTS: usize = 100;
/// DATA is read in pieces of at most this size, whatever the line length.
const DATA_CHUNK: usize = 64 * 1024;
/// The window over which failed AUTH attempts are counted.
const AUTH_WINDOW: Duration = Duration::from_secs(15 * 60);
/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every SMTP connection shares.
#[derive(Debug)]
pub struct Context {
    /// The settings in force; each connection takes the version current when it opens.
    pub live: Live,
    pub store: Store,
    /// Notified after each stored alert, so the dispatcher routes it at once.
    pub wake: Arc<Notify>,
    pub guard: Arc<Guard>,
    pub metrics: Arc<Metrics>,
}

/// Per-address bookkeeping: open connections and recent failed AUTH attempts.
#[derive(Debug, Default)]
pub struct Guard {
    inner: Mutex<GuardState>,
}

#[derive(Debug, Default)]
struct GuardState {
    open: HashMap<IpAddr, usize>,
    auth_failures: HashMap<IpAddr, VecDeque<Instant>>,
}

/// Why a connection is turned away at the door.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    TooManyFromAddress,
    ShutOut,
}

/// An admitted connection; gives its place back when dropped.
#[derive(Debug)]
struct Ticket {
    guard: Arc<Guard>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.guard.lock();
        if let Some(n) = state.open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                state.open.remove(&self.ip);
            }
        }
    }
}

impl Guard {
    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_per_ip: usize,
        max_failures: u32,
    ) -> Result<Ticket, Refusal> {
        let mut state = self.lock();
        if Self::failures(&mut state, ip) >= max_failures as usize && max_failures > 0 {
            return Err(Refusal::ShutOut);
        }
        let open = state.open.entry(ip).or_insert(0);
        if *open >= max_per_ip {
            return Err(Refusal::TooManyFromAddress);
        }
        *open += 1;
        Ok(Ticket {
            guard: Arc::clone(self),
            ip,
        })
    }

    /// Records a failed AUTH; true when the address is now shut out.
    fn auth_failed(&self, ip: IpAddr, max_failures: u32) -> bool {
        let mut state = self.lock();
        state
            .auth_failures
            .entry(ip)
            .or_default()
            .push_back(Instant::now());
        Self::failures(&mut state, ip) >= max_failures as usize
    }

    /// Failures of `ip` within the window (older ones are forgotten here).
    fn failures(state: &mut GuardState, ip: IpAddr) -> usize {
        let Some(list) = state.auth_failures.get_mut(&ip) else {
            return 0;
        };
        while list.front().is_some_and(|t| t.elapsed() > AUTH_WINDOW) {
            list.pop_front();
        }
        let n = list.len();
        if n == 0 {
            state.auth_failures.remove(&ip);
        }
        n
    }
}

/// Accepts connections until `shutdown`; each one runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // The total cap is fixed at start; everything else follows reloads.
    let slots = Arc::new(Semaphore::new(ctx.live.load().config.smtp.max_connections));
    loop {
        let (mut stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = %e, "cannot accept an SMTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let settings = ctx.live.load_full();
        let smtp = &settings.config.smtp;
        let refusal = match (
            Arc::clone(&slots).try_acquire_owned(),
            ctx.guard.admit(
                peer.ip(),
                smtp.max_connections_per_ip,
                smtp.max_auth_failures,
            ),
        ) {
            (Ok(permit), Ok(ticket)) => {
                let ctx = Arc::clone(&ctx);
                let shutdown = shutdown.clone();
                let settings = Arc::clone(&settings);
                tracker.spawn(async move {
                    if let Err(e) = handle(stream, peer, &ctx, settings, &shutdown).await {
                        debug!(%peer, error = %e, "SMTP connection ended with an error");
                    }
                    drop((permit, ticket));
                });
                continue;
            }
            (Err(_), _) => {
                ctx.metrics.reject("smtp", "too_many_connections");
                warn!(%peer, limit = smtp.max_connections, "too many SMTP connections; refusing one");
                "421 4.7.0 too many connections, try again later"
            }
            (_, Err(Refusal::TooManyFromAddress)) => {
                ctx.metrics.reject("smtp", "too_many_connections");
                warn!(%peer, limit = smtp.max_connections_per_ip, "too many SMTP connections from one address; refusing one");
                "421 4.7.0 too many connections from your address, try again later"
            }
            (_, Err(Refusal::ShutOut)) => {
                ctx.metrics.reject("smtp", "shut_out");
                warn!(%peer, "address shut out after failed AUTH attempts; refusing a connection");
                "421 4.7.0 too many failed authentications from your address, try again later"
            }
        };
        tracker.spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                stream.write_all(format!("{refusal}\r\n").as_bytes()),
            )
            .await;
        });
    }
}

/// The recipient policy mailin consults.
struct Policy {
    recipients: Option<AddressPatterns>,
}

impl Handler for Policy {
    fn rcpt(&mut self, to: &str) -> Response {
        match &self.recipients {
            Some(allowed) if !allowed.matches(to) => {
                Response::custom(550, "5.7.1 recipient not accepted here".to_string())
            }
            _ => mailin::response::OK,
        }
    }
}

/// One line (or piece of a line) read from the client.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Ended with `\n`.
    Line,
    /// `max` bytes without a `\n`.
    Partial,
    Eof,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

/// How one phase of the dialogue (plain text, or after STARTTLS) ended.
enum Ending<S> {
    Closed,
    /// The client asked for STARTTLS and was told to go ahead: here is the stream.
    StartTls(S),
}

/// Runs one SMTP session over any byte stream (tests drive it in memory).
pub async fn handle<S>(
    stream: S,
    peer: SocketAddr,
    ctx: &Context,
    settings: Arc<Settings>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let smtp = &settings.config.smtp;
    let mut builder = SessionBuilder::new(smtp.hostname.clone());
    if settings.tls.is_some() {
        builder.enable_start_tls();
    }
    let mut conn = Conn {
        ctx,
        settings: Arc::clone(&settings),
        peer,
        session: builder.build(
            peer.ip(),
            Policy {
                recipients: smtp.recipients.clone(),
            },
        ),
        envelope: Envelope::default(),
        greeted: false,
        tls: false,
        user: None,
        deadline: Instant::now() + smtp.session_timeout,
    };
    let mut stream = stream;
    stream
        .write_all(format!("220 {} ESMTP mailcall\r\n", smtp.hostname).as_bytes())
        .await?;
    let Ending::StartTls(stream) = conn.dialogue(stream, shutdown).await? else {
        return Ok(());
    };
    let Some(tls) = &settings.tls else {
        return Ok(());
    };
    let tls_stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SessionError::Handshake(e.to_string())),
            Err(_) => return Err(SessionError::Handshake("timed out".into())),
        };
    conn.started_tls();
    conn.dialogue(tls_stream, shutdown).await?;
    Ok(())
}

/// The state of one connection across STARTTLS.
struct Conn<'a> {
    ctx: &'a Context,
    /// The settings this connection started with.
    settings: Arc<Settings>,
    peer: SocketAddr,
    session: mailin::Session<Policy>,
    envelope: Envelope,
    greeted: bool,
    tls: bool,
    /// The authenticated user, after a successful AUTH.
    user: Option<String>,
    deadline: Instant,
}

/// What a read for the next command produced.
enum Input {
    Line,
    /// The session must end; the reply to send first, if any.
    End(Option<String>),
}

impl Conn<'_> {
    /// RFC 3207: after STARTTLS the client starts over, knowing nothing from before.
    fn started_tls(&mut self) {
        self.session.tls_active();
        self.tls = true;
        self.greeted = false;
        self.user = None;
        self.envelope = Envelope::default();
    }

    /// Reads one command line, within the idle timeout and the session deadline.
    async fn read_command<R: AsyncBufRead + Unpin>(
        &self,
        reader: &mut R,
        line: &mut Vec<u8>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Input> {
        let settings = Arc::clone(&self.settings);
        let smtp = &settings.config.smtp;
        let host = &smtp.hostname;
        let now = Instant::now();
        if now >= self.deadline {
            return Ok(Input::End(Some(format!(
                "421 4.4.2 {host} session too long, closing"
            ))));
        }
        let wait = smtp.timeout.min(self.deadline - now);
        line.clear();
        let read = tokio::select! {
            () = shutdown.cancelled() => {
                return Ok(Input::End(Some(format!("421 4.3.2 {host} shutting down, try again later"))));
            }
            r = tokio::time::timeout(wait, read_piece(reader, line, MAX_COMMAND_LINE)) => r,
        };
        Ok(match read {
            Err(_) if Instant::now() >= self.deadline => {
                Input::End(Some(format!("421 4.4.2 {host} session too long, closing")))
            }
            Err(_) => Input::End(Some(format!("421 4.4.2 {host} idle for too long, closing"))),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Read::Eof)) => Input::End(None),
            Ok(Ok(Read::Partial)) => {
                warn!(peer = %self.peer, "SMTP command line longer than {MAX_COMMAND_LINE} bytes; closing");
                Input::End(Some("500 5.5.2 line too long, closing".into()))
            }
            Ok(Ok(Read::Line)) => Input::Line,
        })
    }

    /// The dialogue over one stream, until the client leaves or asks for STARTTLS.
    async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: S,
        shutdown: &CancellationToken,
    ) -> Result<Ending<S>, SessionError> {
        let settings = Arc::clone(&self.settings);
        let smtp = &settings.config.smtp;
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = BufReader::with_capacity(8 * 1024, read);
        let mut line = Vec::with_capacity(256);
        loop {
            if let Input::End(last) = self.read_command(&mut reader, &mut line, shutdown).await? {
                if let Some(text) = last {
                    reply(&mut write, &text).await?;
                }
                return Ok(Ending::Closed);
            }
            let command = canonical_line(&line);
            let verb = command
                .get(..4)
                .map(|v| v.to_ascii_uppercase())
                .unwrap_or_default();
            let response = match verb.as_slice() {
                b"MAIL" => match self.mail(&command) {
                    Ok(response) => response,
                    Err(text) => {
                        reply(&mut write, &text).await?;
                        continue;
                    }
                },
                b"RCPT" => match self.rcpt(&command) {
                    Ok(response) => response,
                    Err(text) => {
                        reply(&mut write, &text).await?;
                        continue;
                    }
                },
                b"EHLO" | b"HELO" => {
                    let response = self.session.process(&command);
                    self.greeted |= response.code == 250;
                    if verb == *b"EHLO" && response.code == 250 {
                        write.write_all(self.ehlo_reply().as_bytes()).await?;
                        continue;
                    }
                    response
                }
                b"AUTH" => {
                    let text = self
                        .auth(&command, &mut reader, &mut write, shutdown)
                        .await?;
                    reply(&mut write, &text).await?;
                    if text.starts_with("421") {
                        return Ok(Ending::Closed);
                    }
                    continue;
                }
                b"STAR" if self.settings.tls.is_some() && !self.tls => {
                    let response = self.session.process(&command);
                    if response.action == Action::UpgradeTls {
                        reply(&mut write, "220 2.0.0 ready to start TLS").await?;
                        // Whatever the client pipelined after STARTTLS stays behind in
                        // `reader` and is dropped here (RFC 3207, CVE-2011-0411).
                        return Ok(Ending::StartTls(reader.into_inner().unsplit(write)));
                    }
                    response
                }
                b"RSET" => {
                    self.envelope = Envelope::default();
                    self.session.process(&command)
                }
                _ => self.session.process(&command),
            };
            write.write_all(&response.buffer()?).await?;
            if response.action == Action::Close {
                return Ok(Ending::Closed);
            }
            if response.code != 354 {
                continue;
            }

            // DATA: read the message ourselves, with the size bound and the shutdown check.
            let data = tokio::select! {
                () = shutdown.cancelled() => {
                    reply(&mut write, &format!("421 4.3.2 {} shutting down, message not accepted; try again later", smtp.hostname)).await?;
                    return Ok(Ending::Closed);
                }
                d = read_data(&mut reader, smtp.max_message_bytes, smtp.timeout, self.deadline) => d?,
            };
            // Let mailin leave its DATA state; its answer is replaced by ours.
            let _ = self.session.process(b".\r\n");
            let envelope = std::mem::take(&mut self.envelope);
            match data {
                Data::Eof => return Ok(Ending::Closed),
                Data::TimedOut => {
                    reply(
                        &mut write,
                        &format!("421 4.4.2 {} timeout during DATA, closing", smtp.hostname),
                    )
                    .await?;
                    return Ok(Ending::Closed);
                }
                Data::TooBig => {
                    self.ctx.metrics.reject("smtp", "size");
                    warn!(peer = %self.peer, from = ?envelope.mail_from, limit = smtp.max_message_bytes, "message too big; refused with 552");
                    reply(&mut write, &too_big(smtp.max_message_bytes)).await?;
                }
                Data::Message(raw) => {
                    let text = self.store(envelope, raw).await;
                    reply(&mut write, &text).await?;
                }
            }
        }
    }

    /// Stores a received message; the reply is `250` only once it is committed.
    async fn store(&self, envelope: Envelope, raw: Vec<u8>) -> String {
        let bytes = raw.len();
        let peer = self.peer;
        let stored = self
            .ctx
            .store
            .insert_alert(NewAlert {
                source: "smtp",
                peer: Some(peer.to_string()),
                envelope: envelope.clone(),
                raw,
                ..NewAlert::default()
            })
            .await;
        match stored {
            Ok(Inserted { id, .. }) => {
                self.ctx.wake.notify_one();
                self.ctx.metrics.receive("smtp");
                info!(alert = id, %peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, bytes, tls = self.tls, user = ?self.user, "mail accepted and stored");
                format!("250 2.0.0 queued as alert {id}")
            }
            Err(e) => {
                self.ctx.metrics.reject("smtp", "store");
                error!(%peer, from = ?envelope.mail_from, error = %e, "cannot store a mail; answered 451 so the sender retries");
                "451 4.3.0 cannot store the message right now, try again later".into()
            }
        }
    }

    /// `MAIL FROM`: our checks, then mailin's sequencing. `Err` is a reply of our own.
    fn mail(&mut self, command: &[u8]) -> Result<Response, String> {
        let settings = Arc::clone(&self.settings);
        let smtp = &settings.config.smtp;
        let Some(mail) = parse_mail_from(command) else {
            return Err("501 5.5.4 syntax: MAIL FROM:<address> [SIZE=n]".into());
        };
        let refuse = |reason: &'static str, reply: String| {
            self.ctx.metrics.reject("smtp", reason);
            Err(reply)
        };
        if mail.size.is_some_and(|s| s > smtp.max_message_bytes as u64) {
            return refuse("size", too_big(smtp.max_message_bytes));
        }
        if smtp.require_tls && !self.tls {
            return refuse(
                "tls_required",
                "530 5.7.0 must issue a STARTTLS command first".into(),
            );
        }
        if smtp.require_auth && self.user.is_none() {
            return refuse("auth_required", "530 5.7.0 authentication required".into());
        }
        if let Some(senders) = &smtp.senders {
            let from = mail.address.as_deref().unwrap_or("");
            if !senders.matches(from) {
                warn!(peer = %self.peer, from, "sender refused: not in [smtp] senders");
                return refuse("sender", "550 5.7.1 sender not accepted here".into());
            }
        }
        if !self.greeted {
            // Crude monitoring scripts skip HELO; accept them as Postfix does by default
            // (smtpd_helo_required = no).
            let _ = self.session.process(b"HELO unknown\r\n");
            self.greeted = true;
        }
        let path = mail.address.as_deref().unwrap_or("MAILER-DAEMON");
        let body = if mail.eight_bit { " BODY=8BITMIME" } else { "" };
        let response = self
            .session
            .process(format!("MAIL FROM:<{path}>{body}\r\n").as_bytes());
        if response.code == 250 {
            self.envelope = Envelope {
                mail_from: mail.address,
                rcpt_to: Vec::new(),
            };
        }
        Ok(response)
    }

    /// `RCPT TO`: the recipient allowlist is mailin's [`Policy`].
    fn rcpt(&mut self, command: &[u8]) -> Result<Response, String> {
        let Some(address) = parse_rcpt_to(command) else {
            return Err("501 5.5.4 syntax: RCPT TO:<address>".into());
        };
        if self.envelope.rcpt_to.len() >= MAX_RECIPIENTS {
            return Err("452 4.5.3 too many recipients".into());
        }
        let response = self
            .session
            .process(format!("RCPT TO:<{address}>\r\n").as_bytes());
        if response.code == 250 {
            self.envelope.rcpt_to.push(address);
        } else if response.code == 550 {
            self.ctx.metrics.reject("smtp", "recipient");
            warn!(peer = %self.peer, rcpt = %address, "recipient refused: not in [smtp] recipients");
        }
        Ok(response)
    }

    /// Our EHLO answer: mailin's lacks SIZE, and AUTH is ours.
    fn ehlo_reply(&self) -> String {
        let settings = Arc::clone(&self.settings);
        let smtp = &settings.config.smtp;
        let mut lines = vec![
            format!("{} greets you", smtp.hostname),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        lines.push(format!("SIZE {}", smtp.max_message_bytes));
        if self.settings.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.tls && !self.settings.secrets.smtp_passwords.is_empty() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
            .collect()
    }

    /// AUTH PLAIN and LOGIN (RFC 4954, 4616), only over TLS. Returns the final reply.
    async fn auth<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        command: &[u8],
        reader: &mut R,
        write: &mut W,
        shutdown: &CancellationToken,
    ) -> Result<String, SessionError> {
        let settings = Arc::clone(&self.settings);
        let smtp = &settings.config.smtp;
        if self.settings.secrets.smtp_passwords.is_empty() {
            return Ok("503 5.5.1 AUTH is not offered here".into());
        }
        if !self.tls {
            return Ok("538 5.7.11 encryption required: issue STARTTLS first".into());
        }
        if !self.greeted || self.user.is_some() || self.envelope.mail_from.is_some() {
            return Ok("503 5.5.1 AUTH is allowed once, after EHLO and before MAIL".into());
        }
        let text = String::from_utf8_lossy(command);
        let mut words = text.split_ascii_whitespace().skip(1);
        let mechanism = words.next().unwrap_or_default().to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let mut line = Vec::new();
        // Reads one client response to a 334 challenge; `None` means cancelled or gone.
        let mut challenge = async |prompt: &str| -> Result<Option<Vec<u8>>, SessionError> {
            reply(write, &format!("334 {prompt}")).await?;
            match self.read_command(reader, &mut line, shutdown).await? {
                Input::End(_) => Ok(None),
                Input::Line => {
                    let answer = String::from_utf8_lossy(&line).trim().to_string();
                    if answer == "*" {
                        return Ok(None);
                    }
                    Ok(base64::engine::general_purpose::STANDARD
                        .decode(answer)
                        .ok())
                }
            }
        };
        let decode = |s: &str| {
            if s == "=" {
                Some(Vec::new())
            } else {
                base64::engine::general_purpose::STANDARD.decode(s).ok()
            }
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => {
                let blob = match initial.as_deref() {
                    Some(i) => decode(i),
                    None => challenge("").await?,
                };
                blob.and_then(|b| {
                    let mut parts = b
                        .split(|&c| c == 0)
                        .map(|p| String::from_utf8_lossy(p).to_string());
                    let (_authzid, user, pass) = (parts.next()?, parts.next()?, parts.next()?);
                    Some((user, pass))
                })
            }
            "LOGIN" => {
                let user = match initial.as_deref() {
                    Some(i) => decode(i),
                    None => challenge("VXNlcm5hbWU6").await?,
                };
                match user {
                    Some(user) => challenge("UGFzc3dvcmQ6").await?.map(|pass| {
                        (
                            String::from_utf8_lossy(&user).to_string(),
                            String::from_utf8_lossy(&pass).to_string(),
                        )
                    }),
                    None => None,
                }
            }
            _ => {
                return Ok("504 5.5.4 unrecognized authentication type; use PLAIN or LOGIN".into());
            }
        };
        let Some((user, pass)) = credentials else {
            return Ok("501 5.5.2 authentication cancelled or malformed".into());
        };
        let ok = settings
            .secrets
            .smtp_passwords
            .get(&user)
            .is_some_and(|expected| bool::from(pass.as_bytes().ct_eq(expected.as_bytes())));
        if ok {
            info!(peer = %self.peer, user = %user, "SMTP AUTH succeeded");
            self.user = Some(user);
            return Ok("235 2.7.0 authentication successful".into());
        }
        let shut_out = self
            .ctx
            .guard
            .auth_failed(self.peer.ip(), smtp.max_auth_failures);
        self.ctx.metrics.reject("smtp", "auth_failed");
        warn!(peer = %self.peer, user = %user, shut_out, "SMTP AUTH failed");
        if shut_out {
            return Ok(format!(
                "421 4.7.0 {} too many failed authentications, closing",
                smtp.hostname
            ));
        }
        Ok("535 5.7.8 authentication credentials invalid".into())
    }
}

fn too_big(max: usize) -> String {
    format!("552 5.3.4 message exceeds the limit of {max} bytes")
}

async fn reply<W: AsyncWrite + Unpin>(write: &mut W, text: &str) -> std::io::Result<()> {
    write.write_all(format!("{text}\r\n").as_bytes()).await
}

/// What DATA produced.
#[derive(Debug)]
enum Data {
    Message(Vec<u8>),
    TooBig,
    TimedOut,
    Eof,
}

/// Reads DATA up to the lone `.` line, undoing dot-stuffing. Bytes beyond `max` are read
/// and thrown away, so the client hears `552` and the session stays usable.
async fn read_data<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    timeout: Duration,
    deadline: Instant,
) -> std::io::Result<Data> {
    let mut message = Vec::with_capacity(8 * 1024);
    let mut piece = Vec::with_capacity(DATA_CHUNK);
    let mut too_big = false;
    let mut at_line_start = true;
    loop {
        piece.clear();
        let wait = timeout.min(deadline.saturating_duration_since(Instant::now()));
        let read =
            match tokio::time::timeout(wait, read_piece(reader, &mut piece, DATA_CHUNK)).await {
                Err(_) => return Ok(Data::TimedOut),
                Ok(r) => r?,
            };
        if read == Read::Eof {
            return Ok(Data::Eof);
        }
        let mut bytes = piece.as_slice();
        if at_line_start && read == Read::Line && (bytes == b".\r\n" || bytes == b".\n") {
            return Ok(if too_big {
                Data::TooBig
            } else {
                Data::Message(message)
            });
        }
        if at_line_start && bytes.first() == Some(&b'.') {
            bytes = &bytes[1..];
        }
        at_line_start = read == Read::Line;
        if !too_big && message.len() + bytes.len() > max {
            too_big = true;
            message = Vec::new();
        }
        if !too_big {
            message.extend_from_slice(bytes);
        }
    }
}

/// Appends bytes up to and including the next `\n`, or `max` bytes, whichever is first.
async fn read_piece<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Read> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                Read::Eof
            } else {
                Read::Partial
            });
        }
        let room = max - buf.len();
        let window = &available[..available.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&window[..=i]);
            reader.consume(i + 1);
            return Ok(Read::Line);
        }
        let n = window.len();
        buf.extend_from_slice(window);
        reader.consume(n);
        if buf.len() >= max {
            return Ok(Read::Partial);
        }
    }
}

/// The line with a `\r\n` ending whatever the client sent (mailin insists on CRLF; some
/// monitoring scripts send bare LF).
fn canonical_line(line: &[u8]) -> Vec<u8> {
    let mut out = line.strip_suffix(b"\n").unwrap_or(line).to_vec();
    if out.last() == Some(&b'\r') {
        out.pop();
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `MAIL FROM:<address> [params]`, as far as mailcall cares.
#[derive(Debug, PartialEq, Eq)]
struct MailFrom {
    /// `None` for the null reverse path `<>`.
    address: Option<String>,
    size: Option<u64>,
    eight_bit: bool,
}

fn parse_mail_from(line: &[u8]) -> Option<MailFrom> {
    let (address, params) = parse_path(line, "MAIL FROM:")?;
    let mut mail = MailFrom {
        address: (!address.is_empty()).then_some(address),
        size: None,
        eight_bit: false,
    };
    for param in params.split_ascii_whitespace() {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        if key.eq_ignore_ascii_case("SIZE") {
            mail.size = Some(value.parse().ok()?);
        } else if key.eq_ignore_ascii_case("BODY") {
            mail.eight_bit = value.eq_ignore_ascii_case("8BITMIME");
        }
    }
    Some(mail)
}

fn parse_rcpt_to(line: &[u8]) -> Option<String> {
    let (address, _params) = parse_path(line, "RCPT TO:")?;
    (!address.is_empty()).then_some(address)
}

/// Splits `VERB:<path> params` into the path and the parameters.
fn parse_path(line: &[u8], prefix: &str) -> Option<(String, String)> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let head = line.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = line[prefix.len()..].trim_start();
    let (path, params) = if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        (&inner[..end], &inner[end + 1..])
    } else {
        rest.split_once(' ').unwrap_or((rest, ""))
    };
    // A source route (`@a,@b:user@host`) is obsolete; keep the mailbox.
    let path = path.rsplit_once(':').map_or(path, |(_, mailbox)| mailbox);
    if path.contains(|c: char| c.is_whitespace() || c.is_control() || c == '<' || c == '>') {
        return None;
    }
    Some((path.to_string(), params.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn mail_from_variants() {
        let m = parse_mail_from(b"MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME\r\n").unwrap();
        assert_eq!(
            m,
            MailFrom {
                address: Some("a@b.example".into()),
                size: Some(1234),
                eight_bit: true
            }
        );
        let m = parse_mail_from(b"mail from:<>\r\n").unwrap();
        assert_eq!(m.address, None);
        let m = parse_mail_from(b"MAIL FROM: <x@y>\r\n").unwrap();
        assert_eq!(m.address.as_deref(), Some("x@y"));
        let m = parse_mail_from(b"MAIL FROM:x@y\r\n").unwrap();
        assert_eq!(m.address.as_deref(), Some("x@y"));
        assert!(parse_mail_from(b"MAIL FROM:<a@b> SIZE=lots\r\n").is_none());
        assert!(parse_mail_from(b"MAIL TO:<a@b>\r\n").is_none());
        assert!(parse_mail_from(b"MAIL FROM:<a b@c>\r\n").is_none());
    }

    #[test]
    fn rcpt_to_variants() {
        assert_eq!(
            parse_rcpt_to(b"RCPT TO:<a@b> NOTIFY=NEVER\r\n").as_deref(),
            Some("a@b")
        );
        assert_eq!(
            parse_rcpt_to(b"rcpt to:<@relay:a@b>\r\n").as_deref(),
            Some("a@b")
        );
        assert_eq!(parse_rcpt_to(b"RCPT TO:<>\r\n"), None);
    }

    #[tokio::test]
    async fn read_piece_bounds_lines() {
        let mut r = BufReader::with_capacity(4, &b"abc\nlonglongline\n"[..]);
        let mut buf = Vec::new();
        assert_eq!(read_piece(&mut r, &mut buf, 100).await.unwrap(), Read::Line);
        assert_eq!(buf, b"abc\n");
        buf.clear();
        assert_eq!(
            read_piece(&mut r, &mut buf, 5).await.unwrap(),
            Read::Partial
        );
        assert_eq!(buf, b"longl");
        buf.clear();
        assert_eq!(read_piece(&mut r, &mut buf, 100).await.unwrap(), Read::Line);
        assert_eq!(buf, b"ongline\n");
        buf.clear();
        assert_eq!(read_piece(&mut r, &mut buf, 100).await.unwrap(), Read::Eof);
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_bounded() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nNEXT";
        let mut r = BufReader::new(&input[..]);
        match read_data(&mut r, 1000, Duration::from_secs(1), far())
            .await
            .unwrap()
        {
            Data::Message(m) => assert_eq!(m, b"Subject: x\r\n\r\n.leading dot\r\n"),
            other => panic!("{other:?}"),
        }
        let mut r = BufReader::new(&input[..]);
        assert!(matches!(
            read_data(&mut r, 10, Duration::from_secs(1), far())
                .await
                .unwrap(),
            Data::TooBig
        ));
        // The rest of the stream is still there for the next command.
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut rest)
            .await
            .unwrap();
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn a_dot_inside_a_long_line_does_not_end_data() {
        let mut input = vec![b'x'; DATA_CHUNK];
        input.extend_from_slice(b".\r\n.\r\n");
        let mut r = BufReader::new(&input[..]);
        match read_data(&mut r, usize::MAX, Duration::from_secs(1), far())
            .await
            .unwrap()
        {
            Data::Message(m) => assert_eq!(m.len(), DATA_CHUNK + 3),
            other => panic!("{other:?}"),
        }
    }
}
