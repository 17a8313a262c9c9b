//! Helpers shared by blockd's own integration tests. `skip` mirrors `blockd_tests::skip`
//! (the end-to-end test crate), which these tests cannot use: blockd does not depend on
//! that crate.

/// Reports that a test (or the part of it that needs a missing tool or device) cannot
/// run here: prints `skipping: {reason}`, after which the caller returns. Under `CI=true`
/// (or `CI=1`) it panics instead, so that a test cannot pass in CI by not running.
pub fn skip(reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if ci {
        panic!("CI=true: this test cannot be skipped: {reason}");
    }
    eprintln!("skipping: {reason}");
}
