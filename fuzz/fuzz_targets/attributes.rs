//! The attribute map against a naive page-per-entry model, over a window that
//! may sit anywhere in the 64-bit address space (including its very top).
#![no_main]

use gmem::{Attribute, AttributeMap};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const PAGES: u64 = 256;
const PAGE: u64 = 4096;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Where the window starts, in pages (clamped so the window fits).
    base_page: u64,
    initial_private: bool,
    ops: Vec<(bool, u8, u8)>,
    queries: Vec<(u8, u8)>,
}

fuzz_target!(|input: Input| {
    let base = input.base_page.min(u64::MAX / PAGE - PAGES) * PAGE;
    let mut map = AttributeMap::new();
    let mut model = vec![input.initial_private; PAGES as usize];
    if input.initial_private {
        map.set(base..base + PAGES * PAGE, Attribute::Private);
    }
    for &(private, first, count) in input.ops.iter().take(64) {
        let first = u64::from(first);
        let end = (first + u64::from(count)).min(PAGES);
        let attr = if private {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        map.set(base + first * PAGE..base + end * PAGE, attr);
        for p in &mut model[first as usize..end.max(first) as usize] {
            *p = private;
        }
    }
    let attr = |private: bool| {
        if private {
            Attribute::Private
        } else {
            Attribute::Shared
        }
    };
    for (i, &private) in model.iter().enumerate() {
        let gpa = base + i as u64 * PAGE;
        assert_eq!(map.get(gpa), attr(private), "page {i}");
        assert_eq!(map.get(gpa + PAGE - 1), attr(private), "end of page {i}");
    }
    for &(a, b) in input.queries.iter().take(16) {
        let (a, b) = (u64::from(a.min(b)), u64::from(a.max(b)) + 1);
        let window = &model[a as usize..b.min(PAGES) as usize];
        let range = base + a * PAGE..base + b.min(PAGES) * PAGE;
        let private = window.iter().filter(|&&p| p).count() as u64;
        assert_eq!(map.private_bytes(range.clone()), private * PAGE);
        let uniform = window.iter().all(|&p| p == window[0]);
        assert_eq!(map.uniform(range.clone()), uniform.then(|| attr(window[0])));
        let first = window
            .iter()
            .position(|&p| p)
            .map(|i| range.start + i as u64 * PAGE);
        assert_eq!(map.first_private(range), first);
    }
    let runs: Vec<_> = map.private_runs().collect();
    for w in runs.windows(2) {
        assert!(w[0].end < w[1].start, "runs touch or overlap: {runs:?}");
    }
    // The top of the address space.
    let _ = map.get(u64::MAX);
});
