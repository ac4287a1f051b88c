//! Runs the real `mailcall` binary against a temporary config and store, and speaks
//! SMTP to it over a real socket.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fake_twilio::{ACCOUNT_SID, AUTH_TOKEN, FakeTwilio};

pub const BIN: &str = env!("CARGO_BIN_EXE_mailcall");
/// The `/alert` token every test daemon gets (`token_env = "MAILCALL_TEST_TOKEN"`).
pub const TEST_TOKEN: &str = "test-webhook-token";
/// The SendGrid Basic auth password (`password_env = "MAILCALL_TEST_SENDGRID_PASSWORD"`).
pub const TEST_SENDGRID_PASSWORD: &str = "sg-secret";

/// A config for tests: ephemeral SMTP port, short retry delays, `extra` appended.
pub fn config(twilio: Option<&FakeTwilio>, extra: &str) -> String {
    let api_base = twilio.map_or("http://127.0.0.1:9".to_string(), FakeTwilio::base_url);
    format!(
        "[smtp]\nlisten = \"127.0.0.1:0\"\nhostname = \"mx.test\"\n\
         [twilio]\nfrom = \"+15005550006\"\napi_base = \"{api_base}\"\nring_seconds = 25\n\
         retry_initial_delay = \"50ms\"\nretry_max_delay = \"200ms\"\nrequest_timeout = \"2s\"\n\
         reconcile_grace = \"2s\"\n\
         [contacts]\nalice = \"+15005550001\"\nbob = \"+15005550002\"\ncarol = \"+15005550003\"\n\
         [groups]\noncall = [\"alice\", \"bob\"]\n{extra}"
    )
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Child,
    pub smtp: SocketAddr,
    /// The HTTP listener, when the config has `[http]`.
    pub http: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    pub dir: PathBuf,
}

/// A directory that holds one test's config and store.
pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mailcall-it-")
        .tempdir()
        .unwrap()
}

impl Daemon {
    /// Writes `config` to `dir/rules.toml` and starts `mailcall serve` on it.
    pub fn start(dir: &Path, config: &str, dry_run: bool) -> Daemon {
        std::fs::write(dir.join("rules.toml"), config).unwrap();
        Daemon::start_existing(dir, dry_run)
    }

    /// Starts `mailcall serve` on the config already in `dir` (e.g. after a crash).
    pub fn start_existing(dir: &Path, dry_run: bool) -> Daemon {
        Daemon::launch(dir, dry_run, true)
    }

    /// Starts `mailcall serve`, with or without Twilio credentials in its environment.
    pub fn launch(dir: &Path, dry_run: bool, credentials: bool) -> Daemon {
        let mut cmd = command(dir);
        if !credentials {
            cmd.env_remove("TWILIO_ACCOUNT_SID")
                .env_remove("TWILIO_AUTH_TOKEN");
        }
        if dry_run {
            cmd.arg("serve").arg("--dry-run");
        } else {
            cmd.arg("serve");
        }
        Daemon::spawn(cmd, dir)
    }

    /// Starts `mailcall serve` (placing calls) with extra environment variables.
    pub fn launch_with_env(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = command(dir);
        cmd.envs(env.iter().copied()).arg("serve");
        Daemon::spawn(cmd, dir)
    }

    /// Starts `mailcall serve` and stops reading its stderr once it is listening, as a
    /// stalled log pipe would: the pipe stays open and fills up.
    pub fn launch_with_stalled_stderr(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = command(dir);
        cmd.envs(env.iter().copied()).arg("serve");
        Daemon::spawn_reading(cmd, dir, false)
    }

    fn spawn(cmd: Command, dir: &Path) -> Daemon {
        Daemon::spawn_reading(cmd, dir, true)
    }

    /// Spawns the daemon; its log is collected until it listens, and afterwards only
    /// when `keep_reading`.
    fn spawn_reading(mut cmd: Command, dir: &Path, keep_reading: bool) -> Daemon {
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        // The HTTP address is logged before the SMTP one, so it is known when SMTP is.
        let http = Arc::new(Mutex::new(None));
        {
            let logs = Arc::clone(&logs);
            let http = Arc::clone(&http);
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stderr).lines();
                for line in lines.by_ref() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.split("http listening addr=").nth(1) {
                        *http.lock().unwrap() = Some(addr.trim().parse::<SocketAddr>().unwrap());
                    }
                    let listening = line.split("smtp listening addr=").nth(1).map(|addr| {
                        let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                    });
                    logs.lock().unwrap().push(line);
                    if listening.is_some() && !keep_reading {
                        // Hold the pipe open without reading it until the test ends.
                        std::thread::park();
                        break;
                    }
                }
            });
        }
        let smtp = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "daemon did not start; log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let http = *http.lock().unwrap();
        Daemon {
            child,
            smtp,
            http,
            logs,
            dir: dir.to_path_buf(),
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The daemon's process id (e.g. to read its `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn smtp(&self) -> SmtpClient {
        SmtpClient::connect(self.smtp)
    }

    /// Sends a signal (`HUP`, `TERM`, …) to the daemon.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{name}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `mailcall incidents --json` against this daemon's store, while it runs.
    pub fn incidents(&self) -> Vec<serde_json::Value> {
        incidents(&self.dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mailcall` with the test's config and Twilio credentials.
pub fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(dir.join("rules.toml"))
        .env_remove("MAILCALL_CONFIG")
        .env_remove("TWILIO_API_KEY")
        .env_remove("TWILIO_API_SECRET")
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("MAILCALL_TEST_TOKEN", TEST_TOKEN)
        .env("MAILCALL_TEST_SENDGRID_PASSWORD", TEST_SENDGRID_PASSWORD)
        .env("RUST_LOG", "info");
    cmd
}

/// `GET url` from a real client: status and body.
pub fn http_get(url: &str) -> (u16, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

/// Parses the Prometheus text format at `url` into `name{labels}` → value.
pub fn scrape(url: &str) -> std::collections::HashMap<String, f64> {
    http_get(url)
        .1
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (
                name.to_string(),
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad sample {l:?}")),
            )
        })
        .collect()
}

/// `mailcall incidents --json --limit 1000`.
pub fn incidents(dir: &Path) -> Vec<serde_json::Value> {
    let out = command(dir)
        .args(["incidents", "--json", "--limit", "1000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "incidents failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (bounded) until `pred` holds for `incidents`.
pub fn wait_incidents(
    dir: &Path,
    timeout: Duration,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = incidents(dir);
        if pred(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "incidents never matched within {timeout:?}: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain SMTP client speaking the dialogue line by line, so tests see every code.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub greeting: (u16, String),
}

impl SmtpClient {
    pub fn connect(addr: SocketAddr) -> SmtpClient {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut client = SmtpClient {
            reader: BufReader::new(stream),
            writer,
            greeting: (0, String::new()),
        };
        client.greeting = client.read_reply();
        client
    }

    /// Reads one (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "server closed the connection; reply so far: {text:?}"
            );
            let code: u16 = line[..3].parse().unwrap();
            text.push_str(line[4..].trim_end());
            if line.as_bytes()[3] == b' ' {
                return (code, text);
            }
            text.push('\n');
        }
    }

    /// Sends a command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// True when the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut buf = String::new();
        matches!(self.reader.read_line(&mut buf), Ok(0) | Err(_))
    }

    /// Sends the standard test alert with `subject` and asserts it was accepted.
    pub fn alert(&mut self, subject: &str) {
        let (code, text) = self.send("m@example.com", &["a@example.com"], &mail(subject, "x"));
        assert_eq!(code, 250, "alert {subject:?} refused: {text}");
    }

    /// MAIL, RCPT…, DATA, the message (dot-stuffed), and the final reply code.
    pub fn send(&mut self, from: &str, to: &[&str], message: &[u8]) -> (u16, String) {
        let (code, text) = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(code, 250, "MAIL FROM: {text}");
        for rcpt in to {
            let (code, text) = self.cmd(&format!("RCPT TO:<{rcpt}>"));
            assert_eq!(code, 250, "RCPT TO:<{rcpt}>: {text}");
        }
        let (code, text) = self.cmd("DATA");
        assert_eq!(code, 354, "DATA: {text}");
        let mut data = Vec::with_capacity(message.len() + 16);
        for line in message.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.send_raw(&data);
        self.read_reply()
    }
}

/// A simple alert mail.
pub fn mail(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Monitor <monitor@monitoring.example.com>\r\nTo: alerts@example.com\r\n\
         Subject: {subject}\r\nMessage-ID: <{}@monitoring.example.com>\r\n\r\n{body}\r\n",
        subject.len() * 7919 + body.len()
    )
    .into_bytes()
}

/// An incident's calls, from `mailcall incidents --json`.
pub fn calls(incident: &serde_json::Value) -> &Vec<serde_json::Value> {
    incident["calls"].as_array().unwrap()
}

/// Runs `mailcall ARGS` with a standard output whose reader is gone before the command
/// writes: every write fails with EPIPE.
pub fn with_closed_stdout(dir: &Path, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command(dir)
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}
