//! Placeholder replaced by the benchmark (issue 4).
fn main() {}
