//! Rotations: who is on call when, from `[[rotation]]` and the overrides in the store.
//!
//! Shift `n` (counted from `start`, negative before it) begins at `start + n × shift`,
//! computed in the rotation's time zone: a shift of days or weeks keeps its wall-clock
//! handoff across a daylight-saving change (09:00 stays 09:00 in America/New_York, and
//! the shift that holds the change is an hour shorter or longer), while a shift of hours
//! is that many real hours. Member `n mod len` holds shift `n`.
//!
//! An override puts someone else on call for `[from, until)`; where overrides overlap
//! the one added last wins.

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, Unit, ZonedDateTime};

/// A validated `[[rotation]]`.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub name: String,
    /// Contact names, in turn order.
    pub members: Vec<String>,
    pub shift: Span,
    /// The first handoff, in the rotation's time zone.
    pub start: ZonedDateTime,
}

/// An override from the store: `who` is on call for `rotation` during `[from, until)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub id: i64,
    pub rotation: String,
    pub who: String,
    pub from: Timestamp,
    pub until: Timestamp,
}

/// Someone on call for a stretch of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// A contact name.
    pub who: String,
    pub from: Timestamp,
    pub until: Timestamp,
    /// The override that put them there, if any.
    pub override_id: Option<i64>,
}

/// The most corrections a lookup makes to its estimate; far more than any calendar
/// irregularity (a DST change moves a day shift by an hour) needs.
const MAX_STEPS: usize = 64;
/// The most shifts [`Rotation::schedule`] walks: a rotation whose member never changes
/// (one person, or overrides covering every handoff) shows that far ahead, not to the
/// end of the calendar.
const MAX_SCHEDULE_SHIFTS: usize = 1024;

impl Rotation {
    /// The time zone handoffs are computed and shown in.
    pub fn timezone(&self) -> &TimeZone {
        self.start.time_zone()
    }

    /// When shift `n` begins; `None` beyond what jiff can represent.
    fn boundary(&self, n: i64) -> Option<Timestamp> {
        let span = self.shift.checked_mul(n).ok()?;
        self.start.checked_add(span).ok().map(|z| z.timestamp())
    }

    /// The shift holding `at`: its number, start and end.
    fn shift_at(&self, at: Timestamp) -> Option<(i64, Timestamp, Timestamp)> {
        let nominal = self
            .shift
            .total((Unit::Second, &self.start))
            .ok()
            .filter(|s| *s >= 1.0)?;
        // Shifts differ in length (a day holding a DST change is 23 or 25 hours), so the
        // first estimate may be off by many shifts years from `start`; each correction
        // measures from the boundary it landed on, so it converges in a step or two.
        let shifts_from = |t: Timestamp| at.duration_since(t).as_secs_f64() / nominal;
        #[allow(clippy::cast_possible_truncation)]
        let mut n = shifts_from(self.start.timestamp()).floor() as i64;
        for _ in 0..MAX_STEPS {
            let (from, until) = (self.boundary(n)?, self.boundary(n + 1)?);
            #[allow(clippy::cast_possible_truncation)]
            let off = shifts_from(from).floor() as i64;
            if at < from {
                n = n.checked_add(off.min(-1))?;
            } else if at >= until {
                n = n.checked_add(off.max(1))?;
            } else {
                return Some((n, from, until));
            }
        }
        None
    }

    /// The member holding shift `n`.
    fn member(&self, n: i64) -> &str {
        let len = i64::try_from(self.members.len()).unwrap_or(1).max(1);
        let i = usize::try_from(n.rem_euclid(len)).unwrap_or(0);
        self.members.get(i).map_or("", String::as_str)
    }

    /// Who is on call at `at`, and until when (the next handoff, the end of an override,
    /// or the start of one).
    pub fn on_call(&self, overrides: &[Override], at: Timestamp) -> Option<Segment> {
        let (n, _, shift_end) = self.shift_at(at)?;
        let mine: Vec<&Override> = overrides
            .iter()
            .filter(|o| o.rotation == self.name)
            .collect();
        // The override added last among those holding `at`.
        let holding = mine
            .iter()
            .filter(|o| o.from <= at && at < o.until)
            .max_by_key(|o| o.id);
        let (who, mut until, override_id, id) = match holding {
            Some(o) => (o.who.clone(), o.until, Some(o.id), o.id),
            None => (self.member(n).to_string(), shift_end, None, i64::MIN),
        };
        // An override starting before then (and outranking this one) cuts it short.
        for o in &mine {
            if o.from > at && o.from < until && o.id > id {
                until = o.from;
            }
        }
        Some(Segment {
            who,
            from: at,
            until,
            override_id,
        })
    }

    /// Who is on call from `at` on: `count` stretches, each starting when the last ends.
    pub fn schedule(&self, overrides: &[Override], at: Timestamp, count: usize) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::with_capacity(count);
        let mut t = at;
        for _ in 0..MAX_SCHEDULE_SHIFTS {
            if out.len() >= count {
                break;
            }
            let Some(seg) = self.on_call(overrides, t) else {
                break;
            };
            t = seg.until;
            // Two stretches of the same person in a row are one.
            match out.last_mut() {
                Some(last) if last.who == seg.who && last.override_id == seg.override_id => {
                    last.until = seg.until;
                }
                _ => out.push(seg),
            }
        }
        out
    }

    /// `t` as RFC 3339 with the rotation's offset at that moment.
    pub fn local(&self, t: Timestamp) -> String {
        rfc3339_in(t, self.timezone())
    }
}

/// `t` as RFC 3339 (seconds) with `tz`'s offset at that moment.
pub fn rfc3339_in(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned_datetime(tz.clone())
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// Parses a rotation's `start` (or a CLI time): RFC 3339 with an offset
/// (`2026-01-05T10:00:00+09:00`), optionally with an IANA zone in brackets
/// (`…-05:00[America/New_York]`), in `tz` when given (a time without an offset is then
/// that zone's local time).
pub fn parse_start(text: &str, tz: Option<&TimeZone>) -> Result<ZonedDateTime, String> {
    if let Ok(z) = text.parse::<ZonedDateTime>() {
        return Ok(match tz {
            Some(tz) => z.timestamp().to_zoned_datetime(tz.clone()),
            None => z,
        });
    }
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(match tz {
            Some(tz) => ts.to_zoned_datetime(tz.clone()),
            None => {
                // Keep the offset as written (`Z` is UTC).
                let offset = jiff::fmt::temporal::Pieces::parse(text)
                    .ok()
                    .and_then(|p| p.to_numeric_offset())
                    .unwrap_or(jiff::tz::Offset::UTC);
                ts.to_zoned_datetime(TimeZone::fixed(offset))
            }
        });
    }
    match (tz, text.parse::<jiff::civil::DateTime>()) {
        (Some(tz), Ok(civil)) => civil
            .to_zoned_datetime(tz.clone())
            .map_err(|e| e.to_string()),
        _ => Err(format!(
            "`{text}` is not a time; write RFC 3339 with an offset, e.g. \"2026-01-05T10:00:00+09:00\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(start: &str, tz: Option<&str>, shift: &str) -> Rotation {
        let tz = tz.map(|t| TimeZone::get(t).unwrap());
        Rotation {
            name: "primary".into(),
            members: vec!["alice".into(), "bob".into(), "carol".into()],
            shift: shift.parse().unwrap(),
            start: parse_start(start, tz.as_ref()).unwrap(),
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn weekly_turns_from_the_start_and_before_it() {
        let r = rotation("2026-01-05T10:00:00+09:00", None, "1w");
        let s = r.on_call(&[], at("2026-01-05T10:00:00+09:00")).unwrap();
        assert_eq!(
            (s.who.as_str(), r.local(s.until).as_str()),
            ("alice", "2026-01-12T10:00:00+09:00")
        );
        assert_eq!(
            r.on_call(&[], at("2026-01-12T09:59:59+09:00")).unwrap().who,
            "alice"
        );
        assert_eq!(
            r.on_call(&[], at("2026-01-12T10:00:00+09:00")).unwrap().who,
            "bob"
        );
        assert_eq!(
            r.on_call(&[], at("2026-01-26T10:00:00+09:00")).unwrap().who,
            "alice"
        );
        assert_eq!(
            r.on_call(&[], at("2026-01-05T09:00:00+09:00")).unwrap().who,
            "carol"
        );
        assert_eq!(
            r.on_call(&[], at("2026-11-23T12:00:00+09:00")).unwrap().who,
            "bob"
        );
    }

    #[test]
    fn a_daily_rotation_started_the_day_before_dst_stays_exact_for_years() {
        // The first shift is 23 hours: an estimate from it drifts a shift every 23 days.
        let r = rotation("2021-03-13T09:00:00", Some("America/New_York"), "1d");
        for (t, who) in [
            ("2021-03-14T08:59:59-04:00", "alice"),
            ("2021-03-14T09:00:00-04:00", "bob"),
            // 2,096 days after the start: shift 2096, carol's.
            ("2026-12-08T12:00:00-05:00", "carol"),
            ("2031-07-01T09:00:00-04:00", "alice"),
            ("2011-01-01T12:00:00-05:00", "carol"),
        ] {
            let s = r
                .on_call(&[], at(t))
                .unwrap_or_else(|| panic!("nobody at {t}"));
            assert_eq!(s.who, who, "{t}");
            assert!(
                r.local(s.until).ends_with("T09:00:00-05:00")
                    || r.local(s.until).ends_with("T09:00:00-04:00")
            );
        }
    }

    #[test]
    fn a_rotation_of_one_has_a_bounded_schedule() {
        let mut r = rotation("2026-01-05T10:00:00+09:00", None, "1h");
        r.members = vec!["alice".into()];
        let s = r.schedule(&[], at("2026-11-23T10:30:00+09:00"), 4);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].who, "alice");
        assert!(s[0].until > at("2026-12-23T00:00:00Z"), "{s:?}");
    }

    #[test]
    fn a_start_in_utc_may_say_z() {
        let z = parse_start("2026-01-05T01:00:00Z", None).unwrap();
        assert_eq!(z.timestamp(), at("2026-01-05T10:00:00+09:00"));
        assert_eq!(z.offset(), jiff::tz::Offset::UTC);
        let plus9 = parse_start("2026-01-05T10:00:00+09:00", None).unwrap();
        assert_eq!(plus9.offset().seconds(), 9 * 3600);
    }

    #[test]
    fn daily_handoffs_keep_their_local_time_across_dst() {
        // America/New_York springs forward on 2026-03-08 and falls back on 2026-11-01.
        let r = rotation("2026-03-06T09:00:00", Some("America/New_York"), "1d");
        let week = r.schedule(&[], at("2026-03-06T14:00:00Z"), 4);
        let untils: Vec<String> = week.iter().map(|s| r.local(s.until)).collect();
        assert_eq!(
            untils,
            [
                "2026-03-07T09:00:00-05:00",
                "2026-03-08T09:00:00-04:00",
                "2026-03-09T09:00:00-04:00",
                "2026-03-10T09:00:00-04:00"
            ]
        );
        let who: Vec<&str> = week.iter().map(|s| s.who.as_str()).collect();
        assert_eq!(who, ["alice", "bob", "carol", "alice"]);
        // Monday 09:00 local is 71 h after the start, under 3 × 24 h, yet it is the
        // fourth shift's start: the lost hour is Sunday's.
        assert_eq!(
            r.on_call(&[], at("2026-03-09T12:59:59Z")).unwrap().who,
            "carol"
        );
        assert_eq!(
            r.on_call(&[], at("2026-03-09T13:00:00Z")).unwrap().who,
            "alice"
        );
    }

    #[test]
    fn overrides_replace_and_the_last_added_wins() {
        let r = rotation("2026-01-05T10:00:00+09:00", None, "1w");
        let o = |id, who: &str, from: &str, until: &str| Override {
            id,
            rotation: "primary".into(),
            who: who.into(),
            from: at(from),
            until: at(until),
        };
        let overrides = vec![
            o(
                1,
                "dave",
                "2026-01-06T00:00:00+09:00",
                "2026-01-08T00:00:00+09:00",
            ),
            o(
                2,
                "erin",
                "2026-01-07T00:00:00+09:00",
                "2026-01-07T12:00:00+09:00",
            ),
        ];
        let s = r
            .on_call(&overrides, at("2026-01-05T12:00:00+09:00"))
            .unwrap();
        assert_eq!(
            (s.who.as_str(), r.local(s.until).as_str()),
            ("alice", "2026-01-06T00:00:00+09:00")
        );
        let plan = r.schedule(&overrides, at("2026-01-05T12:00:00+09:00"), 5);
        let who: Vec<(&str, String)> = plan
            .iter()
            .map(|s| (s.who.as_str(), r.local(s.until)))
            .collect();
        assert_eq!(
            who,
            [
                ("alice", "2026-01-06T00:00:00+09:00".to_string()),
                ("dave", "2026-01-07T00:00:00+09:00".to_string()),
                ("erin", "2026-01-07T12:00:00+09:00".to_string()),
                ("dave", "2026-01-08T00:00:00+09:00".to_string()),
                ("alice", "2026-01-12T10:00:00+09:00".to_string()),
            ]
        );
        // Another rotation's override changes nothing here.
        let other = vec![Override {
            rotation: "db".into(),
            ..overrides[0].clone()
        }];
        assert_eq!(
            r.on_call(&other, at("2026-01-07T00:00:00+09:00"))
                .unwrap()
                .who,
            "alice"
        );
    }

    #[test]
    fn starts_parse_with_offsets_zones_and_local_times() {
        let fixed = parse_start("2026-01-05T10:00:00+09:00", None).unwrap();
        assert_eq!(
            rfc3339_in(fixed.timestamp(), fixed.time_zone()),
            "2026-01-05T10:00:00+09:00"
        );
        assert!(parse_start("2026-01-05 10:00", None).is_err());
        assert!(parse_start("monday", None).is_err());
        let ny = TimeZone::get("America/New_York").unwrap();
        let z = parse_start("2026-07-01T09:00:00", Some(&ny)).unwrap();
        assert_eq!(rfc3339_in(z.timestamp(), &ny), "2026-07-01T09:00:00-04:00");
    }
}
