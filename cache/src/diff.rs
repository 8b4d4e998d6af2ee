//! Byte diffs between a page and its twin: the runs a release writes home.
//!
//! Runs are exact: a byte equal to the twin is never part of a run, so writing the runs home
//! cannot overwrite bytes another process changed in the same page (scope consistency's
//! multiple-writer rule). Words are compared 8 bytes at a time; only the edges of a run are
//! narrowed byte by byte.

use std::ops::Range;

/// Appends to `out` the maximal byte ranges where `now` differs from `twin` (same length),
/// in increasing order.
pub fn diff_runs(twin: &[u8], now: &[u8], out: &mut Vec<Range<usize>>) {
    assert_eq!(twin.len(), now.len(), "a page and its twin have one size");
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i < now.len() {
        // Skip whole equal words outside a run, and whole different words inside one.
        if i % 8 == 0 && i + 8 <= now.len() {
            let equal = twin[i..i + 8] == now[i..i + 8];
            let all_differ = (0..8).all(|k| twin[i + k] != now[i + k]);
            if equal && start.is_none() {
                i += 8;
                continue;
            }
            if all_differ && start.is_some() {
                i += 8;
                continue;
            }
        }
        match (twin[i] != now[i], start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(s) = start {
        out.push(s..now.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn runs(twin: &[u8], now: &[u8]) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        diff_runs(twin, now, &mut out);
        out
    }

    #[test]
    fn runs_are_exact_at_byte_granularity() {
        let twin = [0u8; 32];
        let mut now = twin;
        assert!(runs(&twin, &now).is_empty());
        now[3] = 1;
        now[4] = 1;
        now[9] = 7;
        now[16..24].fill(9);
        now[31] = 1;
        assert_eq!(runs(&twin, &now), [3..5, 9..10, 16..24, 31..32]);
    }

    proptest! {
        /// Applying the runs to the twin gives the page, and no run byte equals its twin byte.
        #[test]
        fn runs_rebuild_the_page_and_touch_only_changed_bytes(
            twin in proptest::collection::vec(0u8..3, 0..100),
            changes in proptest::collection::vec((0usize..100, 0u8..3), 0..40),
        ) {
            let mut now = twin.clone();
            for (i, v) in changes {
                if i < now.len() {
                    now[i] = v;
                }
            }
            let found = runs(&twin, &now);
            let mut rebuilt = twin.clone();
            for r in &found {
                prop_assert!(!r.is_empty());
                for i in r.clone() {
                    prop_assert_ne!(twin[i], now[i]);
                    rebuilt[i] = now[i];
                }
            }
            prop_assert_eq!(rebuilt, now);
            for pair in found.windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "runs are maximal and ordered");
            }
        }
    }
}
