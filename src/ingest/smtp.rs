//! The embedded SMTP listener: mailin's protocol core driven from tokio.
//!
//! `mailin::Session` sequences the dialogue (HELO/EHLO, MAIL, RCPT, DATA, RSET, QUIT,
//! 503 for commands out of order) and asks our [`Policy`] about recipients. This driver
//! does what mailin-embedded's blocking thread pool cannot:
//! - reads with bounds: a command line over 4 KiB closes the connection with `500`, the
//!   message size is enforced while reading (`SIZE` advertised and honoured), and every
//!   read has a timeout;
//! - parses `MAIL FROM`/`RCPT TO` itself (mailin rejects the null sender `<>` and ESMTP
//!   parameters such as `SIZE=`), handing mailin a canonical line;
//! - answers the end of DATA itself: `250` only after the alert is committed to the
//!   store, `451` when it cannot be stored, `552` when it was too big;
//! - answers `421` and closes when the daemon shuts down or the client goes silent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailin::{Action, Handler, Response, SessionBuilder};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::alert::Envelope;
use crate::config::{AddressPatterns, Config};
use crate::store::{Inserted, NewAlert, Store};

/// The longest command line accepted outside DATA (RFC 5321 asks for 512).
pub const MAX_COMMAND_LINE: usize = 4096;
/// Recipients per message; RFC 5321 requires at least 100.
const MAX_RECIPIENTS: usize = 100;
/// DATA is read in pieces of at most this size, whatever the line length.
const DATA_CHUNK: usize = 64 * 1024;

/// What every SMTP connection shares.
#[derive(Debug)]
pub struct Context {
    pub config: Arc<Config>,
    pub store: Store,
    /// Notified after each stored alert, so the dispatcher routes it at once.
    pub wake: Arc<Notify>,
}

/// Accepts connections until `shutdown`; each one runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(ctx.config.smtp.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
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
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(async move {
                    if let Err(e) = handle(stream, peer, &ctx, &shutdown).await {
                        debug!(%peer, error = %e, "SMTP connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                warn!(%peer, limit = ctx.config.smtp.max_connections, "too many SMTP connections; refusing one");
                tracker.spawn(async move {
                    let mut stream = stream;
                    let line = format!(
                        "421 4.7.0 {} too many connections, try again later\r\n",
                        ctx.config.smtp.hostname
                    );
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream.write_all(line.as_bytes()),
                    )
                    .await;
                });
            }
        }
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
}

/// Runs one SMTP session over any byte stream (tests drive it in memory).
pub async fn handle<S>(
    stream: S,
    peer: SocketAddr,
    ctx: &Context,
    shutdown: &CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let smtp = &ctx.config.smtp;
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let mut session = SessionBuilder::new(smtp.hostname.clone()).build(
        peer.ip(),
        Policy {
            recipients: smtp.recipients.clone(),
        },
    );
    let mut envelope = Envelope::default();
    let mut greeted = false;
    let mut line = Vec::with_capacity(256);
    write
        .write_all(format!("220 {} ESMTP mailcall\r\n", smtp.hostname).as_bytes())
        .await?;

    loop {
        line.clear();
        let read = tokio::select! {
            () = shutdown.cancelled() => {
                reply(&mut write, &format!("421 4.3.2 {} shutting down, try again later", smtp.hostname)).await?;
                return Ok(());
            }
            r = tokio::time::timeout(smtp.timeout, read_piece(&mut reader, &mut line, MAX_COMMAND_LINE)) => r,
        };
        match read {
            Err(_) => {
                reply(
                    &mut write,
                    &format!("421 4.4.2 {} idle for too long, closing", smtp.hostname),
                )
                .await?;
                return Ok(());
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(Read::Eof)) => return Ok(()),
            Ok(Ok(Read::Partial)) => {
                warn!(%peer, "SMTP command line longer than {MAX_COMMAND_LINE} bytes; closing");
                reply(&mut write, "500 5.5.2 line too long, closing").await?;
                return Ok(());
            }
            Ok(Ok(Read::Line)) => {}
        }
        let command = canonical_line(&line);
        let verb = command
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let response = match verb.as_slice() {
            b"MAIL" => {
                let Some(mail) = parse_mail_from(&command) else {
                    reply(&mut write, "501 5.5.4 syntax: MAIL FROM:<address> [SIZE=n]").await?;
                    continue;
                };
                if mail.size.is_some_and(|s| s > smtp.max_message_bytes as u64) {
                    reply(&mut write, &too_big(smtp.max_message_bytes)).await?;
                    continue;
                }
                if !greeted {
                    // Crude monitoring scripts skip HELO; accept them as Postfix does
                    // by default (smtpd_helo_required = no).
                    let _ = session.process(b"HELO unknown\r\n");
                    greeted = true;
                }
                let path = mail.address.as_deref().unwrap_or("MAILER-DAEMON");
                let body = if mail.eight_bit { " BODY=8BITMIME" } else { "" };
                let response = session.process(format!("MAIL FROM:<{path}>{body}\r\n").as_bytes());
                if response.code == 250 {
                    envelope = Envelope {
                        mail_from: mail.address,
                        rcpt_to: Vec::new(),
                    };
                }
                response
            }
            b"RCPT" => {
                let Some(address) = parse_rcpt_to(&command) else {
                    reply(&mut write, "501 5.5.4 syntax: RCPT TO:<address>").await?;
                    continue;
                };
                if envelope.rcpt_to.len() >= MAX_RECIPIENTS {
                    reply(&mut write, "452 4.5.3 too many recipients").await?;
                    continue;
                }
                let response = session.process(format!("RCPT TO:<{address}>\r\n").as_bytes());
                if response.code == 250 {
                    envelope.rcpt_to.push(address);
                } else if response.code == 550 {
                    info!(%peer, rcpt = %address, "recipient refused: not in [smtp] recipients");
                }
                response
            }
            b"EHLO" => {
                let response = session.process(&command);
                greeted |= response.code == 250;
                if response.code == 250 {
                    let ehlo = format!(
                        "250-{} greets you\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {}\r\n",
                        smtp.hostname, smtp.max_message_bytes
                    );
                    write.write_all(ehlo.as_bytes()).await?;
                    continue;
                }
                response
            }
            b"RSET" => {
                envelope = Envelope::default();
                session.process(&command)
            }
            b"HELO" => {
                let response = session.process(&command);
                greeted |= response.code == 250;
                response
            }
            _ => session.process(&command),
        };
        write.write_all(&response.buffer()?).await?;
        if response.action == Action::Close {
            return Ok(());
        }
        if response.code != 354 {
            continue;
        }

        // DATA: read the message ourselves, with the size bound and the shutdown check.
        let data = tokio::select! {
            () = shutdown.cancelled() => {
                reply(&mut write, &format!("421 4.3.2 {} shutting down, message not accepted; try again later", smtp.hostname)).await?;
                return Ok(());
            }
            d = read_data(&mut reader, smtp.max_message_bytes, smtp.timeout) => d?,
        };
        // Let mailin leave its DATA state; its answer is replaced by ours.
        let _ = session.process(b".\r\n");
        let envelope = std::mem::take(&mut envelope);
        match data {
            Data::Eof => return Ok(()),
            Data::TimedOut => {
                reply(
                    &mut write,
                    &format!("421 4.4.2 {} timeout during DATA, closing", smtp.hostname),
                )
                .await?;
                return Ok(());
            }
            Data::TooBig => {
                warn!(%peer, from = ?envelope.mail_from, limit = smtp.max_message_bytes, "message too big; refused with 552");
                reply(&mut write, &too_big(smtp.max_message_bytes)).await?;
            }
            Data::Message(raw) => {
                let bytes = raw.len();
                let stored = ctx
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
                        ctx.wake.notify_one();
                        info!(alert = id, %peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, bytes, "mail accepted and stored");
                        reply(&mut write, &format!("250 2.0.0 queued as alert {id}")).await?;
                    }
                    Err(e) => {
                        error!(%peer, from = ?envelope.mail_from, error = %e, "cannot store a mail; answered 451 so the sender retries");
                        reply(
                            &mut write,
                            "451 4.3.0 cannot store the message right now, try again later",
                        )
                        .await?;
                    }
                }
            }
        }
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
) -> std::io::Result<Data> {
    let mut message = Vec::with_capacity(8 * 1024);
    let mut piece = Vec::with_capacity(DATA_CHUNK);
    let mut too_big = false;
    let mut at_line_start = true;
    loop {
        piece.clear();
        let read =
            match tokio::time::timeout(timeout, read_piece(reader, &mut piece, DATA_CHUNK)).await {
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
        match read_data(&mut r, 1000, Duration::from_secs(1))
            .await
            .unwrap()
        {
            Data::Message(m) => assert_eq!(m, b"Subject: x\r\n\r\n.leading dot\r\n"),
            other => panic!("{other:?}"),
        }
        let mut r = BufReader::new(&input[..]);
        assert!(matches!(
            read_data(&mut r, 10, Duration::from_secs(1)).await.unwrap(),
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
        match read_data(&mut r, usize::MAX, Duration::from_secs(1))
            .await
            .unwrap()
        {
            Data::Message(m) => assert_eq!(m.len(), DATA_CHUNK + 3),
            other => panic!("{other:?}"),
        }
    }
}
