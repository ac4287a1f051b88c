//! The on-call commands of the binary: `oncall`, `override`, `silence`, and what
//! `route --at` and `status` add about rotations, silences and heartbeats. Like the rest
//! of the command line (and only it) it reports errors with `anyhow`.

use std::io::Write;

use anyhow::Context as _;
use jiff::Timestamp;

use mailcall::config::Config;
use mailcall::oncall::{self, Policy, Rotation};
use mailcall::route::Decision;
use mailcall::store::{Store, ms};

/// How many handoffs after the current one `oncall` shows.
const NEXT_HANDOFFS: usize = 3;

/// `--at` or now.
pub fn at(at: Option<&str>) -> anyhow::Result<Timestamp> {
    match at {
        None => Ok(Timestamp::now()),
        Some(t) => oncall::parse_time(t).map_err(anyhow::Error::msg),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The store's overrides and silences at `now`; none when there is no store yet.
pub fn policy(config: &Config, now: Timestamp) -> anyhow::Result<Policy> {
    if !config.state.path.exists() {
        return Ok(Policy::at(now));
    }
    let store = Store::open(&config.state.path, config.state.max_bytes)?;
    let mut policy = runtime()?.block_on(store.policy(now.as_millisecond()))?;
    // Routing reads what is not over yet; `--at` in the past wants what held then too,
    // which retention may have pruned: say nothing more than the store knows.
    policy.now = now;
    Ok(policy)
}

/// `mailcall oncall [--at T] [--json]`: per rotation, who is on call and the next
/// handoffs.
pub fn oncall(config: &Config, at_time: Option<&str>, json: bool) -> anyhow::Result<()> {
    let now = at(at_time)?;
    let policy = policy(config, now)?;
    let mut out = std::io::stdout().lock();
    if config.rotations.is_empty() && !json {
        writeln!(out, "no [[rotation]] in {}", config.path.display())?;
    }
    for rotation in config.rotations.values() {
        let plan = rotation.schedule(&policy.overrides, now, NEXT_HANDOFFS + 1);
        let Some((current, next)) = plan.split_first() else {
            continue;
        };
        if json {
            let next: Vec<serde_json::Value> = next
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "on_call": s.who,
                        "from": rotation.local(s.from),
                        "until": rotation.local(s.until),
                        "override": s.override_id,
                    })
                })
                .collect();
            let value = serde_json::json!({
                "rotation": rotation.name,
                "on_call": current.who,
                "until": rotation.local(current.until),
                "override": current.override_id,
                "next": next,
            });
            writeln!(out, "{value}")?;
            continue;
        }
        writeln!(
            out,
            "{}: {} until {}{}",
            rotation.name,
            current.who,
            rotation.local(current.until),
            overridden(current.override_id)
        )?;
        for s in next {
            writeln!(
                out,
                "  then {} until {}{}",
                s.who,
                rotation.local(s.until),
                overridden(s.override_id)
            )?;
        }
    }
    Ok(())
}

fn overridden(id: Option<i64>) -> String {
    id.map_or(String::new(), |id| format!(" (override {id})"))
}

/// The subcommands of `mailcall override`.
#[derive(Debug, clap::Subcommand)]
pub enum OverrideCmd {
    /// Put someone on call for a rotation for a while; prints the override's id first.
    Add {
        #[arg(long)]
        rotation: String,
        /// A contact.
        #[arg(long)]
        who: String,
        /// RFC 3339 (default: now).
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339.
        #[arg(long)]
        until: String,
    },
    /// Overrides not over yet.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete an override.
    Remove { id: i64 },
}

/// `mailcall override …`.
pub fn overrides(config: &Config, cmd: OverrideCmd) -> anyhow::Result<()> {
    let store = Store::open(&config.state.path, config.state.max_bytes)?;
    let rt = runtime()?;
    let mut out = std::io::stdout().lock();
    match cmd {
        OverrideCmd::Add {
            rotation,
            who,
            from,
            until,
        } => {
            let Some(r) = config.rotations.get(&rotation) else {
                let names: Vec<&str> = config.rotations.keys().map(String::as_str).collect();
                anyhow::bail!(
                    "no rotation `{rotation}` in {}; rotations: {}",
                    config.path.display(),
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                );
            };
            anyhow::ensure!(
                config.contacts.contains_key(&who),
                "`{who}` is not a contact; --who takes a name from [contacts]"
            );
            let from = at(from.as_deref())?;
            let until = oncall::parse_time(&until).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                until > from,
                "--until ({}) must be after --from ({})",
                r.local(until),
                r.local(from)
            );
            anyhow::ensure!(
                until > Timestamp::now(),
                "--until {} is already past; an override is for now or later",
                r.local(until)
            );
            let id = rt.block_on(store.add_override(
                rotation.clone(),
                who.clone(),
                from.as_millisecond(),
                until.as_millisecond(),
                "cli".into(),
            ))?;
            writeln!(out, "{id}")?;
            writeln!(
                out,
                "{rotation}: {who} on call from {} until {}",
                r.local(from),
                r.local(until)
            )?;
        }
        OverrideCmd::List { json } => {
            let list = rt.block_on(store.overrides(Timestamp::now().as_millisecond()))?;
            if list.is_empty() && !json {
                writeln!(out, "no overrides")?;
            }
            for o in list {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&o)?)?;
                } else {
                    writeln!(
                        out,
                        "{} {}: {} from {} until {}",
                        o.id, o.rotation, o.who, o.from, o.until
                    )?;
                }
            }
        }
        OverrideCmd::Remove { id } => {
            anyhow::ensure!(
                rt.block_on(store.remove_override(id))?,
                "no override {id}; see `mailcall override list`"
            );
            writeln!(out, "override {id} removed")?;
        }
    }
    Ok(())
}

/// The subcommands of `mailcall silence`.
#[derive(Debug, clap::Subcommand)]
pub enum SilenceCmd {
    /// Mute matching alerts for a while; prints the silence's id first.
    Add {
        /// `NAME=VALUE`, `NAME!=VALUE`, `NAME=~REGEX` or `NAME!~REGEX`; all must match.
        #[arg(long = "match", required = true)]
        matchers: Vec<String>,
        /// How long, e.g. 2h.
        #[arg(
            long = "for",
            conflicts_with = "until",
            required_unless_present = "until"
        )]
        duration: Option<String>,
        /// Until when (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Why (shown in lists and logs).
        #[arg(long)]
        comment: String,
    },
    /// Silences in force.
    List {
        #[arg(long)]
        json: bool,
    },
    /// End a silence now.
    Expire { id: i64 },
}

/// `mailcall silence …`.
pub fn silences(config: &Config, cmd: SilenceCmd) -> anyhow::Result<()> {
    let store = Store::open(&config.state.path, config.state.max_bytes)?;
    let rt = runtime()?;
    let mut out = std::io::stdout().lock();
    let now = Timestamp::now();
    match cmd {
        SilenceCmd::Add {
            matchers,
            duration,
            until,
            comment,
        } => {
            let parsed = oncall::silence::parse_matchers(
                matchers.iter().map(String::as_str),
                &config.silence_names(),
            )
            .map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                !comment.trim().is_empty(),
                "--comment is empty; say why, e.g. --comment \"kernel upgrade\""
            );
            let end = oncall::silence::end(duration.as_deref(), until.as_deref(), now)
                .map_err(anyhow::Error::msg)?;
            let texts: Vec<String> = parsed.iter().map(ToString::to_string).collect();
            let id = rt.block_on(store.add_silence(
                texts.clone(),
                now.as_millisecond(),
                end.as_millisecond(),
                comment.clone(),
                "cli".into(),
            ))?;
            writeln!(out, "{id}")?;
            writeln!(
                out,
                "silenced until {}: {} ({comment})",
                mailcall::store::rfc3339(end.as_millisecond()),
                texts.join(" ")
            )?;
        }
        SilenceCmd::List { json } => {
            let list = rt.block_on(store.silences(now.as_millisecond()))?;
            if list.is_empty() && !json {
                writeln!(out, "no silences in force")?;
            }
            let known = config.silence_names();
            for s in list {
                if json {
                    writeln!(out, "{}", s.listed(&known))?;
                    continue;
                }
                let unknown = oncall::silence::unknown_in_texts(&s.matchers, &known);
                writeln!(
                    out,
                    "{} until {}: {} ({})",
                    s.id,
                    s.ends_at,
                    s.matchers.join(" "),
                    s.comment
                )?;
                if !unknown.is_empty() {
                    writeln!(
                        out,
                        "  warning: ignored: no rule captures `{}` any more; expire it (`mailcall silence expire {}`) and add one the rules can match",
                        unknown.join("`, `"),
                        s.id
                    )?;
                }
            }
        }
        SilenceCmd::Expire { id } => {
            anyhow::ensure!(
                rt.block_on(store.expire_silence(id, now.as_millisecond()))?,
                "no silence {id} in force; see `mailcall silence list`"
            );
            writeln!(out, "silence {id} expired")?;
        }
    }
    Ok(())
}

/// What `route` adds about on-call policy, as lines (`  label: text`).
pub fn route_trace(config: &Config, d: &Decision, policy: &Policy) -> Vec<String> {
    let mut lines = Vec::new();
    for (rule, why) in &d.trace.skipped {
        lines.push(format!(
            "  skipped:   rule {rule:?}: outside its time: {why}"
        ));
    }
    if let Some(when) = &d.trace.when {
        lines.push(format!("  when:      {when} (inside)"));
    }
    for o in &d.trace.on_call {
        let until = config
            .rotations
            .get(&o.rotation)
            .map_or_else(|| o.until.to_string(), |r: &Rotation| r.local(o.until));
        lines.push(format!(
            "  on call:   {}: {} until {until}{}",
            o.rotation,
            o.who,
            overridden(o.override_id)
        ));
    }
    if let Some(id) = d.silenced_by {
        let s = policy.silences.iter().find(|s| s.id == id);
        lines.push(format!(
            "  silenced:  by silence {id}{}: recorded, nobody is called",
            s.map_or(String::new(), |s| format!(
                " ({}) until {}",
                s.comment,
                mailcall::store::rfc3339(s.ends_at.as_millisecond())
            ))
        ));
    }
    for e in &d.escalations {
        lines.push(format!(
            "  escalate:  after {}, if nobody is in the bridge: {}",
            humantime::format_duration(e.after),
            e.numbers.join(", ")
        ));
    }
    lines
}

/// The same for `route --json`.
pub fn route_trace_json(d: &Decision) -> serde_json::Value {
    serde_json::json!({
        "skipped": d.trace.skipped.iter().map(|(rule, why)| serde_json::json!({"rule": rule, "why": why})).collect::<Vec<_>>(),
        "when": d.trace.when,
        "on_call": d.trace.on_call.iter().map(|o| serde_json::json!({
            "rotation": o.rotation, "who": o.who, "until": o.until.to_string(), "override": o.override_id,
        })).collect::<Vec<_>>(),
        "silenced_by": d.silenced_by,
        "escalate": d.escalations.iter().map(|e| serde_json::json!({
            "after": humantime::format_duration(e.after).to_string(), "numbers": e.numbers,
        })).collect::<Vec<_>>(),
    })
}

/// `status`' lines about heartbeats: each one's last beat and deadline.
pub fn heartbeat_status(config: &Config) -> anyhow::Result<Vec<String>> {
    if config.heartbeats.is_empty() || !config.state.path.exists() {
        return Ok(Vec::new());
    }
    let store = Store::open(&config.state.path, config.state.max_bytes)?;
    let names: Vec<String> = config.heartbeats.iter().map(|h| h.name.clone()).collect();
    let now = mailcall::store::now_ms();
    let rows = runtime()?.block_on(store.heartbeats(names, now))?;
    let mut lines = vec!["  heartbeats".to_string()];
    for (hb, row) in config.heartbeats.iter().zip(rows) {
        let deadline = row.base().saturating_add(ms(hb.every + hb.grace));
        let last = row
            .last_beat_at
            .map_or("never".to_string(), mailcall::store::rfc3339);
        lines.push(format!(
            "    {:<16} {:<8} last beat {last}, deadline {}{}",
            hb.name,
            row.state,
            mailcall::store::rfc3339(deadline),
            if deadline <= now { " (PASSED)" } else { "" }
        ));
    }
    Ok(lines)
}
