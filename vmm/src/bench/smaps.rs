//! How much of a mapping huge host pages back, from /proc/PID/smaps.

/// AnonHugePages + Private_Hugetlb, in KiB, of the first mapping of process
/// `pid` ("self" or a number) for which `select(start, end, perms)` holds;
/// 0 if none or unreadable.
pub fn huge_kib(pid: &str, select: impl Fn(u64, u64, &str) -> bool) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (head, perms) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                if inside {
                    break;
                }
                inside = select(a, b, perms);
                continue;
            }
        }
        if inside {
            for key in ["AnonHugePages:", "Private_Hugetlb:"] {
                if let Some(v) = line.strip_prefix(key) {
                    kib += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
    }
    kib
}

/// `huge_kib` of the read-write mapping of exactly `bytes` (guest RAM of
/// another VMM process).
pub fn guest_ram_huge_kib(pid: u32, bytes: u64) -> u64 {
    huge_kib(&pid.to_string(), |a, b, perms| {
        b - a == bytes && perms == "rw-p"
    })
}
