//! What the benchmark programs share.

/// The CPU model from `/proc/cpuinfo` ("unknown CPU" when it cannot be read), for the line
/// that says where saved results were measured.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
