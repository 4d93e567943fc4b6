//! Byte sizes in the config: a plain number of bytes, or a string with a decimal (`K`, `M`,
//! `G`: powers of 1000) or binary (`Ki`, `Mi`, `Gi`: powers of 1024) suffix, as Kubernetes
//! resource quantities write them (`512Mi`).

use serde::{Deserialize, Deserializer};

/// Parses `"512Mi"`, `"1G"`, `"4096"`; `None` for anything else (or an overflow).
pub fn parse_bytes(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    let digits = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let unit: u64 = match suffix {
        "" => 1,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// `deserialize_with` for an optional byte size.
pub fn deserialize_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(n)) => Ok(Some(n)),
        Some(Raw::Text(s)) => parse_bytes(&s).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a byte size (a number, or one with a K, M, G, Ki, Mi or Gi suffix)"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_decimal_and_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("64Mi"), Some(64 << 20));
        assert_eq!(parse_bytes("2G"), Some(2_000_000_000));
        assert_eq!(parse_bytes("1Ki"), Some(1024));
        for bad in ["", "Mi", "1.5Gi", "10MB", "-1", "99999999999999999999Gi"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }
}
