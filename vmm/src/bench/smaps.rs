//! How much of a mapping huge host pages back, from /proc/PID/smaps.

/// The smaps lines (after its header) of the first mapping of process
/// `pid` ("self" or a number) for which `select(start, end, perms)` holds;
/// `None` if there is none or smaps is unreadable.
pub fn mapping(pid: &str, select: impl Fn(u64, u64, &str) -> bool) -> Option<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut out: Option<String> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (head, perms) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                if out.is_some() {
                    break;
                }
                if select(a, b, perms) {
                    out = Some(String::new());
                }
                continue;
            }
        }
        if let Some(o) = out.as_mut() {
            o.push_str(line);
            o.push('\n');
        }
    }
    out
}

/// AnonHugePages + Private_Hugetlb, in KiB, of the first mapping of process
/// `pid` ("self" or a number) for which `select(start, end, perms)` holds;
/// 0 if none or unreadable.
pub fn huge_kib(pid: &str, select: impl Fn(u64, u64, &str) -> bool) -> u64 {
    let Some(lines) = mapping(pid, select) else {
        return 0;
    };
    lines
        .lines()
        .filter_map(|l| {
            ["AnonHugePages:", "Private_Hugetlb:"]
                .iter()
                .find_map(|key| l.strip_prefix(key))
        })
        .map(|v| {
            v.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

/// `huge_kib` of the read-write mapping of exactly `bytes` (guest RAM of
/// another VMM process).
pub fn guest_ram_huge_kib(pid: u32, bytes: u64) -> u64 {
    huge_kib(&pid.to_string(), |a, b, perms| {
        b - a == bytes && perms == "rw-p"
    })
}
