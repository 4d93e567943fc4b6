//! Go's `time.ParseDuration` grammar, which Knative uses for its duration annotations.
//!
//! Knative parses `window`, `scale-down-delay` and `scale-to-zero-pod-retention-period`
//! with Go's `time.ParseDuration` (knative/serving 98e5ef90aa70,
//! pkg/apis/autoscaling/annotation_validation.go), so `1.5m` is valid there and `1 min`
//! is not. The grammar (Go `src/time/format.go`, `ParseDuration`): an optional sign, then
//! one or more `<decimal><unit>` pairs with no spaces, units `ns`, `us` (`µs`, `μs`), `ms`,
//! `s`, `m`, `h`; a lone `0` needs no unit.

/// Nanoseconds in each Go unit.
const UNITS: &[(&str, i128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{00b5}s", 1_000),
    ("\u{03bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Largest magnitude Go accepts (`int64` nanoseconds, about 292 years).
const MAX_NANOS: i128 = i64::MAX as i128;

/// Parses `s` as Go does and returns signed nanoseconds; `None` where Go returns an error.
pub fn parse_nanos(s: &str) -> Option<i128> {
    let (negative, mut rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let scale = UNITS.iter().find(|(u, _)| *u == unit)?.1;
        let whole: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().ok()?
        };
        let mut value = whole.checked_mul(scale)?;
        if !frac_part.is_empty() {
            // Go keeps as many fraction digits as fit and truncates the rest.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: i128 = digits.parse().ok()?;
            value += frac * scale / 10i128.pow(digits.len() as u32);
        }
        total = total.checked_add(value)?;
        if total > MAX_NANOS {
            return None;
        }
        rest = after;
    }
    Some(if negative { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::parse_nanos;

    const S: i128 = 1_000_000_000;

    #[test]
    fn accepts_what_go_accepts() {
        assert_eq!(parse_nanos("0"), Some(0));
        assert_eq!(parse_nanos("6s"), Some(6 * S));
        assert_eq!(parse_nanos("1h"), Some(3600 * S));
        assert_eq!(parse_nanos("1m30s"), Some(90 * S));
        assert_eq!(parse_nanos("1.5m"), Some(90 * S));
        assert_eq!(parse_nanos(".5s"), Some(S / 2));
        assert_eq!(parse_nanos("1.s"), Some(S));
        assert_eq!(parse_nanos("300ms"), Some(S * 3 / 10));
        assert_eq!(parse_nanos("2h45m"), Some((2 * 3600 + 45 * 60) * S));
        assert_eq!(parse_nanos("1\u{00b5}s"), Some(1000));
        assert_eq!(parse_nanos("-1s"), Some(-S));
        assert_eq!(parse_nanos("+5m"), Some(300 * S));
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in [
            "",
            "60",
            "1 h",
            "s",
            "1d",
            "1x",
            ".s",
            "-",
            "1h 30m",
            "9999999999h",
        ] {
            assert_eq!(parse_nanos(bad), None, "{bad:?}");
        }
    }
}
