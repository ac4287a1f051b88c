//! The pure path per mail: MIME parse → route → speech → TwiML (criterion).
//! `cargo bench` runs it; BENCHMARKS.md has the numbers.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mailcall::alert::{Alert, Envelope};
use mailcall::config::Config;
use mailcall::route;
use mailcall::twilio::twiml;

fn pipeline(c: &mut Criterion) {
    let config = Config::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rules.toml"
    )))
    .unwrap();
    let envelope = Envelope {
        mail_from: Some("monitor@example.com".into()),
        rcpt_to: vec!["alerts@example.com".into()],
    };
    let mut group = c.benchmark_group("mail → TwiML");
    for name in [
        "nagios.eml",
        "alertmanager.eml",
        "iso2022jp.eml",
        "shift_jis.eml",
        "cloudwatch.eml",
        "iso2022jp-long.eml",
        // Alertmanager's default HTML-only mail (20 KiB of inline styles) through html2text.
        "../corpus/alertmanager-firing.eml",
    ] {
        let raw = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap();
        let policy = mailcall::oncall::Policy::now();
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |b| {
            b.iter(|| {
                let alert = Alert::from_mime(std::hint::black_box(&raw), &envelope);
                let d = route::route(&config, &alert, &policy);
                twiml::call(
                    &d.message,
                    &d.language,
                    &d.voice,
                    "mailcall-0123456789abcdef",
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
