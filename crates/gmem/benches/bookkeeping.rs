//! Micro-benchmarks of gmem's bookkeeping, which makes no system call: the
//! attribute map and range validation. `cargo bench -p gmem`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gmem::{Attribute, AttributeMap, FileRange};

const PAGE: u64 = 4096;

/// A map of a 1 TiB guest, private, with `runs` shared 4 KiB holes.
fn terabyte_map(runs: u64) -> AttributeMap {
    let mut map = AttributeMap::new();
    map.set(0..1 << 40, Attribute::Private);
    let stride = (1u64 << 40) / runs;
    for i in 0..runs {
        map.set(i * stride..i * stride + PAGE, Attribute::Shared);
    }
    map
}

fn attribute_map(c: &mut Criterion) {
    let map = terabyte_map(1000);
    c.bench_function("attribute map: get, 1 TiB / 1000 runs", |b| {
        let mut gpa = 0u64;
        b.iter(|| {
            gpa = (gpa + 0x1234_5000) % (1 << 40);
            black_box(map.get(black_box(gpa)))
        })
    });
    c.bench_function(
        "attribute map: convert a page and back, 1 TiB / 1000 runs",
        |b| {
            let mut map = map.clone();
            let mut gpa = 0u64;
            b.iter(|| {
                gpa = (gpa + 0x1234_5000) % ((1 << 40) - PAGE);
                map.set(gpa..gpa + PAGE, Attribute::Shared);
                map.set(gpa..gpa + PAGE, Attribute::Private);
            })
        },
    );
    c.bench_function(
        "attribute map: uniform over 1 GiB, 1 TiB / 1000 runs",
        |b| b.iter(|| black_box(map.uniform(black_box(0x4000_0000..0x8000_0000)))),
    );
}

fn range_validation(c: &mut Criterion) {
    c.bench_function("FileRange::new, valid", |b| {
        b.iter(|| black_box(FileRange::new(black_box(0x20_0000), black_box(0x1000))))
    });
    c.bench_function("FileRange::new, unaligned", |b| {
        b.iter(|| black_box(FileRange::new(black_box(0x20_0001), black_box(0x1000))))
    });
}

criterion_group!(benches, attribute_map, range_validation);
criterion_main!(benches);
