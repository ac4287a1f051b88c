//! Time conditions on rules: `when = { days, hours, timezone, holidays }`. A rule with
//! one applies only inside it; outside, the next rule is tried.
//!
//! Hours are a half-open local range `"09:00-18:00"` (18:00 is outside). An overnight
//! range (`"22:00-06:00"`) belongs to the day it starts on: the hours after midnight of
//! a Friday night shift count as Friday's, for `days` and for holidays alike. With
//! `holidays = "jp"` a Japanese national holiday (see `holidays.rs`) is outside.

use std::fmt;

use jiff::Timestamp;
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;

use super::holidays;

/// A validated `when`.
#[derive(Debug, Clone)]
pub struct When {
    /// Monday first.
    pub days: [bool; 7],
    /// `None`: the whole day.
    pub hours: Option<(Time, Time)>,
    pub timezone: TimeZone,
    /// Japanese national holidays are outside.
    pub holidays_jp: bool,
}

/// The day names `days` takes, Monday first.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Parses a day name (`mon`, `Monday`, case-insensitive) to its index, Monday 0.
pub fn parse_day(name: &str) -> Option<usize> {
    let lower = name.trim().to_ascii_lowercase();
    let full = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    DAY_NAMES
        .iter()
        .position(|d| *d == lower)
        .or_else(|| full.iter().position(|d| *d == lower))
}

/// Parses `"HH:MM-HH:MM"` (the end may be `24:00`); the two ends must differ, but
/// `00:00-24:00` is the whole day.
pub fn parse_hours(text: &str) -> Result<(Time, Time), String> {
    let parse = |part: &str, end: bool| -> Result<Time, String> {
        let part = part.trim();
        if end && part == "24:00" {
            return Ok(Time::MIN);
        }
        let (h, m) = part
            .split_once(':')
            .filter(|(h, m)| h.len() == 2 && m.len() == 2)
            .ok_or_else(|| format!("`{part}` is not a time of day HH:MM"))?;
        let (h, m) = (
            h.parse::<i8>()
                .map_err(|_| format!("`{part}` is not HH:MM"))?,
            m.parse::<i8>()
                .map_err(|_| format!("`{part}` is not HH:MM"))?,
        );
        Time::new(h, m, 0, 0).map_err(|_| format!("`{part}` is not a time of day"))
    };
    let (from, to) = text.split_once('-').ok_or_else(|| {
        "write the hours as \"09:00-18:00\" (or \"22:00-06:00\" overnight)".to_string()
    })?;
    let (start, end) = (parse(from, false)?, parse(to, true)?);
    // The end `24:00` is midnight after the day: `00:00-24:00` is the whole day.
    if start == end && to.trim() != "24:00" {
        return Err("the range is empty; write e.g. \"09:00-18:00\"".into());
    }
    Ok((start, end))
}

impl When {
    /// Inside: `Ok(())`; outside: why, for `mailcall route`.
    pub fn check(&self, at: Timestamp) -> Result<(), String> {
        let local = at.to_zoned_datetime(self.timezone.clone());
        let (time, today) = (local.time(), local.date());
        // The day whose range holds `at`: today, or yesterday for the small hours of
        // an overnight range.
        let day = match self.hours {
            None => today,
            Some((start, end)) if start < end || end == Time::MIN => {
                if time < start || (end != Time::MIN && time >= end) {
                    return Err(format!("{} is outside {}", hhmm(time), self.hours_text()));
                }
                today
            }
            Some((start, end)) => {
                if time >= start {
                    today
                } else if time < end {
                    today.yesterday().unwrap_or(today)
                } else {
                    return Err(format!("{} is outside {}", hhmm(time), self.hours_text()));
                }
            }
        };
        if !self.days[weekday_index(day.weekday())] {
            return Err(format!(
                "{} is not one of its days ({})",
                DAY_NAMES[weekday_index(day.weekday())],
                self.days_text()
            ));
        }
        if self.holidays_jp
            && let Some(name) = holidays::jp(day)
        {
            return Err(format!("{day} is a Japanese holiday ({name})"));
        }
        Ok(())
    }

    /// Does the holiday table matter for `date` but not cover it?
    pub fn holidays_unknown(&self, date: Date) -> bool {
        self.holidays_jp && !holidays::covers(date)
    }

    fn days_text(&self) -> String {
        let days: Vec<&str> = DAY_NAMES
            .iter()
            .zip(self.days)
            .filter(|(_, on)| *on)
            .map(|(d, _)| *d)
            .collect();
        days.join(",")
    }

    fn hours_text(&self) -> String {
        match self.hours {
            None => "all day".into(),
            Some((s, e)) => format!(
                "{}-{}",
                hhmm(s),
                if e == Time::MIN {
                    "24:00".into()
                } else {
                    hhmm(e)
                }
            ),
        }
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.days_text(),
            self.hours_text(),
            self.timezone.iana_name().unwrap_or("UTC")
        )?;
        if self.holidays_jp {
            f.write_str(", not on Japanese holidays")?;
        }
        Ok(())
    }
}

fn hhmm(t: Time) -> String {
    format!("{:02}:{:02}", t.hour(), t.minute())
}

fn weekday_index(w: Weekday) -> usize {
    usize::try_from(w.to_monday_zero_offset()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn when(days: &[usize], hours: &str, tz: &str, jp: bool) -> When {
        let mut d = [false; 7];
        for i in days {
            d[*i] = true;
        }
        When {
            days: d,
            hours: Some(parse_hours(hours).unwrap()),
            timezone: TimeZone::get(tz).unwrap(),
            holidays_jp: jp,
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn business_hours_weekdays_and_japanese_holidays() {
        let w = when(&[0, 1, 2, 3, 4], "09:00-18:00", "Asia/Tokyo", true);
        assert_eq!(w.check(at("2026-11-24T10:00:00+09:00")), Ok(()));
        assert!(w.check(at("2026-11-24T18:00:00+09:00")).is_err());
        assert!(w.check(at("2026-11-24T08:59:59+09:00")).is_err());
        // Saturday, and 勤労感謝の日 (a Monday).
        assert!(w.check(at("2026-11-28T10:00:00+09:00")).is_err());
        let err = w.check(at("2026-11-23T10:00:00+09:00")).unwrap_err();
        assert!(err.contains("勤労感謝の日"), "{err}");
        // 10:00 in Tokyo is 01:00 UTC: the rule's own time zone decides.
        assert_eq!(w.check(at("2026-11-24T01:00:00Z")), Ok(()));
    }

    #[test]
    fn overnight_ranges_belong_to_the_day_they_start() {
        let w = when(&[4], "22:00-06:00", "UTC", false);
        assert_eq!(w.check(at("2026-11-27T23:00:00Z")), Ok(())); // Friday night
        assert_eq!(w.check(at("2026-11-28T05:59:00Z")), Ok(())); // Saturday small hours
        assert!(w.check(at("2026-11-28T06:00:00Z")).is_err());
        assert!(w.check(at("2026-11-27T05:00:00Z")).is_err()); // Thursday's night
        assert!(w.check(at("2026-11-27T12:00:00Z")).is_err());
        let all_day_end = when(&[0, 1, 2, 3, 4, 5, 6], "18:00-24:00", "UTC", false);
        assert_eq!(all_day_end.check(at("2026-11-27T23:59:00Z")), Ok(()));
        assert!(all_day_end.check(at("2026-11-27T00:00:00Z")).is_err());
    }

    #[test]
    fn hours_that_do_not_parse_say_why() {
        for bad in [
            "9-18",
            "09:00",
            "25:00-26:00",
            "09:00-09:00",
            "00:00-00:00",
            "09:60-10:00",
            "x",
        ] {
            assert!(parse_hours(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_hours("00:00-24:00"), Ok((Time::MIN, Time::MIN)));
        assert_eq!(parse_day("Fri"), Some(4));
        assert_eq!(parse_day("sunday"), Some(6));
        assert_eq!(parse_day("frі"), None);
    }
}
