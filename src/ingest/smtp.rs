//! The embedded SMTP listener: an explicit RFC 5321 state machine, driven from tokio.
//!
//! # Layout
//! - [`serve`] accepts connections and admits each one through two caps: the total
//!   (`max_connections`, a semaphore) and the per-address one kept by [`Guard`].
//! - A `Session` is where one client's dialogue stands (`Phase`, the envelope, TLS,
//!   the authenticated user) and decides everything: `Session::command` turns a
//!   command line into a `Step` without doing any I/O, and every answer is a typed
//!   `Reply` (code, RFC 3463 enhanced status, text), never a string matched by prefix.
//! - A `Wire` is the byte stream, generic over `AsyncRead + AsyncWrite` so tests drive
//!   sessions in memory: every read and every write has a timeout, every session a
//!   deadline, command lines and messages a size bound.
//! - `dialogue` carries the steps out: it writes replies, reads the message after
//!   `DATA` (`read_data`), runs the AUTH exchange or hands the stream over to TLS.
//!
//! # What it guarantees
//! - `250` after `DATA` only once the alert is committed to the store; any store error
//!   is a `451 4.3.0`, so the sender keeps the message and retries.
//! - Only `<CRLF>.<CRLF>` ends DATA, whatever `[smtp] bare_newline` says about lines
//!   ending in a bare `<LF>`: one DATA can never carry a second, smuggled message
//!   (CVE-2023-51764; Postfix's `smtpd_forbid_bare_newline`).
//! - `8BITMIME` and `SMTPUTF8` (RFC 6152, 6531) are advertised and honoured: UTF-8
//!   addresses and raw UTF-8 headers are stored as they came and decoded by mail-parser.
//! - Relay-friendly limits: a connection's place is given back the moment its session
//!   ends, before the last reply is written, so a relay that reconnects on reading `221`
//!   finds it free. A client over its per-address cap is still greeted and has only its
//!   transactions deferred with `451 4.7.0`: a `421` greeting would make a relay such as
//!   Postfix treat us as down for minutes, holding back every other message too.
//! - STARTTLS (rustls) discards whatever the client pipelined in plain text; AUTH
//!   PLAIN/LOGIN only over TLS, with a per-address failure limit.
//! - `421` before closing on shutdown, idle timeout and session deadline.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::alert::Envelope;
use crate::config::BareNewline;
use crate::metrics::Metrics;
use crate::settings::{Live, Settings};
use crate::store::{Inserted, NewAlert, Store, StoreError};

/// The longest command line accepted outside DATA (RFC 5321 asks for 512).
pub const MAX_COMMAND_LINE: usize = 4096;
/// Recipients per message; RFC 5321 requires at least 100.
const MAX_RECIPIENTS: usize = 100;
/// DATA is read in pieces of at most this size, whatever the line length.
const DATA_CHUNK: usize = 64 * 1024;
/// The window over which failed AUTH attempts are counted.
const AUTH_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Addresses whose failed AUTH attempts are remembered at once; a bound on that map.
const MAX_TRACKED_ADDRESSES: usize = 4096;
/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Syntax and sequence errors one session may make before it is closed (Postfix's
/// `smtpd_hard_error_limit`): a client that only sends garbage gets no more attention.
const MAX_ERRORS: u32 = 20;
/// The longest a refusal at the door (`421` before any greeting) may take to write.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Message bytes all sessions together hold in memory while they read DATA (at least
/// two messages of `max_message_bytes`); one client address holds at most half.
const DATA_BUDGET: usize = 64 * 1024 * 1024;

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
    /// Shared by every session's message in flight.
    pub data_budget: Arc<DataBudget>,
}

/// The memory budget for messages being read: 24 sessions each sending 9 MiB and
/// stalling before the final `.` must not mean 240 MiB. A message that finds no room
/// is read to its end and thrown away, and answered `452 4.3.1` (the sender retries);
/// one address holds at most half the budget, so the others still get in.
#[derive(Debug)]
pub struct DataBudget {
    limit: usize,
    per_address: usize,
    /// Bytes held in all, and per address.
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl DataBudget {
    /// A budget that holds at least two messages of `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Arc<DataBudget> {
        let limit = DATA_BUDGET.max(max_message_bytes.saturating_mul(2));
        Arc::new(DataBudget {
            limit,
            per_address: limit / 2,
            held: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `n` more bytes for `ip`, if both its share and the whole have room.
    fn take(&self, ip: IpAddr, n: usize) -> bool {
        let mut held = self.lock();
        let (total, per) = &mut *held;
        let mine = per.get(&ip).copied().unwrap_or(0);
        if total.saturating_add(n) > self.limit || mine.saturating_add(n) > self.per_address {
            return false;
        }
        *total += n;
        per.insert(ip, mine + n);
        true
    }

    fn give(&self, ip: IpAddr, n: usize) {
        let mut held = self.lock();
        let (total, per) = &mut *held;
        *total = total.saturating_sub(n);
        if let Some(mine) = per.get_mut(&ip) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                per.remove(&ip);
            }
        }
    }
}

/// One message's share of the [`DataBudget`] (none: unlimited), given back when dropped.
#[derive(Debug)]
struct DataHold {
    budget: Option<Arc<DataBudget>>,
    ip: IpAddr,
    bytes: usize,
}

impl DataHold {
    fn new(budget: Option<Arc<DataBudget>>, ip: IpAddr) -> DataHold {
        DataHold {
            budget,
            ip: address_key(ip),
            bytes: 0,
        }
    }

    /// Room for `n` more bytes; false when the budget has none.
    fn grow(&mut self, n: usize) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        let ok = budget.take(self.ip, n);
        if ok {
            self.bytes += n;
        }
        ok
    }

    fn release(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give(self.ip, std::mem::take(&mut self.bytes));
        }
    }
}

impl Drop for DataHold {
    fn drop(&mut self) {
        self.release();
    }
}

/// Per-address bookkeeping: open sessions and recent failed AUTH attempts.
#[derive(Debug, Default)]
pub struct Guard {
    inner: Mutex<GuardState>,
}

#[derive(Debug, Default)]
struct GuardState {
    sessions: HashMap<IpAddr, Sessions>,
    auth_failures: HashMap<IpAddr, VecDeque<Instant>>,
}

/// One address's sessions.
#[derive(Debug, Default)]
struct Sessions {
    open: usize,
    /// Those of them that may carry mail; at most `max_connections_per_ip`.
    carrying: usize,
}

/// Why a connection is turned away at the door.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    TooManyFromAddress,
    ShutOut,
}

/// An admitted session's place in its address's count; given back when dropped.
#[derive(Debug)]
struct Ticket {
    guard: Arc<Guard>,
    ip: IpAddr,
    /// Within the per-address cap. A session beyond it is greeted but its transactions
    /// are deferred until a place frees up.
    carrying: bool,
}

impl Ticket {
    /// Lets a deferred session carry mail if its address is back under `max_per_ip`.
    fn promote(&mut self, max_per_ip: usize) -> bool {
        if !self.carrying {
            let mut state = self.guard.lock();
            if let Some(s) = state.sessions.get_mut(&self.ip)
                && s.carrying < max_per_ip
            {
                s.carrying += 1;
                self.carrying = true;
            }
        }
        self.carrying
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.guard.lock();
        if let Some(s) = state.sessions.get_mut(&self.ip) {
            s.open -= 1;
            if self.carrying {
                s.carrying -= 1;
            }
            if s.open == 0 {
                state.sessions.remove(&self.ip);
            }
        }
    }
}

/// A session's places in both caps. The session drops it the moment it ends, before
/// writing its last reply, so the client can never reconnect before its place is free.
#[derive(Debug)]
struct Slot {
    /// `None` only in tests, which have no total cap.
    _permit: Option<OwnedSemaphorePermit>,
    ticket: Ticket,
}

impl Guard {
    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a connection from `ip`: within `max_per_ip` it may carry mail; a few more
    /// are admitted with their transactions deferred (as many again, but never more than
    /// a quarter of `max_total`, so one address cannot hold every place); beyond that,
    /// refused.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_per_ip: usize,
        max_total: usize,
        max_failures: u32,
    ) -> Result<Ticket, Refusal> {
        let ip = address_key(ip);
        let mut state = self.lock();
        if Self::is_shut_out(&mut state, ip, max_failures) {
            return Err(Refusal::ShutOut);
        }
        let sessions = state.sessions.entry(ip).or_default();
        let waiting = max_per_ip.min(max_total / 4);
        if sessions.open >= max_per_ip.saturating_add(waiting) {
            return Err(Refusal::TooManyFromAddress);
        }
        sessions.open += 1;
        let carrying = sessions.carrying < max_per_ip;
        if carrying {
            sessions.carrying += 1;
        }
        Ok(Ticket {
            guard: Arc::clone(self),
            ip,
            carrying,
        })
    }

    /// Whether `ip` has used up its failed AUTH attempts. Checked before every password
    /// comparison, so sessions opened before the limit was reached cannot keep guessing.
    fn shut_out(&self, ip: IpAddr, max_failures: u32) -> bool {
        Self::is_shut_out(&mut self.lock(), address_key(ip), max_failures)
    }

    fn is_shut_out(state: &mut GuardState, key: IpAddr, max_failures: u32) -> bool {
        max_failures > 0 && Self::failures(state, key) >= max_failures as usize
    }

    /// Records a failed AUTH; true when the address is now shut out.
    fn auth_failed(&self, ip: IpAddr, max_failures: u32) -> bool {
        let key = address_key(ip);
        let mut state = self.lock();
        if state.auth_failures.len() >= MAX_TRACKED_ADDRESSES {
            // Many addresses each failing once: forget those whose failures have aged out
            // so the map stays bounded by what the window can hold.
            state
                .auth_failures
                .retain(|_, list| list.back().is_some_and(|t| t.elapsed() <= AUTH_WINDOW));
            // Still full (failures from that many networks at once): forget the quietest.
            if state.auth_failures.len() >= MAX_TRACKED_ADDRESSES
                && let Some(quietest) = state
                    .auth_failures
                    .iter()
                    .min_by_key(|(_, list)| list.back().copied())
                    .map(|(ip, _)| *ip)
            {
                state.auth_failures.remove(&quietest);
            }
        }
        let list = state.auth_failures.entry(key).or_default();
        list.push_back(Instant::now());
        // Only the count up to the limit matters; keep no more than that per address.
        while list.len() > (max_failures as usize).max(1) {
            list.pop_front();
        }
        Self::is_shut_out(&mut state, key, max_failures)
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

/// The reply that ends a session whose address used up its failed AUTH attempts.
fn too_many_failures(host: &str) -> Reply {
    Reply::new(
        421,
        (4, 7, 0),
        format!("{host} too many failed authentications, closing"),
    )
}

/// The unit the per-address limits count: an IPv4 address, or an IPv6 /64 (one host
/// usually holds a whole /64, so counting single IPv6 addresses would limit nothing).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
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
        let admitted = match Arc::clone(&slots).try_acquire_owned() {
            Err(_) => Err(None),
            Ok(permit) => ctx
                .guard
                .admit(
                    peer.ip(),
                    smtp.max_connections_per_ip,
                    smtp.max_connections,
                    smtp.max_auth_failures,
                )
                .map(|ticket| Slot {
                    _permit: Some(permit),
                    ticket,
                })
                .map_err(Some),
        };
        let refusal = match admitted {
            Ok(slot) => {
                let ctx = Arc::clone(&ctx);
                let shutdown = shutdown.clone();
                let settings = Arc::clone(&settings);
                tracker.spawn(async move {
                    match session(stream, peer, &ctx, settings, slot, &shutdown).await {
                        Ok(()) => {}
                        Err(SessionError::WriteTimeout(timeout)) => {
                            ctx.metrics.reject("smtp", "write_timeout");
                            warn!(%peer, ?timeout, "SMTP client did not read our replies; closed its connection");
                        }
                        Err(e) => debug!(%peer, error = %e, "SMTP connection ended with an error"),
                    }
                });
                continue;
            }
            Err(None) => {
                ctx.metrics.reject("smtp", "too_many_connections");
                warn!(%peer, limit = smtp.max_connections, "too many SMTP connections in all; refusing one with 421");
                Reply::new(421, (4, 7, 0), "too many connections, try again later")
            }
            Err(Some(Refusal::TooManyFromAddress)) => {
                ctx.metrics.reject("smtp", "too_many_connections");
                warn!(%peer, limit = smtp.max_connections_per_ip, "twice max_connections_per_ip SMTP connections from one address; refusing one with 421");
                Reply::new(
                    421,
                    (4, 7, 0),
                    "too many connections from your address, try again later",
                )
            }
            Err(Some(Refusal::ShutOut)) => {
                ctx.metrics.reject("smtp", "shut_out");
                warn!(%peer, "address shut out after failed AUTH attempts; refusing a connection with 421");
                Reply::new(
                    421,
                    (4, 7, 0),
                    "too many failed authentications from your address, try again later",
                )
            }
        };
        tracker.spawn(async move {
            let _ =
                tokio::time::timeout(REFUSAL_TIMEOUT, stream.write_all(&refusal.to_bytes())).await;
        });
    }
}

/// An SMTP reply as a value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    code: u16,
    /// The RFC 3463 enhanced status code (class, subject, detail). RFC 2034 leaves it
    /// off the greeting and the HELO/EHLO answer, and 3xx replies need none.
    status: Option<(u8, u16, u16)>,
    /// One entry per line; never empty.
    lines: Vec<String>,
}

impl Reply {
    fn new(code: u16, status: (u8, u16, u16), text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code.
    fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: None,
            lines: vec![text.into()],
        }
    }

    /// The reply on the wire: `250-first`, …, `250 last`. Line breaks in the text (from
    /// a hostname, say) could forge a reply of their own, so they become spaces.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, text) in self.lines.iter().enumerate() {
            let separator = if i == last { ' ' } else { '-' };
            let text = text.replace(['\r', '\n'], " ");
            let _ = match self.status {
                Some((class, subject, detail)) => write!(
                    out,
                    "{}{separator}{class}.{subject}.{detail} {text}\r\n",
                    self.code
                ),
                None => write!(out, "{}{separator}{text}\r\n", self.code),
            };
        }
        out.into_bytes()
    }

    /// A syntax or sequence error, which counts towards [`MAX_ERRORS`].
    fn is_protocol_error(&self) -> bool {
        (500..=504).contains(&self.code)
    }
}

/// What the driver must do after a command.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Send the reply; read the next command.
    Reply(Reply),
    /// End the session: give its places back, then send the reply.
    Close(Reply),
    /// Send `354` and read the message.
    Data,
    /// Send `220` and hand the stream to TLS.
    StartTls,
    /// Run the AUTH exchange.
    Auth {
        mechanism: Mechanism,
        /// The initial response given with the command (RFC 4954).
        initial: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    Plain,
    Login,
}

/// Where a session stands in RFC 5321's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected (or restarted by STARTTLS); no HELO or EHLO yet.
    Connected,
    /// Greeted; no transaction open.
    Ready,
    /// `MAIL` accepted: recipients are being collected.
    Mail,
}

/// Why the client's input ended a session early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The client closed the connection.
    Eof,
    /// Silent for longer than `timeout`.
    Idle,
    /// The session reached `session_timeout`.
    Deadline,
    /// The daemon is shutting down.
    Shutdown,
    /// A command line over [`MAX_COMMAND_LINE`].
    LineTooLong,
    /// A line ended in a bare `<LF>` with `bare_newline = "reject"`.
    BareNewline,
}

/// What the session was reading when it was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum During {
    Command,
    /// A message; `bare_dot`: a `.` line ended by a bare `<LF>` came (and did not end
    /// it), which explains a client that then waits for our answer forever.
    Data {
        bare_dot: bool,
    },
}

/// Why a session ended with an error.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("the client did not read our replies for {0:?}")]
    WriteTimeout(Duration),
}

/// Why a dialogue ended before `QUIT`: carried by `?` out of any depth.
#[derive(Debug)]
enum Halt {
    /// Stopped by the client's input (or its silence); [`Session::stop`] says what to
    /// answer.
    Stop(Stop, During),
    Failed(SessionError),
}

impl From<SessionError> for Halt {
    fn from(e: SessionError) -> Halt {
        Halt::Failed(e)
    }
}

impl From<std::io::Error> for Halt {
    fn from(e: std::io::Error) -> Halt {
        Halt::Failed(SessionError::Io(e))
    }
}

/// How one phase of the dialogue (plain text, or after STARTTLS) ended.
enum Ending {
    Closed,
    /// The client asked for STARTTLS and was told to go ahead.
    StartTls,
}

/// Runs one SMTP session over any byte stream; `slot` is given back the moment it ends.
async fn session<S>(
    stream: S,
    peer: SocketAddr,
    ctx: &Context,
    settings: Arc<Settings>,
    slot: Slot,
    shutdown: &CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session::new(ctx, Arc::clone(&settings), peer, slot);
    let mut wire = Wire::new(stream, &session);
    let greeting = format!("{} ESMTP mailcall", settings.config.smtp.hostname);
    wire.send(&Reply::plain(220, greeting)).await?;
    if !run(&mut session, &mut wire, shutdown).await? {
        return Ok(());
    }
    let Some(tls) = &settings.tls else {
        // STARTTLS is only offered with a certificate.
        return Ok(());
    };
    // Whatever the client pipelined after STARTTLS is still in the wire's buffer and
    // is dropped with it (RFC 3207, CVE-2011-0411).
    let stream = wire.into_inner();
    let tls_stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SessionError::Handshake(e.to_string())),
            Err(_) => return Err(SessionError::Handshake("timed out".into())),
        };
    session.started_tls();
    let mut wire = Wire::new(tls_stream, &session);
    run(&mut session, &mut wire, shutdown).await?;
    Ok(())
}

/// One phase of the dialogue, with the last word when the client's input ends it.
/// True when the client asked for STARTTLS.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<'_>,
    wire: &mut Wire<S>,
    shutdown: &CancellationToken,
) -> Result<bool, SessionError> {
    match dialogue(session, wire, shutdown).await {
        Ok(Ending::Closed) => Ok(false),
        Ok(Ending::StartTls) => Ok(true),
        Err(Halt::Stop(stop, during)) => {
            if let Some(reply) = session.stop(stop, during) {
                wire.send(&reply).await?;
            }
            Ok(false)
        }
        Err(Halt::Failed(e)) => Err(e),
    }
}

/// Reads commands and carries out their steps until the session ends or starts TLS.
async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<'_>,
    wire: &mut Wire<S>,
    shutdown: &CancellationToken,
) -> Result<Ending, Halt> {
    let mut line = Vec::with_capacity(256);
    loop {
        wire.read_command(&mut line, shutdown).await?;
        let mut step = session.command(&line);
        // AUTH and DATA take another exchange with the client before their reply.
        loop {
            step = match step {
                Step::Reply(reply) => {
                    wire.send(&reply).await?;
                    break;
                }
                Step::Close(reply) => {
                    // The session is over: its places are free before the client can
                    // read this reply and reconnect.
                    session.release();
                    wire.send(&reply).await?;
                    return Ok(Ending::Closed);
                }
                Step::StartTls => {
                    wire.send(&Reply::new(220, (2, 0, 0), "ready to start TLS"))
                        .await?;
                    return Ok(Ending::StartTls);
                }
                Step::Auth { mechanism, initial } => {
                    match auth(wire, mechanism, initial, shutdown).await? {
                        Some((user, pass)) => session.authenticate(user, &pass),
                        None => Step::Reply(Reply::new(
                            501,
                            (5, 5, 2),
                            "authentication cancelled or malformed",
                        )),
                    }
                }
                Step::Data => {
                    wire.send(&Reply::plain(354, "end data with <CR><LF>.<CR><LF>"))
                        .await?;
                    let max = session.settings.config.smtp.max_message_bytes;
                    // Held until the message is stored (or refused).
                    let mut hold = DataHold::new(
                        Some(Arc::clone(&session.ctx.data_budget)),
                        session.peer.ip(),
                    );
                    Step::Reply(match wire.read_data(max, &mut hold, shutdown).await? {
                        Data::Message(raw) => session.deliver(raw).await,
                        Data::TooBig => session.too_big(),
                        Data::NoRoom => session.no_room(),
                    })
                }
            };
        }
    }
}

/// The AUTH exchange (RFC 4954, 4616): the credentials, or `None` when the client
/// cancelled or sent something that is not base64.
async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    mechanism: Mechanism,
    initial: Option<String>,
    shutdown: &CancellationToken,
) -> Result<Option<(String, String)>, Halt> {
    let decode = |s: &str| {
        if s == "=" {
            Some(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(s).ok()
        }
    };
    let mut line = Vec::new();
    // One answer to a 334 challenge; `*` cancels.
    let mut challenge = async |prompt: &str| -> Result<Option<Vec<u8>>, Halt> {
        wire.send(&Reply::plain(334, prompt)).await?;
        wire.read_command(&mut line, shutdown).await?;
        let answer = String::from_utf8_lossy(&line).trim().to_string();
        Ok(if answer == "*" { None } else { decode(&answer) })
    };
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    Ok(match mechanism {
        Mechanism::Plain => {
            let blob = match initial.as_deref() {
                Some(i) => decode(i),
                None => challenge("").await?,
            };
            blob.and_then(|b| {
                let mut parts = b.split(|&c| c == 0).map(lossy);
                let (_authzid, user, pass) = (parts.next()?, parts.next()?, parts.next()?);
                Some((user, pass))
            })
        }
        Mechanism::Login => {
            let user = match initial.as_deref() {
                Some(i) => decode(i),
                None => challenge("VXNlcm5hbWU6").await?,
            };
            match user {
                Some(user) => challenge("UGFzc3dvcmQ6")
                    .await?
                    .map(|pass| (lossy(&user), lossy(&pass))),
                None => None,
            }
        }
    })
}

/// One client's dialogue: the state machine. It does no I/O except through the store
/// in [`Session::deliver`].
struct Session<'a> {
    ctx: &'a Context,
    /// The settings this connection started with.
    settings: Arc<Settings>,
    peer: SocketAddr,
    phase: Phase,
    envelope: Envelope,
    /// The transaction was declared `SMTPUTF8` (logged; UTF-8 is accepted either way).
    utf8: bool,
    tls: bool,
    /// The authenticated user, after a successful AUTH.
    user: Option<String>,
    /// Syntax and sequence errors so far (since the last stored message).
    errors: u32,
    /// This transaction's `MAIL` was refused or deferred: the `RCPT`s and `DATA` a
    /// pipelining client sent with it get `503`, which is our doing, not its error.
    mail_refused: bool,
    deadline: Instant,
    /// `None` once the session has ended.
    slot: Option<Slot>,
}

impl<'a> Session<'a> {
    fn new(ctx: &'a Context, settings: Arc<Settings>, peer: SocketAddr, slot: Slot) -> Self {
        let deadline = Instant::now() + settings.config.smtp.session_timeout;
        Session {
            ctx,
            settings,
            peer,
            phase: Phase::Connected,
            envelope: Envelope::default(),
            utf8: false,
            tls: false,
            user: None,
            errors: 0,
            mail_refused: false,
            deadline,
            slot: Some(slot),
        }
    }

    fn host(&self) -> &str {
        &self.settings.config.smtp.hostname
    }

    /// Gives the connection's places back: the session is over, whatever is still to
    /// be written or closed.
    fn release(&mut self) {
        self.slot = None;
    }

    /// Decides what one command line (without its line ending) does.
    fn command(&mut self, line: &[u8]) -> Step {
        let (verb, args) = split_command(line);
        let step = match verb.as_str() {
            "EHLO" => self.hello(args, true),
            "HELO" => self.hello(args, false),
            "MAIL" => {
                let reply = self.mail(line);
                // A nested MAIL leaves the open transaction as it was.
                if reply.code != 503 {
                    self.mail_refused = reply.code >= 400;
                }
                Step::Reply(reply)
            }
            "RCPT" => Step::Reply(self.rcpt(line)),
            "DATA" => self.data(args),
            "RSET" => {
                self.reset();
                Step::Reply(Reply::new(250, (2, 0, 0), "reset"))
            }
            "NOOP" => Step::Reply(Reply::new(250, (2, 0, 0), "OK")),
            "QUIT" => Step::Close(Reply::new(
                221,
                (2, 0, 0),
                format!("{} closing connection", self.host()),
            )),
            "VRFY" => Step::Reply(Reply::new(
                252,
                (2, 5, 0),
                "cannot verify, but will take mail for accepted recipients",
            )),
            "HELP" => Step::Reply(Reply::new(
                214,
                (2, 0, 0),
                "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH",
            )),
            "STARTTLS" => self.starttls(args),
            "AUTH" => self.auth_command(args),
            "EXPN" | "BDAT" | "ETRN" | "TURN" | "ATRN" | "VERB" => {
                Step::Reply(Reply::new(502, (5, 5, 1), "command not implemented"))
            }
            _ => Step::Reply(Reply::new(500, (5, 5, 2), "command not recognized")),
        };
        let follows_refused_mail = self.mail_refused && matches!(verb.as_str(), "RCPT" | "DATA");
        if let Step::Reply(reply) = &step
            && reply.is_protocol_error()
            && !(follows_refused_mail && reply.code == 503)
        {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                warn!(peer = %self.peer, errors = self.errors, "too many SMTP syntax or sequence errors; closing");
                return Step::Close(Reply::new(
                    421,
                    (4, 7, 0),
                    format!("{} too many errors, closing", self.host()),
                ));
            }
        }
        step
    }

    /// `HELO`/`EHLO`: (re)starts the session; EHLO lists the extensions.
    fn hello(&mut self, args: &[u8], extended: bool) -> Step {
        if args.is_empty() {
            let verb = if extended { "EHLO" } else { "HELO" };
            return Step::Reply(Reply::new(
                501,
                (5, 5, 4),
                format!("syntax: {verb} hostname"),
            ));
        }
        self.reset();
        self.phase = Phase::Ready;
        if !extended {
            return Step::Reply(Reply::plain(250, self.host().to_string()));
        }
        let smtp = &self.settings.config.smtp;
        let mut lines = vec![
            format!("{} greets you", smtp.hostname),
            "PIPELINING".into(),
            format!("SIZE {}", smtp.max_message_bytes),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.settings.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.tls && !self.settings.secrets.smtp_passwords.is_empty() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Step::Reply(Reply {
            code: 250,
            status: None,
            lines,
        })
    }

    /// `MAIL FROM`: syntax, size, TLS and AUTH requirements, the sender allowlist, and
    /// the per-address cap, in that order.
    fn mail(&mut self, line: &[u8]) -> Reply {
        let settings = Arc::clone(&self.settings);
        let smtp = &settings.config.smtp;
        if self.phase == Phase::Mail {
            return Reply::new(503, (5, 5, 1), "nested MAIL command; RSET first");
        }
        let Some(mail) = parse_mail_from(line) else {
            return Reply::new(
                501,
                (5, 5, 4),
                "syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]",
            );
        };
        let from = mail.address.clone().unwrap_or_default();
        // Every refusal is counted and logged with the client and the sender.
        let refuse = |reason: &'static str, why: &str, reply: Reply| {
            self.ctx.metrics.reject("smtp", reason);
            warn!(peer = %self.peer, from = %from, code = reply.code, "{why}");
            reply
        };
        if mail.size.is_some_and(|s| s > smtp.max_message_bytes as u64) {
            return refuse(
                "size",
                "declared message size over max_message_bytes; refused",
                too_big(smtp.max_message_bytes),
            );
        }
        if smtp.require_tls && !self.tls {
            return refuse(
                "tls_required",
                "MAIL before STARTTLS refused: require_tls",
                Reply::new(530, (5, 7, 0), "must issue a STARTTLS command first"),
            );
        }
        if smtp.require_auth && self.user.is_none() {
            return refuse(
                "auth_required",
                "MAIL before AUTH refused: require_auth",
                Reply::new(530, (5, 7, 0), "authentication required"),
            );
        }
        if let Some(senders) = &smtp.senders
            && !senders.matches(&from)
        {
            return refuse(
                "sender",
                "sender refused: not in [smtp] senders",
                Reply::new(550, (5, 7, 1), "sender not accepted here"),
            );
        }
        let cap = smtp.max_connections_per_ip;
        if let Some(slot) = &mut self.slot
            && !slot.ticket.promote(cap)
        {
            return refuse(
                "too_many_connections",
                &format!(
                    "more than max_connections_per_ip = {cap} SMTP sessions from one address; deferred a transaction with 451"
                ),
                Reply::new(
                    451,
                    (4, 7, 0),
                    format!(
                        "too many concurrent sessions from your address (limit {cap}); message deferred, try again later"
                    ),
                ),
            );
        }
        // Crude monitoring scripts skip HELO; Postfix accepts them by default too
        // (`smtpd_helo_required = no`).
        self.phase = Phase::Mail;
        self.utf8 = mail.utf8;
        self.envelope = Envelope {
            mail_from: mail.address,
            rcpt_to: Vec::new(),
        };
        Reply::new(250, (2, 1, 0), "sender OK")
    }

    /// `RCPT TO`: the recipient allowlist and the recipient limit.
    fn rcpt(&mut self, line: &[u8]) -> Reply {
        if self.phase != Phase::Mail {
            return Reply::new(503, (5, 5, 1), "need MAIL before RCPT");
        }
        let Some(address) = parse_rcpt_to(line) else {
            return Reply::new(501, (5, 5, 4), "syntax: RCPT TO:<address>");
        };
        if self.envelope.rcpt_to.len() >= MAX_RECIPIENTS {
            warn!(peer = %self.peer, limit = MAX_RECIPIENTS, "too many recipients; the rest deferred with 452");
            return Reply::new(452, (4, 5, 3), "too many recipients");
        }
        if let Some(allowed) = &self.settings.config.smtp.recipients
            && !allowed.matches(&address)
        {
            self.ctx.metrics.reject("smtp", "recipient");
            warn!(peer = %self.peer, rcpt = %address, "recipient refused: not in [smtp] recipients");
            return Reply::new(550, (5, 7, 1), "recipient not accepted here");
        }
        self.envelope.rcpt_to.push(address);
        Reply::new(250, (2, 1, 5), "recipient OK")
    }

    /// `DATA`: allowed once there is a sender and a recipient.
    fn data(&mut self, args: &[u8]) -> Step {
        if !args.is_empty() {
            return Step::Reply(Reply::new(501, (5, 5, 4), "syntax: DATA"));
        }
        if self.phase != Phase::Mail {
            return Step::Reply(Reply::new(503, (5, 5, 1), "need MAIL and RCPT before DATA"));
        }
        if self.envelope.rcpt_to.is_empty() {
            return Step::Reply(Reply::new(554, (5, 5, 1), "no valid recipients"));
        }
        Step::Data
    }

    fn starttls(&mut self, args: &[u8]) -> Step {
        if self.settings.tls.is_none() {
            return Step::Reply(Reply::new(502, (5, 5, 1), "STARTTLS is not offered here"));
        }
        if self.tls {
            return Step::Reply(Reply::new(503, (5, 5, 1), "TLS is already active"));
        }
        if !args.is_empty() {
            return Step::Reply(Reply::new(501, (5, 5, 4), "syntax: STARTTLS"));
        }
        Step::StartTls
    }

    /// RFC 3207: after STARTTLS the client starts over, knowing nothing from before.
    fn started_tls(&mut self) {
        self.tls = true;
        self.phase = Phase::Connected;
        self.user = None;
        self.reset();
    }

    /// `AUTH`: offered only over TLS, once, before MAIL.
    fn auth_command(&mut self, args: &[u8]) -> Step {
        if self.settings.secrets.smtp_passwords.is_empty() {
            return Step::Reply(Reply::new(503, (5, 5, 1), "AUTH is not offered here"));
        }
        if !self.tls {
            return Step::Reply(Reply::new(
                538,
                (5, 7, 11),
                "encryption required: issue STARTTLS first",
            ));
        }
        if self.phase != Phase::Ready || self.user.is_some() {
            return Step::Reply(Reply::new(
                503,
                (5, 5, 1),
                "AUTH is allowed once, after EHLO and before MAIL",
            ));
        }
        let text = String::from_utf8_lossy(args);
        let mut words = text.split_ascii_whitespace();
        let mechanism = match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("PLAIN") => Mechanism::Plain,
            Some("LOGIN") => Mechanism::Login,
            _ => {
                return Step::Reply(Reply::new(
                    504,
                    (5, 5, 4),
                    "unrecognized authentication type; use PLAIN or LOGIN",
                ));
            }
        };
        Step::Auth {
            mechanism,
            initial: words.next().map(str::to_string),
        }
    }

    /// Checks AUTH credentials (in constant time) and counts failures per address.
    fn authenticate(&mut self, user: String, pass: &str) -> Step {
        let settings = Arc::clone(&self.settings);
        let max = settings.config.smtp.max_auth_failures;
        if self.ctx.guard.shut_out(self.peer.ip(), max) {
            self.ctx.metrics.reject("smtp", "auth_shut_out");
            warn!(peer = %self.peer, user = %user, "SMTP AUTH from a shut-out address");
            return Step::Close(too_many_failures(self.host()));
        }
        let ok = settings
            .secrets
            .smtp_passwords
            .get(&user)
            .is_some_and(|expected| bool::from(pass.as_bytes().ct_eq(expected.as_bytes())));
        if ok {
            info!(peer = %self.peer, user = %user, "SMTP AUTH succeeded");
            self.user = Some(user);
            return Step::Reply(Reply::new(235, (2, 7, 0), "authentication successful"));
        }
        let shut_out = self.ctx.guard.auth_failed(self.peer.ip(), max);
        self.ctx.metrics.reject("smtp", "auth_failed");
        warn!(peer = %self.peer, user = %user, shut_out, "SMTP AUTH failed");
        if shut_out {
            return Step::Close(too_many_failures(self.host()));
        }
        Step::Reply(Reply::new(
            535,
            (5, 7, 8),
            "authentication credentials invalid",
        ))
    }

    /// Forgets the transaction in progress (RSET, HELO/EHLO, STARTTLS, end of DATA).
    fn reset(&mut self) {
        if self.phase == Phase::Mail {
            self.phase = Phase::Ready;
        }
        self.envelope = Envelope::default();
        self.utf8 = false;
        self.mail_refused = false;
    }

    /// Stores a received message; the reply is `250` only once it is committed.
    async fn deliver(&mut self, raw: Vec<u8>) -> Reply {
        let envelope = std::mem::take(&mut self.envelope);
        let utf8 = self.utf8;
        self.reset();
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
                // As Postfix does: a client that delivers is not a garbage sender.
                self.errors = 0;
                self.ctx.wake.notify_one();
                self.ctx.metrics.receive("smtp");
                info!(alert = id, %peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, bytes, tls = self.tls, user = ?self.user, smtputf8 = utf8, "mail accepted and stored");
                Reply::new(250, (2, 0, 0), format!("queued as alert {id}"))
            }
            Err(e) => {
                self.ctx.metrics.reject("smtp", "store");
                let reply = store_failed(&e);
                error!(%peer, from = ?envelope.mail_from, error = %e, code = reply.code, "cannot store a mail");
                reply
            }
        }
    }

    /// A message over `max_message_bytes` was read to its end and thrown away.
    fn too_big(&mut self) -> Reply {
        let envelope = std::mem::take(&mut self.envelope);
        self.reset();
        let max = self.settings.config.smtp.max_message_bytes;
        self.ctx.metrics.reject("smtp", "size");
        warn!(peer = %self.peer, from = ?envelope.mail_from, limit = max, "message too big; refused with 552");
        too_big(max)
    }

    /// A message the memory budget had no room for was read to its end and thrown away.
    fn no_room(&mut self) -> Reply {
        let envelope = std::mem::take(&mut self.envelope);
        self.reset();
        self.ctx.metrics.reject("smtp", "memory");
        warn!(peer = %self.peer, from = ?envelope.mail_from, "too many messages in flight; refused with 452, the sender retries");
        Reply::new(
            452,
            (4, 3, 1),
            "too many messages in flight, try again later",
        )
    }

    /// The session is over because of the client's input: gives its places back, logs
    /// why, and says what to answer before closing.
    fn stop(&mut self, stop: Stop, during: During) -> Option<Reply> {
        self.release();
        let peer = self.peer;
        let host = self.host().to_string();
        let in_data = matches!(during, During::Data { .. });
        let timeout = self.settings.config.smtp.timeout;
        match stop {
            Stop::Eof => {
                if in_data {
                    info!(%peer, "SMTP client closed the connection during DATA; nothing was stored");
                }
                None
            }
            Stop::Idle if during == (During::Data { bare_dot: true }) => {
                self.ctx.metrics.reject("smtp", "bare_newline");
                warn!(%peer, ?timeout, "SMTP client went silent after ending a \".\" line with a bare LF; only <CRLF>.<CRLF> ends DATA, nothing was stored");
                Some(Reply::new(
                    421,
                    (4, 4, 2),
                    format!(
                        "{host} timeout during DATA: only <CR><LF>.<CR><LF> ends a message, closing"
                    ),
                ))
            }
            Stop::Idle => {
                info!(%peer, ?timeout, in_data, "SMTP client idle for too long; closing");
                let text = if in_data {
                    format!("{host} timeout during DATA, closing")
                } else {
                    format!("{host} idle for too long, closing")
                };
                Some(Reply::new(421, (4, 4, 2), text))
            }
            Stop::Deadline => {
                info!(%peer, in_data, "SMTP session reached session_timeout; closing");
                Some(Reply::new(
                    421,
                    (4, 4, 2),
                    format!("{host} session too long, closing"),
                ))
            }
            Stop::Shutdown => {
                let text = if in_data {
                    format!("{host} shutting down, message not accepted; try again later")
                } else {
                    format!("{host} shutting down, try again later")
                };
                Some(Reply::new(421, (4, 3, 2), text))
            }
            Stop::LineTooLong => {
                warn!(%peer, "SMTP command line longer than {MAX_COMMAND_LINE} bytes; closing");
                Some(Reply::new(500, (5, 5, 2), "line too long, closing"))
            }
            Stop::BareNewline => {
                self.ctx.metrics.reject("smtp", "bare_newline");
                warn!(%peer, in_data, "SMTP line ended in a bare LF; refused with 550 ([smtp] bare_newline = \"reject\")");
                Some(Reply::new(
                    550,
                    (5, 5, 2),
                    "bare <LF> received; end every line with <CR><LF>, closing",
                ))
            }
        }
    }
}

fn too_big(max: usize) -> Reply {
    Reply::new(
        552,
        (5, 3, 4),
        format!("message exceeds the limit of {max} bytes"),
    )
}

/// The answer to a store that could not take a message: a 4xx, so the sender keeps the
/// message and tries again — unless it can never fit (`552`).
fn store_failed(error: &StoreError) -> Reply {
    match error {
        // RFC 3463: 4.3.1 "mail system full"; the sender keeps it queued and retries.
        StoreError::Full { .. } => Reply::new(
            452,
            (4, 3, 1),
            "insufficient system storage, try again later",
        ),
        // Permanent: no amount of waiting makes room for it (RFC 3463 5.3.4).
        StoreError::TooBig { max_bytes, .. } => Reply::new(
            552,
            (5, 3, 4),
            format!("message too big for this server's store ({max_bytes} bytes)"),
        ),
        _ => Reply::new(
            451,
            (4, 3, 0),
            "cannot store the message right now, try again later",
        ),
    }
}

/// `VERB args` → the upper-cased verb and the trimmed arguments.
fn split_command(line: &[u8]) -> (String, &[u8]) {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let verb = String::from_utf8_lossy(&line[..end]).to_ascii_uppercase();
    (verb, line[end..].trim_ascii())
}

/// One session's byte stream, with a timeout on every read and every write.
struct Wire<S> {
    /// Buffered for reading; writes pass straight through.
    stream: BufReader<S>,
    /// The idle timeout, for reads and writes alike.
    timeout: Duration,
    deadline: Instant,
    bare_newline: BareNewline,
}

/// What DATA produced, when it ended normally.
#[derive(Debug, PartialEq, Eq)]
enum Data {
    /// The message: unstuffed, every line ending in `<CRLF>`.
    Message(Vec<u8>),
    /// Over the size limit: read to its end and thrown away.
    TooBig,
    /// No room in the [`DataBudget`]: read to its end and thrown away.
    NoRoom,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(stream: S, session: &Session<'_>) -> Wire<S> {
        let smtp = &session.settings.config.smtp;
        Wire {
            stream: BufReader::with_capacity(8 * 1024, stream),
            timeout: smtp.timeout,
            deadline: session.deadline,
            bare_newline: smtp.bare_newline,
        }
    }

    /// The stream, dropping whatever the client sent that was not read yet.
    fn into_inner(self) -> S {
        self.stream.into_inner()
    }

    /// Writes a reply, or gives up after `timeout`: a client that does not read its
    /// replies must not hold its connection forever.
    async fn send(&mut self, reply: &Reply) -> Result<(), SessionError> {
        let bytes = reply.to_bytes();
        let stream = &mut self.stream;
        let write = async {
            stream.write_all(&bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(written) => Ok(written?),
            Err(_) => Err(SessionError::WriteTimeout(self.timeout)),
        }
    }

    /// Reads one command line into `line`, without its line ending.
    async fn read_command(
        &mut self,
        line: &mut Vec<u8>,
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        let stop = |s| Err(Halt::Stop(s, During::Command));
        let now = Instant::now();
        if now >= self.deadline {
            return stop(Stop::Deadline);
        }
        let wait = self.timeout.min(self.deadline - now);
        line.clear();
        let read = tokio::select! {
            () = shutdown.cancelled() => return stop(Stop::Shutdown),
            r = tokio::time::timeout(wait, read_piece(&mut self.stream, line, MAX_COMMAND_LINE)) => r,
        };
        match read {
            Err(_) if Instant::now() >= self.deadline => stop(Stop::Deadline),
            Err(_) => stop(Stop::Idle),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Read::Eof)) => stop(Stop::Eof),
            // Bytes and then the end of the stream, or too many bytes.
            Ok(Ok(Read::Partial)) if line.len() < MAX_COMMAND_LINE => stop(Stop::Eof),
            Ok(Ok(Read::Partial)) => stop(Stop::LineTooLong),
            Ok(Ok(Read::Line)) => {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                } else if self.bare_newline == BareNewline::Reject {
                    return stop(Stop::BareNewline);
                }
                Ok(())
            }
        }
    }

    /// Reads a message after `354`.
    async fn read_data(
        &mut self,
        max: usize,
        hold: &mut DataHold,
        shutdown: &CancellationToken,
    ) -> Result<Data, Halt> {
        let limits = DataLimits {
            max,
            bare_newline: self.bare_newline,
            timeout: self.timeout,
            deadline: self.deadline,
        };
        tokio::select! {
            () = shutdown.cancelled() => Err(Halt::Stop(Stop::Shutdown, During::Data { bare_dot: false })),
            d = read_data(&mut self.stream, limits, hold) => d,
        }
    }
}

/// One line (or piece of a line) read from the client.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Ended with `\n`.
    Line,
    /// `max` bytes without a `\n`, or the end of the stream after some bytes.
    Partial,
    Eof,
}

/// Reads DATA up to `<CRLF>.<CRLF>`, undoing dot-stuffing. A `.` line counts as the end
/// only when it and the line before it end in `<CRLF>`: a relay that passes a bare-LF
/// `.` on as content must not see us end the message there, or the rest would be taken
/// for a second, smuggled message. Lines ending in a bare `<LF>` are stored ending in
/// `<CRLF>` (`normalize`) or end the session (`reject`). Bytes beyond `max` are read and
/// thrown away, so the client hears `552` and the session stays usable; so are the
/// bytes of a message the memory budget (`hold`) has no room for (`452`).
async fn read_data<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limits: DataLimits,
    hold: &mut DataHold,
) -> Result<Data, Halt> {
    let DataLimits {
        max,
        bare_newline,
        timeout,
        deadline,
    } = limits;
    let mut message = Vec::new();
    let mut piece = Vec::with_capacity(DATA_CHUNK);
    let mut too_big = false;
    let mut no_room = false;
    let mut at_line_start = true;
    // Whether the line before ended in <CRLF>; the 354 reply counts as one.
    let mut after_crlf = true;
    // Whether the last piece ended in <CR>: a <CRLF> may be split across two pieces.
    let mut pending_cr = false;
    let mut bare_dot = false;
    loop {
        let stop = |s| Err(Halt::Stop(s, During::Data { bare_dot }));
        let now = Instant::now();
        if now >= deadline {
            return stop(Stop::Deadline);
        }
        piece.clear();
        let read = match tokio::time::timeout(
            timeout.min(deadline - now),
            read_piece(reader, &mut piece, DATA_CHUNK),
        )
        .await
        {
            Err(_) if Instant::now() >= deadline => return stop(Stop::Deadline),
            Err(_) => return stop(Stop::Idle),
            Ok(r) => r?,
        };
        if read == Read::Eof {
            return stop(Stop::Eof);
        }
        let line_start = at_line_start;
        let mut content = piece.as_slice();
        // A line ending in a bare <LF>: its content without the <LF>.
        let mut bare = false;
        if read == Read::Line {
            let crlf = match piece.len() {
                1 => pending_cr,
                n => piece[n - 2] == b'\r',
            };
            if !crlf {
                if bare_newline == BareNewline::Reject {
                    return stop(Stop::BareNewline);
                }
                bare = true;
                content = &piece[..piece.len() - 1];
            }
            if line_start && content == b".\r\n" && after_crlf {
                return Ok(if too_big {
                    Data::TooBig
                } else if no_room {
                    Data::NoRoom
                } else {
                    Data::Message(message)
                });
            }
            after_crlf = crlf;
        }
        if line_start && read == Read::Line && (content == b"." || content == b".\r\n") {
            // A lone dot that does not end DATA is content, kept as it came.
            bare_dot = true;
        } else if line_start && content.first() == Some(&b'.') {
            content = &content[1..];
        }
        at_line_start = read == Read::Line;
        pending_cr = piece.last() == Some(&b'\r');
        let added = content.len() + if bare { 2 } else { 0 };
        if !too_big && message.len() + added > max {
            too_big = true;
            message = Vec::new();
            hold.release();
        }
        if !too_big && !no_room {
            // The buffer grows by doubling, as a Vec would, but every byte of it is
            // taken from the budget first.
            let need = message.len() + added;
            if need > message.capacity() {
                let capacity = (message.capacity() * 2).clamp(need, max.max(need));
                if hold.grow(capacity - message.capacity()) {
                    message.reserve_exact(capacity - message.len());
                } else {
                    no_room = true;
                    message = Vec::new();
                    hold.release();
                }
            }
        }
        if !too_big && !no_room {
            message.extend_from_slice(content);
            if bare {
                message.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// What bounds one message's DATA.
#[derive(Debug, Clone, Copy)]
struct DataLimits {
    /// `max_message_bytes`.
    max: usize,
    bare_newline: BareNewline,
    /// The longest silence.
    timeout: Duration,
    /// The session's end.
    deadline: Instant,
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

/// `MAIL FROM:<address> [params]`, as far as mailcall cares.
#[derive(Debug, PartialEq, Eq)]
struct MailFrom {
    /// `None` for the null reverse path `<>`.
    address: Option<String>,
    size: Option<u64>,
    /// `SMTPUTF8` was given (RFC 6531).
    utf8: bool,
}

/// Parses `MAIL FROM`; `BODY=` may be `7BIT` or `8BITMIME` (RFC 6152), other parameters
/// are ignored. UTF-8 addresses are accepted with or without `SMTPUTF8`: mailcall is
/// the final destination, so nothing downstream depends on the declaration.
fn parse_mail_from(line: &[u8]) -> Option<MailFrom> {
    let (address, params) = parse_path(line, "MAIL FROM:")?;
    let mut mail = MailFrom {
        address: (!address.is_empty()).then_some(address),
        size: None,
        utf8: false,
    };
    for param in params.split_ascii_whitespace() {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        if key.eq_ignore_ascii_case("SIZE") {
            mail.size = Some(value.parse().ok()?);
        } else if key.eq_ignore_ascii_case("BODY") {
            if !value.eq_ignore_ascii_case("7BIT") && !value.eq_ignore_ascii_case("8BITMIME") {
                return None;
            }
        } else if key.eq_ignore_ascii_case("SMTPUTF8") {
            mail.utf8 = true;
        }
    }
    Some(mail)
}

fn parse_rcpt_to(line: &[u8]) -> Option<String> {
    let (address, _params) = parse_path(line, "RCPT TO:")?;
    (!address.is_empty()).then_some(address)
}

/// Splits `VERB:<path> params` into the path and the parameters; the line must be
/// UTF-8 (ASCII, or an RFC 6531 address).
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
    use crate::alert::Alert;
    use crate::config::Config;
    use tokio::io::{AsyncReadExt, DuplexStream};

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    const PEER: &str = "192.0.2.7:40000";

    /// A daemon's worth of context (settings, a store in a temporary directory) for
    /// sessions driven in memory.
    struct Bench {
        ctx: Arc<Context>,
        _dir: tempfile::TempDir,
    }

    fn bench(smtp: &str) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let text =
            format!("[smtp]\nhostname = \"mx.test\"\n{smtp}\n[twilio]\nfrom = \"+15005550006\"\n");
        let config = Config::parse(&dir.path().join("rules.toml"), &text).unwrap();
        let settings = Settings::from_config(config, None).unwrap();
        let store = Store::open(&settings.config.state.path, None).unwrap();
        let metrics = Arc::new(Metrics::new(settings.config.state.path.clone()));
        Bench {
            ctx: Arc::new(Context {
                live: settings.live(),
                store,
                wake: Arc::new(Notify::new()),
                guard: Arc::new(Guard::default()),
                metrics,
                data_budget: DataBudget::new(1024 * 1024),
            }),
            _dir: dir,
        }
    }

    impl Bench {
        /// Opens a session over an in-memory pipe of `buffer` bytes; the client end and
        /// the session's task come back.
        fn connect(
            &self,
            buffer: usize,
        ) -> (
            BufReader<DuplexStream>,
            tokio::task::JoinHandle<Result<(), SessionError>>,
        ) {
            let (client, server) = tokio::io::duplex(buffer);
            let ctx = Arc::clone(&self.ctx);
            let peer: SocketAddr = PEER.parse().unwrap();
            let settings = ctx.live.load_full();
            let ticket = ctx
                .guard
                .admit(
                    peer.ip(),
                    settings.config.smtp.max_connections_per_ip,
                    settings.config.smtp.max_connections,
                    5,
                )
                .unwrap();
            let slot = Slot {
                _permit: None,
                ticket,
            };
            let task = tokio::spawn(async move {
                session(
                    server,
                    peer,
                    &ctx,
                    settings,
                    slot,
                    &CancellationToken::new(),
                )
                .await
            });
            (BufReader::new(client), task)
        }

        /// Sessions open from [`PEER`] by the guard's count.
        fn open(&self) -> usize {
            let ip: SocketAddr = PEER.parse().unwrap();
            self.ctx
                .guard
                .lock()
                .sessions
                .get(&ip.ip())
                .map_or(0, |s| s.open)
        }
    }

    /// Reads one reply, all its lines, as they came.
    async fn reply(client: &mut BufReader<DuplexStream>) -> String {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(5), client.read_line(&mut line))
                .await
                .expect("no reply within 5 s")
                .unwrap();
            assert!(n > 0, "connection closed; so far: {text:?}");
            text.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return text;
            }
        }
    }

    /// Plays a dialogue: each step sends its bytes (if any) and expects a reply that
    /// starts with the given code and enhanced status, Stalwart's style.
    async fn dialog(client: &mut BufReader<DuplexStream>, steps: &[(&str, &str)]) {
        for (send, expect) in steps {
            if !send.is_empty() {
                client.get_mut().write_all(send.as_bytes()).await.unwrap();
            }
            let got = reply(client).await;
            assert!(
                got.starts_with(expect),
                "sent {send:?}: got {got:?}, expected {expect:?}"
            );
        }
    }

    /// A dialogue from the greeting up to `354`.
    const TO_DATA: &[(&str, &str)] = &[
        ("", "220"),
        ("EHLO x\r\n", "250"),
        ("MAIL FROM:<m@example.com>\r\n", "250"),
        ("RCPT TO:<a@example.com>\r\n", "250"),
        ("DATA\r\n", "354"),
    ];

    async fn closed(client: &mut BufReader<DuplexStream>) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await,
            Ok(Ok(0))
        )
    }

    #[tokio::test]
    async fn the_sequence_and_every_reply_is_typed() {
        let b = bench("");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, &[("", "220 mx.test ESMTP")]).await;
        c.get_mut()
            .write_all(b"EHLO client.test\r\n")
            .await
            .unwrap();
        let ehlo = reply(&mut c).await;
        for capability in [
            "250-mx.test greets you",
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "SIZE 10485760",
        ] {
            assert!(ehlo.contains(capability), "{ehlo}");
        }
        assert!(
            !ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        dialog(
            &mut c,
            &[
                ("RCPT TO:<a@example.com>\r\n", "503 5.5.1"),
                ("DATA\r\n", "503 5.5.1"),
                ("MAIL FROM:<m@example.com>\r\n", "250 2.1.0"),
                ("MAIL FROM:<m@example.com>\r\n", "503 5.5.1"),
                ("DATA\r\n", "554 5.5.1"),
                ("RCPT TO:<>\r\n", "501 5.5.4"),
                ("RCPT TO:<a@example.com>\r\n", "250 2.1.5"),
                ("DATA\r\n", "354"),
                (
                    "Subject: one\r\n\r\n..dotted\r\n.\r\n",
                    "250 2.0.0 queued as alert 1",
                ),
                ("DATA\r\n", "503 5.5.1"),
                ("RSET\r\n", "250 2.0.0"),
                ("NOOP\r\n", "250 2.0.0"),
                ("VRFY x\r\n", "252 2.5.0"),
                ("EXPN x\r\n", "502 5.5.1"),
                ("STARTTLS\r\n", "502 5.5.1"),
                ("AUTH PLAIN\r\n", "503 5.5.1"),
                ("FROB\r\n", "500 5.5.2"),
                ("HELO\r\n", "501 5.5.4"),
                ("HELO client.test\r\n", "250 mx.test"),
                ("MAIL FROM:<> SIZE=99999999\r\n", "552 5.3.4"),
                ("MAIL FROM:<m@example.com> BODY=BINARYMIME\r\n", "501 5.5.4"),
                ("QUIT\r\n", "221 2.0.0"),
            ],
        )
        .await;
        assert!(closed(&mut c).await);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn mail_without_helo_and_pipelined_commands_are_served() {
        let b = bench("");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, &[("", "220")]).await;
        // A crude script: no HELO, everything in one write, bare LF line ends.
        c.get_mut()
            .write_all(b"MAIL FROM:<m@example.com>\nRCPT TO:<a@example.com>\nDATA\n")
            .await
            .unwrap();
        dialog(&mut c, &[("", "250 2.1.0"), ("", "250 2.1.5"), ("", "354")]).await;
        dialog(
            &mut c,
            &[
                ("Subject: x\r\n\r\nbody\r\n.\r\n", "250 2.0.0"),
                ("QUIT\r\n", "221"),
            ],
        )
        .await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn utf8_addresses_are_accepted_with_smtputf8() {
        let b = bench("recipients = [\"*@例え.jp\"]");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(
            &mut c,
            &[
                ("", "220"),
                ("EHLO クライアント.jp\r\n", "250-mx.test"),
                (
                    "MAIL FROM:<監視@例え.jp> SMTPUTF8 BODY=8BITMIME\r\n",
                    "250 2.1.0",
                ),
                ("RCPT TO:<当番@例え.jp>\r\n", "250 2.1.5"),
                ("RCPT TO:<someone@example.com>\r\n", "550 5.7.1"),
                ("DATA\r\n", "354"),
                (
                    "From: 監視 <監視@例え.jp>\r\nSubject: 【障害】ディスク満杯\r\n\r\n本文\r\n.\r\n",
                    "250 2.0.0",
                ),
                ("QUIT\r\n", "221"),
            ],
        )
        .await;
        task.await.unwrap().unwrap();
    }

    #[test]
    fn a_raw_utf8_subject_is_decoded() {
        // What SMTPUTF8 lets through: headers in raw UTF-8, no RFC 2047 words.
        let raw =
            "From: 監視 <監視@例え.jp>\r\nSubject: 【障害】db1 ディスク満杯\r\n\r\n本文です\r\n";
        let alert = Alert::from_mime(raw.as_bytes(), &Envelope::default());
        assert_eq!(alert.subject, "【障害】db1 ディスク満杯");
        assert_eq!(alert.from, "監視@例え.jp");
        assert_eq!(alert.body, "本文です");
    }

    #[tokio::test]
    async fn a_bare_lf_dot_does_not_end_data() {
        let b = bench("");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, TO_DATA).await;
        // Everything up to <CRLF>.<CRLF> is one message; the first reply after it is
        // the one 250, and the next is NOOP's, not MAIL's.
        c.get_mut()
            .write_all(b"Subject: first\r\n\r\nbody\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<a@example.com>\nDATA\nSubject: smuggled\n\n.\r\n.\r\n")
            .await
            .unwrap();
        dialog(
            &mut c,
            &[
                ("", "250 2.0.0 queued as alert 1"),
                ("NOOP\r\n", "250 2.0.0 OK"),
                ("QUIT\r\n", "221"),
            ],
        )
        .await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bare_lf_is_refused_with_550_when_configured_to_reject() {
        let b = bench("bare_newline = \"reject\"");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, TO_DATA).await;
        dialog(&mut c, &[("Subject: x\r\n\r\nbare\n", "550 5.5.2")]).await;
        assert!(closed(&mut c).await);
        task.await.unwrap().unwrap();
        assert_eq!(b.open(), 0);

        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, &[("", "220"), ("NOOP\n", "550 5.5.2")]).await;
        assert!(closed(&mut c).await);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn too_many_errors_close_the_session() {
        let b = bench("");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, &[("", "220")]).await;
        for _ in 1..MAX_ERRORS {
            dialog(&mut c, &[("FROB\r\n", "500 5.5.2")]).await;
        }
        dialog(&mut c, &[("FROB\r\n", "421 4.7.0")]).await;
        assert!(closed(&mut c).await);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_stored_message_clears_the_error_count_and_refused_mail_adds_none() {
        let b = bench("senders = [\"ok@example.com\"]");
        let (mut c, task) = b.connect(64 * 1024);
        dialog(&mut c, &[("", "220"), ("EHLO x\r\n", "250")]).await;
        // A sender refused at MAIL, pipelined as relays do: the 503s that follow are
        // the refusal's echo, not the client's errors. Many times over.
        for _ in 0..MAX_ERRORS {
            dialog(
                &mut c,
                &[
                    ("MAIL FROM:<bad@example.com>\r\n", "5"),
                    ("RCPT TO:<a@example.com>\r\n", "503"),
                    ("DATA\r\n", "503"),
                    ("RSET\r\n", "250"),
                ],
            )
            .await;
        }
        // Real errors up to one short of the limit, then a stored message resets them.
        for _ in 1..MAX_ERRORS {
            dialog(&mut c, &[("FROB\r\n", "500 5.5.2")]).await;
        }
        dialog(
            &mut c,
            &[
                ("MAIL FROM:<ok@example.com>\r\n", "250"),
                ("RCPT TO:<a@example.com>\r\n", "250"),
                ("DATA\r\n", "354"),
                ("Subject: x\r\n\r\ny\r\n.\r\n", "250"),
                ("FROB\r\n", "500 5.5.2"),
                ("QUIT\r\n", "221"),
            ],
        )
        .await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn quit_gives_the_slot_back_before_221_is_written() {
        let b = bench("timeout = \"10s\"");
        // A pipe too small for the 221: its write blocks until the client reads.
        let (mut c, task) = b.connect(16);
        dialog(&mut c, &[("", "220")]).await;
        assert_eq!(b.open(), 1);
        c.get_mut().write_all(b"QUIT\r\n").await.unwrap();
        let waiting = Instant::now();
        while b.open() != 0 {
            assert!(
                waiting.elapsed() < Duration::from_secs(2),
                "the place is held while 221 is being written"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!task.is_finished());
        dialog(&mut c, &[("", "221 2.0.0")]).await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_cut_off_by_the_write_timeout() {
        let b = bench("timeout = \"300ms\"");
        // A pipe too small for the replies to the commands below.
        let (mut c, task) = b.connect(256);
        let mut commands = Vec::new();
        for _ in 0..200 {
            commands.extend_from_slice(b"EHLO never.reads\r\n");
        }
        // The server stops reading once its writes block, so this write may block too.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), c.get_mut().write_all(&commands)).await;
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the session never ended")
            .unwrap();
        assert!(
            matches!(ended, Err(SessionError::WriteTimeout(_))),
            "{ended:?}"
        );
        assert_eq!(b.open(), 0);
    }

    #[test]
    fn sessions_beyond_the_per_address_cap_are_deferred_then_promoted() {
        let guard = Arc::new(Guard::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = guard.admit(ip, 2, 100, 5).unwrap();
        let _second = guard.admit(ip, 2, 100, 5).unwrap();
        let mut third = guard.admit(ip, 2, 100, 5).unwrap();
        let _fourth = guard.admit(ip, 2, 100, 5).unwrap();
        assert!(first.carrying && !third.carrying);
        assert_eq!(
            guard.admit(ip, 2, 100, 5).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        // Another address is not affected.
        assert!(
            guard
                .admit("192.0.2.2".parse().unwrap(), 2, 100, 5)
                .unwrap()
                .carrying
        );
        assert!(!third.promote(2));
        drop(first);
        assert!(third.promote(2));
        drop((third, _second, _fourth));
        assert!(guard.lock().sessions.is_empty());
    }

    #[test]
    fn one_address_waits_in_at_most_a_quarter_of_all_places() {
        let guard = Arc::new(Guard::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..150)
            .map(|i| {
                guard
                    .admit(ip, 100, 200, 5)
                    .unwrap_or_else(|e| panic!("{i}: {e:?}"))
            })
            .collect();
        assert_eq!(held.iter().filter(|t| t.carrying).count(), 100);
        assert_eq!(
            guard.admit(ip, 100, 200, 5).unwrap_err(),
            Refusal::TooManyFromAddress
        );
    }

    #[test]
    fn an_ipv6_network_counts_as_one_address() {
        let guard = Arc::new(Guard::default());
        let _a = guard
            .admit("2001:db8::1".parse().unwrap(), 1, 4, 5)
            .unwrap();
        let _b = guard
            .admit("2001:db8::2".parse().unwrap(), 1, 4, 5)
            .unwrap();
        assert_eq!(
            guard
                .admit("2001:db8::ffff:3".parse().unwrap(), 1, 4, 5)
                .unwrap_err(),
            Refusal::TooManyFromAddress
        );
        assert!(
            guard
                .admit("2001:db8:0:1::1".parse().unwrap(), 1, 4, 5)
                .is_ok()
        );
        // An IPv4-mapped address is the IPv4 address.
        let _c = guard.admit("192.0.2.9".parse().unwrap(), 1, 4, 5).unwrap();
        let mapped = guard.admit("::ffff:192.0.2.9".parse().unwrap(), 1, 4, 5);
        assert!(!mapped.unwrap().carrying);
    }

    #[test]
    fn failed_auth_memory_stays_bounded() {
        let guard = Guard::default();
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 100) {
            guard.auth_failed(IpAddr::V4(i.into()), 3);
        }
        assert!(guard.lock().auth_failures.len() <= MAX_TRACKED_ADDRESSES);
        for _ in 0..10 {
            guard.auth_failed("192.0.2.1".parse().unwrap(), 3);
        }
        assert!(guard.shut_out("192.0.2.1".parse().unwrap(), 3));
        assert_eq!(
            guard.lock().auth_failures[&"192.0.2.1".parse::<IpAddr>().unwrap()].len(),
            3
        );
    }

    #[test]
    fn replies_are_rendered_with_their_enhanced_status() {
        assert_eq!(
            Reply::new(451, (4, 3, 0), "try\r\nlater").to_bytes(),
            b"451 4.3.0 try  later\r\n"
        );
        let ehlo = Reply {
            code: 250,
            status: None,
            lines: vec!["mx greets you".into(), "SMTPUTF8".into()],
        };
        assert_eq!(ehlo.to_bytes(), b"250-mx greets you\r\n250 SMTPUTF8\r\n");
        assert_eq!(Reply::plain(334, "").to_bytes(), b"334 \r\n");
    }

    #[test]
    fn mail_from_variants() {
        let m = parse_mail_from(b"MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME").unwrap();
        assert_eq!(
            m,
            MailFrom {
                address: Some("a@b.example".into()),
                size: Some(1234),
                utf8: false,
            }
        );
        let m = parse_mail_from(b"mail from:<>").unwrap();
        assert_eq!(m.address, None);
        let m = parse_mail_from(b"MAIL FROM: <x@y>").unwrap();
        assert_eq!(m.address.as_deref(), Some("x@y"));
        let m = parse_mail_from(b"MAIL FROM:x@y").unwrap();
        assert_eq!(m.address.as_deref(), Some("x@y"));
        let m = parse_mail_from("MAIL FROM:<用户@例子.广告> SMTPUTF8".as_bytes()).unwrap();
        assert_eq!(m.address.as_deref(), Some("用户@例子.广告"));
        assert!(m.utf8);
        assert!(parse_mail_from(b"MAIL FROM:<a@b> SIZE=lots").is_none());
        assert!(parse_mail_from(b"MAIL FROM:<a@b> BODY=BINARYMIME").is_none());
        assert!(parse_mail_from(b"MAIL TO:<a@b>").is_none());
        assert!(parse_mail_from(b"MAIL FROM:<a b@c>").is_none());
        assert!(parse_mail_from(b"MAIL FROM:<\xff@c>").is_none());
    }

    #[test]
    fn rcpt_to_variants() {
        assert_eq!(
            parse_rcpt_to(b"RCPT TO:<a@b> NOTIFY=NEVER").as_deref(),
            Some("a@b")
        );
        assert_eq!(
            parse_rcpt_to(b"rcpt to:<@relay:a@b>").as_deref(),
            Some("a@b")
        );
        assert_eq!(parse_rcpt_to(b"RCPT TO:<>"), None);
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

    /// Reads DATA from `input`: the outcome, and what is left for the next command.
    async fn data(
        input: &[u8],
        max: usize,
        policy: BareNewline,
    ) -> (Result<Data, (Stop, During)>, Vec<u8>) {
        let mut hold = DataHold::new(None, "192.0.2.1".parse().unwrap());
        data_within(input, max, policy, &mut hold).await
    }

    async fn data_within(
        input: &[u8],
        max: usize,
        policy: BareNewline,
        hold: &mut DataHold,
    ) -> (Result<Data, (Stop, During)>, Vec<u8>) {
        let mut r = BufReader::with_capacity(16, input);
        let limits = DataLimits {
            max,
            bare_newline: policy,
            timeout: Duration::from_secs(1),
            deadline: far(),
        };
        let outcome = read_data(&mut r, limits, hold).await.map_err(|h| match h {
            Halt::Stop(stop, during) => (stop, during),
            Halt::Failed(e) => panic!("{e}"),
        });
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        (outcome, rest)
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_bounded() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nNEXT";
        let (outcome, rest) = data(input, 1000, BareNewline::Normalize).await;
        assert_eq!(
            outcome.unwrap(),
            Data::Message(b"Subject: x\r\n\r\n.leading dot\r\n".to_vec())
        );
        assert_eq!(rest, b"NEXT");
        // Too big: read to the end all the same, so the next command is still there.
        let (outcome, rest) = data(input, 10, BareNewline::Normalize).await;
        assert_eq!(outcome.unwrap(), Data::TooBig);
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn messages_in_flight_share_a_budget_per_address_and_in_all() {
        let budget = Arc::new(DataBudget {
            limit: 4000,
            per_address: 2000,
            held: Mutex::default(),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut input = vec![b'x'; 1500];
        input.extend_from_slice(b"\r\n.\r\nNEXT");
        // One address: its first message fits in its half, a second one does not, and
        // is read to its end all the same.
        let mut first = DataHold::new(Some(Arc::clone(&budget)), a);
        let (outcome, _) = data_within(&input, 10_000, BareNewline::Normalize, &mut first).await;
        assert!(matches!(outcome, Ok(Data::Message(m)) if m.len() == 1502));
        let mut second = DataHold::new(Some(Arc::clone(&budget)), a);
        let (outcome, rest) =
            data_within(&input, 10_000, BareNewline::Normalize, &mut second).await;
        assert_eq!(
            (outcome.unwrap(), rest.as_slice()),
            (Data::NoRoom, &b"NEXT"[..])
        );
        assert_eq!(second.bytes, 0, "a refused message holds nothing");
        // Another address still gets in; the first one's bytes come back when dropped.
        let mut other = DataHold::new(Some(Arc::clone(&budget)), "192.0.2.2".parse().unwrap());
        let (outcome, _) = data_within(&input, 10_000, BareNewline::Normalize, &mut other).await;
        assert!(matches!(outcome, Ok(Data::Message(_))));
        drop((first, second, other));
        assert_eq!(budget.lock().0, 0);
        assert!(budget.lock().1.is_empty());
    }

    #[tokio::test]
    async fn a_dot_inside_a_long_line_does_not_end_data() {
        let mut input = vec![b'x'; DATA_CHUNK];
        input.extend_from_slice(b".\r\n.\r\n");
        let (outcome, _) = data(&input, usize::MAX, BareNewline::Normalize).await;
        match outcome.unwrap() {
            Data::Message(m) => assert_eq!(m.len(), DATA_CHUNK + 3),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn only_crlf_dot_crlf_ends_data() {
        // Every smuggling variant: a bare LF before the dot, after it, or both.
        for end in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n", b"\r\n.\rX\r\n"] {
            let mut input = b"Subject: a\r\n\r\nbody".to_vec();
            input.extend_from_slice(end);
            input.extend_from_slice(b"MAIL FROM:<e@x>\r\n.\r\nNEXT");
            let (outcome, rest) = data(&input, 1000, BareNewline::Normalize).await;
            let Ok(Data::Message(m)) = outcome else {
                panic!("{end:?}: {outcome:?}")
            };
            let m = String::from_utf8(m).unwrap();
            assert!(m.contains("MAIL FROM:<e@x>\r\n"), "{end:?}: {m:?}");
            assert!(
                !m.contains("\r\r") && !m.replace("\r\n", "").contains('\n'),
                "{m:?}"
            );
            assert_eq!(rest, b"NEXT", "{end:?}");
        }
        // A <CRLF> split across two pieces is still a <CRLF>.
        let mut input = vec![b'x'; DATA_CHUNK - 1];
        input.extend_from_slice(b"\r\n.\r\n");
        let (outcome, _) = data(&input, usize::MAX, BareNewline::Normalize).await;
        assert!(matches!(outcome, Ok(Data::Message(m)) if m.len() == DATA_CHUNK + 1));
    }

    #[tokio::test]
    async fn bare_lf_lines_are_normalized_or_rejected() {
        let input = b"Subject: a\n\nline\n..dot\r\n.\r\n";
        let (outcome, _) = data(input, 1000, BareNewline::Normalize).await;
        assert_eq!(
            outcome.unwrap(),
            Data::Message(b"Subject: a\r\n\r\nline\r\n.dot\r\n".to_vec())
        );
        let (outcome, _) = data(input, 1000, BareNewline::Reject).await;
        assert_eq!(outcome.unwrap_err().0, Stop::BareNewline);
        // A message ended only by a bare-LF dot never ends; when the client gives up,
        // the session knows why, for the log.
        let (outcome, _) = data(b"Subject: a\r\n\r\nx\n.\n", 1000, BareNewline::Normalize).await;
        assert_eq!(
            outcome.unwrap_err(),
            (Stop::Eof, During::Data { bare_dot: true })
        );
    }
}
