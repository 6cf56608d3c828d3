//! The probe guest's serial protocol: its final `probe: result key=value ...` line
//! (vmm-core/probe/README.md), read by `plexvm demo`, the tests and the benchmarks.

/// The prefix of the probe's result line.
pub const RESULT_PREFIX: &str = "probe: result ";

/// The `key=value` fields of the last result line in `serial`, in order.
pub fn parse_result(serial: &str) -> Option<Vec<(String, String)>> {
    let line = serial
        .lines()
        .rev()
        .find(|l| l.starts_with(RESULT_PREFIX))?;
    Some(
        line[RESULT_PREFIX.len()..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// One field of a parsed result.
pub fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_result_line_wins() {
        let serial = "boot\nprobe: result workload=x status=fail\nprobe: result workload=blk-verify status=ok requests=12\n";
        let f = parse_result(serial).unwrap();
        assert_eq!(field(&f, "status"), Some("ok"));
        assert_eq!(field(&f, "requests"), Some("12"));
        assert_eq!(field(&f, "nope"), None);
        assert!(parse_result("nothing here").is_none());
    }
}
