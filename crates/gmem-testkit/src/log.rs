//! The test log: one line per test that ran on a backing and per skip, for
//! CI's summary of how many tests ran on each backing and how many skipped,
//! by reason (`.ci/test-summary.py`).
//!
//! Lines go to the file `GMEM_TEST_LOG` names, if it is set; nothing is
//! written otherwise. Each line is one `write` to a file opened with
//! `O_APPEND`, so the lines of concurrent tests and test binaries never mix:
//!
//! ```text
//! ran<TAB>memfd<TAB>hello
//! skipped<TAB>guest-memfd<TAB>hello<TAB>this kernel's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)
//! ```

use std::io::Write;

use gmem::BackingKind;

fn append(fields: &[&str]) {
    let Some(path) = std::env::var_os("GMEM_TEST_LOG") else {
        return;
    };
    let mut line = fields
        .iter()
        .map(|f| f.replace(['\t', '\n'], " "))
        .collect::<Vec<_>>()
        .join("\t");
    line.push('\n');
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

/// Records that `test` ran on `backing`.
pub fn ran(test: &str, backing: BackingKind) {
    append(&["ran", backing.name(), test]);
}

/// Records that `test` skipped for want of `need` (a [`crate::Need::name`],
/// or `n/a` for a check that does not apply), and why.
pub fn skipped(test: &str, need: &str, reason: &str) {
    append(&["skipped", need, test, reason]);
}
