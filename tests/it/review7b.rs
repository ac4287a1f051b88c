//! Review 7b of commit 62067e8 (`{body}` is cleaned of quoted history and a forward's
//! header block before the template and the dedup key; `status`/`call` keep their
//! verdict on a closed pipe; silences list their `unknown_names`). Each test drives the
//! real `mailcall route --json` and fails on the code as it stands, for a defect named
//! in its doc comment.

use serde_json::Value;

use std::time::Duration;

use crate::harness::{Daemon, command, config, wait_incidents, workdir};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A cron mail (as Vixie cron sends a job's output to MAILTO) whose output is `output`.
fn cron_mail(output: &str) -> String {
    format!(
        "From: root@db1.example.com (Cron Daemon)\r\n\
         To: alerts@example.com\r\n\
         Subject: Cron <root@db1> /usr/local/bin/sync-backup.sh\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=UTF-8\r\n\
         Date: Tue,  8 Dec 2026 03:00:01 +0900 (JST)\r\n\
         \r\n\
         {}",
        output.replace('\n', "\r\n")
    )
}

/// `mailcall route --json` of each mail under the configuration `rules`.
fn route(rules: &str, mails: &[String]) -> Vec<Value> {
    let dir = workdir();
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    let mut cmd = command(dir.path());
    cmd.args(["route", "--json"]);
    for (i, mail) in mails.iter().enumerate() {
        let path = dir.path().join(format!("mail{i}.eml"));
        std::fs::write(&path, mail).unwrap();
        cmd.arg(path);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn shipped_rules() -> String {
    std::fs::read_to_string(format!("{ROOT}/rules.toml")).unwrap()
}

/// A backup job's output that names its source and destination first, as `From:` and
/// `To:` lines, then the errors that matter, then its verdict.
const BACKUP_OUTPUT: &str = "From: /var/lib/postgresql\n\
To: backup1:/srv/backup/db1\n\
rsync: write failed on \"/srv/backup/db1/base.tar\": No space left on device (28)\n\
rsync error: error in file IO (code 11) at receiver.c(374)\n\
\n\
sync-backup.sh: FAILED (exit 11)\n";

/// Defect: a cron job's output that begins with a `From:` line and a `To:` line is
/// taken for a forward's header block, and everything up to its first blank line is
/// dropped — including lines that are no header field at all. Measured: the shipped
/// `cron` rule (`Cron job on {host} said: {body}`) on a backup job whose output is
/// `From: /var/lib/postgresql` / `To: backup1:/srv/backup/db1` / `rsync: write failed
/// … No space left on device (28)` / `rsync error: …` / blank / `sync-backup.sh: FAILED
/// (exit 11)` speaks only "Cron job on db1 said: sync-backup dot sh: FAILED exit 11":
/// why it failed (the disk is full) is gone. Before 62067e8 the whole output was
/// spoken (the template's words came first, so no block "opened" the body). The
/// on-call engineer is woken and not told the one thing to fix. Cause: src/speech.rs
/// `unquoted_lines` skips `past_block` (up to the first blank line within 16 lines)
/// whenever `opens_header_block` sees `From:` plus any other field, with no check that
/// the lines it skips are header fields (or a wrapped field's continuation).
#[test]
fn a_cron_output_opening_with_from_and_to_lines_keeps_its_error_lines() {
    let out = route(&shipped_rules(), &[cron_mail(BACKUP_OUTPUT)]);
    assert_eq!(out[0]["rule"], "cron", "{}", out[0]);
    let message = out[0]["message"].as_str().unwrap();
    assert!(
        message.contains("No space left on device"),
        "the job's error is spoken: {message:?}"
    );
}

/// Defect: two different cron failures collapse onto one dedup key when `{body}` is in
/// it, so the second problem rings nobody. Measured: a rule keyed `{host}: {body}` (one
/// incident per distinct job output; repeats of the same output within the cooldown
/// ring nobody again) gets, over SMTP on a dry-run daemon, two backup failures whose
/// outputs open with different `From:`/`To:` lines and different rsync errors (disk
/// full on backup1 vs. connection refused by backup2) but end with the same
/// `FAILED (exit 11)` line: `mailcall route` gives both the key
/// `db1: sync-backup.sh: FAILED (exit 11)`, and the daemon opens one incident with
/// `alert_count` 2: the second failure joins the first and calls nobody. Before 62067e8
/// the key was the raw body and they were two incidents. Cause: src/route.rs `decide`
/// renders the dedup key from `speech::unquoted(&alert.body)`, which drops the whole
/// first paragraph as a "header block" (src/speech.rs `past_block`); the key must not
/// lose the alert's own lines (at most real header fields should go).
#[test]
fn different_job_outputs_opening_with_from_lines_are_different_incidents() {
    let rules = config(
        None,
        "[[rule]]\nname = \"cron\"\nsubject = '^Cron <[^@>]+@(?P<host>[^>]+)> '\n\
         call = [\"alice\"]\nmessage = \"Cron job on {host} said: {body}\"\n\
         dedup_key = \"{host}: {body}\"\n",
    );
    let other = "From: /var/lib/mysql\n\
To: backup2:/srv/backup/db1\n\
rsync: failed to connect to backup2 (10.0.1.42): Connection refused (111)\n\
rsync error: error in socket IO (code 10) at clientserver.c(127)\n\
\n\
sync-backup.sh: FAILED (exit 11)\n";
    let mails = [cron_mail(BACKUP_OUTPUT), cron_mail(other)];
    let keys: Vec<Value> = route(&rules, &mails)
        .iter()
        .map(|d| d["dedup_key"].clone())
        .collect();

    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &rules, true);
    let mut smtp = daemon.smtp();
    for (i, mail) in mails.iter().enumerate() {
        let mail = mail.replacen(
            "MIME-Version",
            &format!("Message-ID: <backup-{i}@db1.example.com>\r\nMIME-Version"),
            1,
        );
        let (code, text) = smtp.send(
            "root@db1.example.com",
            &["alerts@example.com"],
            mail.as_bytes(),
        );
        assert_eq!(code, 250, "{text}");
    }
    // Both alerts are routed: one incident with two alerts, or two with one each.
    let list = wait_incidents(dir.path(), Duration::from_secs(20), |list| {
        list.iter()
            .map(|i| i["alert_count"].as_i64().unwrap_or(0))
            .sum::<i64>()
            >= 2
    });
    assert_eq!(
        list.len(),
        2,
        "two different failures are two incidents (keys {keys:?}): {list:#?}"
    );
}
