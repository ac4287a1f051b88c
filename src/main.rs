//! The `mailcall` command line: parses arguments, sets up logging, and hands over to the
//! library. The only place that uses `anyhow` and decides exit codes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod oncall_cli;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use mailcall::alert::{Alert, DirectAlert, Envelope};
use mailcall::config::{Config, ConfigError};
use mailcall::dispatch::{Caller, Dispatcher, call_twiml};
use mailcall::health::{Health, Worker};
use mailcall::ingest::Secrets;
use mailcall::logging::{self, Logs};
use mailcall::metrics::Metrics;
use mailcall::notify::{Message, Notifier};
use mailcall::route::{self, Action};
use mailcall::server::{self, Listeners};
use mailcall::settings::{Live, LoadError, Settings};
use mailcall::store::{AlertState, CallState, DaemonLock, NewAlert, Store, StoreError};
use mailcall::twilio;

/// Turns alert e-mails into phone calls: everyone on call is rung at once, and whoever
/// answers joins one conference per incident.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "MAILCALL_CONFIG",
        default_value = "rules.toml"
    )]
    config: PathBuf,
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: receive alert mail and place the calls.
    Serve {
        /// Place no calls: log each call that would be placed. Needs no credentials.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the configuration; print every problem as PATH:LINE:COLUMN: message.
    Check,
    /// Print what `serve` would do with each mail (stdin when no file), calling nobody.
    Route {
        /// One JSON object per mail per line.
        #[arg(long)]
        json: bool,
        /// Route as at this time (RFC 3339): time conditions, rotations, silences.
        #[arg(long)]
        at: Option<String>,
        /// RFC 5322 message files (.eml).
        files: Vec<PathBuf>,
    },
    /// Place calls now, as an alert would: `--to alice,+15005550009 --message "DB is down"`.
    Call(CallArgs),
    /// Ask the running daemon how it is (its /healthz); exit 0 healthy, 1 unhealthy,
    /// 2 unreachable.
    Status,
    /// Who is on call for each rotation, and the next handoffs.
    Oncall {
        /// As at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// One JSON object per rotation per line.
        #[arg(long)]
        json: bool,
    },
    /// Overrides of rotations: someone else on call for a while.
    Override {
        #[command(subcommand)]
        command: oncall_cli::OverrideCmd,
    },
    /// Silences: mute matching alerts for a while (maintenance).
    Silence {
        #[command(subcommand)]
        command: oncall_cli::SilenceCmd,
    },
    /// Show recent incidents and the status of their calls, newest first.
    Incidents {
        /// One JSON object per incident per line.
        #[arg(long)]
        json: bool,
        /// How many incidents to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Debug, clap::Args)]
struct CallArgs {
    /// Comma-separated contacts, groups and E.164 numbers.
    #[arg(long)]
    to: String,
    /// The text to speak.
    #[arg(long)]
    message: String,
    /// `<Say language>`; default from [defaults].
    #[arg(long)]
    language: Option<String>,
    /// `<Say voice>`; default from [defaults].
    #[arg(long)]
    voice: Option<String>,
    /// Incident key; the same key within the cooldown joins the open incident.
    #[arg(long)]
    dedup_key: Option<String>,
    /// A drill: the alert and its incident are a dry run, never dialled by this or
    /// any other process (with a running daemon too); Twilio is not contacted.
    #[arg(long)]
    dry_run: bool,
    /// How long to wait for a running daemon to place the calls.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    wait: Duration,
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let logs = logging::init(matches!(cli.log_format, LogFormat::Json));
    let result = match cli.command {
        Command::Serve { dry_run } => serve(&cli.config, dry_run, &logs),
        Command::Check => return check(&cli.config),
        Command::Route { json, at, files } => route_files(&cli.config, json, at, &files),
        Command::Oncall { at, json } => {
            load(&cli.config).and_then(|c| oncall_cli::oncall(&c, at.as_deref(), json))
        }
        Command::Override { command } => {
            load(&cli.config).and_then(|c| oncall_cli::overrides(&c, command))
        }
        Command::Silence { command } => {
            load(&cli.config).and_then(|c| oncall_cli::silences(&c, command))
        }
        Command::Incidents { json, limit } => incidents(&cli.config, json, limit),
        Command::Status => return status(&cli.config),
        Command::Call(args) => match call(&cli.config, args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailcall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mailcall incidents | head -1`: once the reader has gone, there is nobody left to
/// tell anything, so a command stops quietly with exit 0 instead of reporting
/// "Broken pipe". Output written with `writeln!` returns the error (see [`closed_pipe`]);
/// `println!` panics on it, which this hook turns into the same quiet exit.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Did a command fail only because its standard output was closed?
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes a command's report whose exit code is a verdict (`check`, `status`, `call`):
/// a closed pipe has nobody to tell, but a script with `pipefail` still gets the
/// verdict (an invalid config, an unhealthy daemon, a call not placed is never 0).
fn emit_verdict(report: &str) {
    let _ = std::io::stdout().lock().write_all(report.as_bytes());
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| match e {
        ConfigError::Invalid(problems) => anyhow::anyhow!("invalid configuration:\n{problems}"),
        other => anyhow::anyhow!(other),
    })
}

/// `mailcall check`: exits by the configuration's validity.
fn check(path: &Path) -> ExitCode {
    let (report, code) = match Config::load(path) {
        Ok(config) => {
            let mut report = format!(
                "{}: ok ({} rules, {} contacts, {} groups)\n",
                path.display(),
                config.rules.len(),
                config.contacts.len(),
                config.groups.len()
            );
            for warning in config.warnings() {
                report.push_str(&format!("{}: warning: {warning}\n", path.display()));
            }
            (report, ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(problems)) => (format!("{problems}\n"), ExitCode::FAILURE),
        Err(e) => {
            eprintln!("mailcall: {e}");
            return ExitCode::FAILURE;
        }
    };
    emit_verdict(&report);
    code
}

fn serve(path: &Path, dry_run: bool, logs: &Logs) -> anyhow::Result<()> {
    let settings = Settings::load(path).map_err(settings_error)?;
    let caller = caller(&settings.config, dry_run)?;
    let _lock = DaemonLock::acquire(&settings.config.state.path)?;
    let mut store = Store::open(&settings.config.state.path, settings.config.state.max_bytes)?;
    if dry_run {
        store = store.dry_run();
    }
    tracing::info!(path = %settings.config.state.path.display(), "store open");
    let metrics = Arc::new(
        Metrics::new(settings.config.state.path.clone()).with_log_drops(logs.dropped.clone()),
    );
    let live = settings.live();
    let notifier = Notifier::start();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&live.load().config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        warn_ignored_silences(&store, &live).await;
        tokio::spawn(reload_on_sighup(
            Arc::clone(&live),
            path.to_path_buf(),
            store.clone(),
            Arc::clone(&metrics),
            notifier.clone(),
        ));
        server::run(live, store, caller, listeners, metrics, notifier, shutdown).await;
        Ok::<(), anyhow::Error>(())
    })?;
    // A runtime thread stuck in a blocking call must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Turns a settings error into the message an operator needs (every config problem).
fn settings_error(e: LoadError) -> anyhow::Error {
    match e {
        LoadError::Config(ConfigError::Invalid(problems)) => {
            anyhow::anyhow!("invalid configuration:\n{problems}")
        }
        other => anyhow::anyhow!(other),
    }
}

/// Twilio, or the dry-run logger; without credentials only the latter.
fn caller(config: &Config, dry_run: bool) -> anyhow::Result<Caller> {
    if dry_run {
        tracing::warn!("dry run: no calls will be placed, each would-be call is logged");
        return Ok(Caller::DryRun);
    }
    let credentials = twilio::Credentials::from_env()?;
    Ok(Caller::Twilio(
        twilio::Client::new(
            &config.twilio.api_base,
            credentials,
            config.twilio.request_timeout,
        )
        .context("cannot create the HTTP client for Twilio")?,
    ))
}

/// `mailcall call`: the same calls as an alert, from the command line. With a daemon
/// serving the store, the alert is handed to it through the store; otherwise this
/// process places the calls itself.
fn call(path: &Path, args: CallArgs) -> anyhow::Result<ExitCode> {
    // Refused like the /alert webhook refuses it: a call that says nothing helps nobody.
    anyhow::ensure!(
        !args.message.trim().is_empty(),
        "--message is empty; give the text to speak, e.g. --message \"db1 is down\""
    );
    let config = Arc::new(load(path)?);
    let numbers = route::resolve_numbers(&config, &args.to).map_err(|unknown| {
        anyhow::anyhow!(
            "not E.164 numbers, contacts or groups: {}; write numbers as +81312345678",
            unknown.join(", ")
        )
    })?;
    anyhow::ensure!(
        !numbers.is_empty(),
        "--to names nobody; give contacts, groups or E.164 numbers"
    );
    if let Some(language) = args
        .language
        .as_deref()
        .filter(|l| !mailcall::config::is_language(l))
    {
        anyhow::bail!("invalid --language {language:?}; write e.g. en-US or ja-JP");
    }
    if let Some(voice) = args
        .voice
        .as_deref()
        .filter(|v| !mailcall::config::is_voice(v))
    {
        anyhow::bail!("invalid --voice {voice:?}; write e.g. Polly.Joanna or alice");
    }
    let alert = NewAlert {
        source: "cli",
        direct: Some(DirectAlert {
            numbers,
            message: args.message,
            language: args.language,
            voice: args.voice,
            dedup_key: args.dedup_key,
            ..DirectAlert::default()
        }),
        ..NewAlert::default()
    };
    let open = || -> anyhow::Result<Store> {
        let store = Store::open(&config.state.path, config.state.max_bytes)?;
        Ok(if args.dry_run { store.dry_run() } else { store })
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + args.wait;
        let (store, id) = match DaemonLock::acquire(&config.state.path) {
            Ok(lock) => {
                // Credentials are checked before anything is stored.
                let caller = caller(&config, args.dry_run)?;
                let store = open()?;
                let id = store.insert_alert(alert).await?.id;
                return dispatch_here(&config, &store, caller, id, lock, deadline).await;
            }
            Err(StoreError::Locked { .. }) => {
                let store = open()?;
                let id = store.insert_alert(alert).await?.id;
                if args.dry_run {
                    eprintln!("stored as alert {id}; the running daemon records it as a dry run");
                } else {
                    eprintln!("stored as alert {id}; the running daemon places the calls");
                }
                (store, id)
            }
            Err(e) => return Err(e.into()),
        };
        // Whoever holds the lock dispatches. That may be another `mailcall call`, which
        // leaves once its own calls settle: then this process takes over, so the alert
        // is never left waiting for a daemon that is not coming.
        loop {
            let status = call_status(&store, id).await?;
            if status.done() || tokio::time::Instant::now() >= deadline {
                return Ok(print_call(id, &status));
            }
            match DaemonLock::acquire(&config.state.path) {
                Ok(lock) => {
                    eprintln!("the store's lock came free: this process places the calls");
                    let caller = caller(&config, args.dry_run)?;
                    return dispatch_here(&config, &store, caller, id, lock, deadline).await;
                }
                Err(StoreError::Locked { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Runs the dispatch workers in this process (it holds the store's lock) until the
/// alert's calls settle or `deadline`, then prints them. No rounds: this process does
/// not stay; a later daemon runs them. No listeners, so no secrets or certificate.
async fn dispatch_here(
    config: &Config,
    store: &Store,
    caller: Caller,
    id: i64,
    _lock: DaemonLock,
    deadline: tokio::time::Instant,
) -> anyhow::Result<ExitCode> {
    let live = Settings {
        config: config.clone(),
        secrets: Secrets::default(),
        tls: None,
    }
    .live();
    let shutdown = CancellationToken::new();
    let dispatcher = Arc::new(Dispatcher::new(
        live,
        store.clone(),
        caller,
        Arc::new(Notify::new()),
        Arc::new(Health::default()),
        Arc::new(Metrics::new(config.state.path.clone())),
        shutdown.clone(),
    ));
    let workers: Vec<Worker> = dispatcher
        .workers()
        .iter()
        .copied()
        .filter(|w| *w != Worker::Rounds)
        .collect();
    let tasks = TaskTracker::new();
    dispatcher.start(&tasks, &workers).await;
    let code = report_call(store, id, deadline).await;
    shutdown.cancel();
    tasks.close();
    dispatcher.calls.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        tasks.wait().await;
        dispatcher.calls.wait().await;
    })
    .await;
    code
}

/// Where an alert given to `mailcall call` stands.
#[derive(Debug)]
enum CallStatus {
    /// It joined an open incident: nobody is called again.
    Deduplicated(i64),
    /// Routed into an incident; `settled` once every call is final.
    Routed {
        report: Box<mailcall::store::IncidentReport>,
        settled: bool,
    },
    /// Not routed yet.
    Waiting,
}

impl CallStatus {
    fn done(&self) -> bool {
        matches!(
            self,
            CallStatus::Deduplicated(_) | CallStatus::Routed { settled: true, .. }
        )
    }
}

async fn call_status(store: &Store, alert: i64) -> anyhow::Result<CallStatus> {
    let (state, action, incident) = store.alert_outcome(alert).await?;
    if action.as_deref() == Some("deduplicated") {
        return Ok(CallStatus::Deduplicated(incident.unwrap_or_default()));
    }
    let report = match incident {
        Some(id) if state == AlertState::Routed => store.incident(id).await?,
        _ => None,
    };
    Ok(match report {
        Some(report) => {
            let settled = report.calls.iter().all(|c| c.status.is_final());
            CallStatus::Routed {
                report: Box::new(report),
                settled,
            }
        }
        None => CallStatus::Waiting,
    })
}

/// Waits (until `deadline`) for the alert's calls to settle and prints them.
async fn report_call(
    store: &Store,
    alert: i64,
    deadline: tokio::time::Instant,
) -> anyhow::Result<ExitCode> {
    loop {
        let status = call_status(store, alert).await?;
        if status.done() || tokio::time::Instant::now() >= deadline {
            return Ok(print_call(alert, &status));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints where the alert stands. Exit 0 when every call was placed (or is a dry run,
/// or the alert joined an open incident), 1 otherwise.
fn print_call(alert: i64, status: &CallStatus) -> ExitCode {
    let (report, code) = call_report(alert, status);
    emit_verdict(&report);
    code
}

fn call_report(alert: i64, status: &CallStatus) -> (String, ExitCode) {
    let report = match status {
        CallStatus::Deduplicated(incident) => {
            return (
                format!("same problem as open incident #{incident}: nobody is called again\n"),
                ExitCode::SUCCESS,
            );
        }
        CallStatus::Waiting => {
            return (
                format!("alert {alert} is not routed yet; see `mailcall incidents` later\n"),
                ExitCode::FAILURE,
            );
        }
        CallStatus::Routed { report, .. } => report,
    };
    let drill = if report.dry_run { " (dry run)" } else { "" };
    let mut out = format!(
        "incident #{}{drill} (room mailcall-{})\n",
        report.id, report.public_id
    );
    let mut all_placed = true;
    for c in &report.calls {
        all_placed &= matches!(c.status, CallState::Placed | CallState::DryRun);
        out.push_str(&format!(
            "  {:<16} {:<10} {}\n",
            c.number,
            c.status,
            call_detail(c)
        ));
    }
    let code = if all_placed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    (out, code)
}

/// A call's SID, or why it has none.
fn call_detail(c: &mailcall::store::CallReport) -> String {
    match (&c.sid, c.error_code, &c.error) {
        (Some(sid), _, _) => sid.clone(),
        (None, Some(code), Some(e)) => format!("error {code}: {e}"),
        (None, _, Some(e)) => e.clone(),
        _ => String::new(),
    }
}

/// Warns about each silence in force that the configuration in force makes ignored (it
/// names a capture no rule defines any more): at start and after each reload, when
/// someone is there to read it.
async fn warn_ignored_silences(store: &Store, live: &Live) {
    let policy = match store.policy(mailcall::store::now_ms()).await {
        Ok(policy) => policy,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the silences in force");
            return;
        }
    };
    let known = live.load().config.silence_names();
    for s in &policy.silences {
        let unknown = s.unknown_names(&known);
        if !unknown.is_empty() {
            tracing::warn!(silence = s.id, names = ?unknown, comment = %s.comment,
                "silence ignored: no rule captures what it names any more; expire it and add one the rules can match");
        }
    }
}

/// `systemctl reload` (SIGHUP): reads the configuration (and certificate) again and swaps
/// it in only if all of it is valid; otherwise logs every problem and keeps the old one.
async fn reload_on_sighup(
    live: Live,
    path: PathBuf,
    store: Store,
    metrics: Arc<Metrics>,
    notifier: Notifier,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reloading is unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        notifier.send(Message::Reloading);
        tracing::info!(path = %path.display(), "SIGHUP received: reloading the configuration");
        // Reading files (config, certificate) blocks: off the async workers.
        let (reload_live, reload_path) = (Arc::clone(&live), path.clone());
        let reloaded =
            tokio::task::spawn_blocking(move || Settings::reload(&reload_live, &reload_path)).await;
        let Ok(reloaded) = reloaded else {
            tracing::error!("the configuration reload panicked; the old one stays in force");
            continue;
        };
        let result = match reloaded {
            Ok(needs_restart) => {
                for what in needs_restart {
                    tracing::warn!(setting = %what, "changed, but takes effect only after a restart");
                }
                tracing::info!("configuration reloaded");
                warn_ignored_silences(&store, &live).await;
                "ok"
            }
            Err(LoadError::Config(ConfigError::Invalid(problems))) => {
                for line in problems.to_string().lines() {
                    tracing::error!(problem = %line, "configuration NOT reloaded");
                }
                "failed"
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration NOT reloaded; the old one stays in force");
                "failed"
            }
        };
        metrics
            .reloads
            .get_or_create(&mailcall::metrics::Outcome { result })
            .inc();
        notifier.send(Message::Ready("accepting alerts"));
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn status(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailcall: {e:#}");
            return ExitCode::from(2);
        }
    };
    let Some(http) = &config.http else {
        eprintln!(
            "mailcall: status asks the daemon's HTTP server; add [http] listen = \"127.0.0.1:8025\" to {}",
            path.display()
        );
        return ExitCode::from(2);
    };
    let mut addr = http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/healthz");
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let response = reqwest::Client::new()
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await?;
                let code = response.status();
                let body: serde_json::Value = response.json().await?;
                Ok::<_, anyhow::Error>((code, body))
            })
        });
    match answer {
        Ok((code, body)) => {
            let mut report = format!(
                "mailcall at {addr}: {}\n",
                body["status"].as_str().unwrap_or("?")
            );
            for part in ["store", "dispatcher", "smtp"] {
                let ok = body[part].as_bool().unwrap_or(false);
                report.push_str(&format!(
                    "  {part:<10} {}\n",
                    if ok { "ok" } else { "FAILING" }
                ));
            }
            if let Some(workers) = body["workers"].as_object() {
                for (name, w) in workers {
                    let ok = w["ok"].as_bool().unwrap_or(false);
                    let age = w["age_ms"].as_i64().unwrap_or(-1);
                    report.push_str(&format!(
                        "    {name:<12} {} (heartbeat {age} ms ago)\n",
                        if ok { "ok" } else { "STUCK" }
                    ));
                }
            }
            match oncall_cli::heartbeat_status(&config) {
                Ok(lines) => {
                    for line in lines {
                        report.push_str(&line);
                        report.push('\n');
                    }
                }
                Err(e) => eprintln!("mailcall: cannot read the heartbeats: {e:#}"),
            }
            emit_verdict(&report);
            if code.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("mailcall: no answer from {url}: {e:#}; is the daemon running?");
            ExitCode::from(2)
        }
    }
}

fn route_files(
    path: &Path,
    json: bool,
    at: Option<String>,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    let config = load(path)?;
    let now = oncall_cli::at(at.as_deref())?;
    let policy = oncall_cli::policy(&config, now)?;
    let mut inputs = Vec::new();
    if files.is_empty() {
        let mut raw = Vec::new();
        std::io::stdin()
            .read_to_end(&mut raw)
            .context("cannot read the mail from stdin")?;
        inputs.push(("-".to_string(), raw));
    }
    for file in files {
        let raw = std::fs::read(file)
            .with_context(|| format!("cannot read mail file {}", file.display()))?;
        inputs.push((file.display().to_string(), raw));
    }
    let mut out = std::io::stdout().lock();
    for (name, raw) in inputs {
        let alert = Alert::from_mime(&raw, &Envelope::default());
        let d = route::route(&config, &alert, &policy);
        // What `serve` would send (press 1 with a public URL), for a room named `preview`.
        let twiml = (d.action == Action::Call).then(|| call_twiml(&config, &d, "preview"));
        if json {
            let value = serde_json::json!({
                "rule": d.rule,
                "action": d.action,
                "numbers": d.numbers,
                "message": d.message,
                "language": d.language,
                "voice": d.voice,
                "dedup_key": d.dedup_key,
                "twiml": twiml,
                "at": now.to_string(),
                "policy": oncall_cli::route_trace_json(&d),
            });
            writeln!(out, "{value}")?;
        } else {
            let rule = d
                .rule
                .as_deref()
                .map_or("no rule matches".to_string(), |r| format!("rule {r:?}"));
            writeln!(out, "{name}: {rule} → {}", d.action.as_str())?;
            writeln!(out, "  subject:   {}", alert.subject)?;
            writeln!(out, "  at:        {now}")?;
            for line in oncall_cli::route_trace(&config, &d, &policy) {
                writeln!(out, "{line}")?;
            }
            if d.action == Action::Call {
                writeln!(out, "  numbers:   {}", d.numbers.join(", "))?;
                writeln!(out, "  message:   {}", d.message)?;
                writeln!(out, "  voice:     {} ({})", d.voice, d.language)?;
                writeln!(
                    out,
                    "  dedup key: {} (cooldown {})",
                    d.dedup_key,
                    humantime::format_duration(d.cooldown)
                )?;
            }
        }
    }
    Ok(())
}

fn incidents(path: &Path, json: bool, limit: usize) -> anyhow::Result<()> {
    let config = load(path)?;
    let incidents = Store::incidents(&config.state.path, limit)?;
    let mut out = std::io::stdout().lock();
    if incidents.is_empty() && !json {
        writeln!(out, "no incidents yet in {}", config.state.path.display())?;
    }
    for i in incidents {
        if json {
            writeln!(out, "{}", serde_json::to_string(&i)?)?;
            continue;
        }
        let drill = if i.dry_run { " (dry run)" } else { "" };
        writeln!(
            out,
            "#{} {} {}{drill} rule {:?} key {:?} alerts {} room mailcall-{} {}",
            i.id, i.opened_at, i.kind, i.rule, i.dedup_key, i.alert_count, i.public_id, i.status
        )?;
        if let Some(silence) = i.silence_id {
            writeln!(out, "  silenced by silence {silence}: nobody was called")?;
        }
        for r in &i.rounds {
            let outcome = r.outcome.map_or("going on", |o| o.as_str());
            writeln!(out, "  round {} {}: {outcome}", r.round, r.started_at)?;
        }
        for c in &i.calls {
            writeln!(
                out,
                "  {:<16} {:<10} round {} attempts {}  {}",
                c.number,
                c.status,
                c.round,
                c.attempts,
                call_detail(c)
            )?;
            for a in &c.requests {
                let detail = match (&a.sid, &a.error) {
                    (Some(sid), _) => sid.clone(),
                    (None, Some(e)) => match a.error_code {
                        Some(code) => format!("error {code}: {e}"),
                        None => e.clone(),
                    },
                    (None, None) => String::new(),
                };
                let how = a
                    .reconciled
                    .as_deref()
                    .map_or(String::new(), |r| format!(" (reconciled: {r})"));
                writeln!(
                    out,
                    "      request {} {} {:<10} {detail}{how}",
                    a.id, a.requested_at, a.state
                )?;
            }
        }
    }
    Ok(())
}
