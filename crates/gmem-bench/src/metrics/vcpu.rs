//! Guest fault-in and launch: figures that need a running vCPU.

use std::time::Instant;

use gmem::BackingKind;
use gmem_vmm::{Exit, Machine, MachineConfig};

use crate::BenchError;
use crate::guest::{self, LOAD, MARK_PORT};
use crate::plan::{PAGE, micros, per_s, timed};
use crate::raw::{RawVm, Subject};

// --- guest fault-in -------------------------------------------------------------

/// The range the touch loop walks: from 2 MiB to below the vCPU stack.
fn touched(size: u64) -> (u64, u64) {
    (0x20_0000, size - (64 << 10))
}

fn expect_mark(exit: Exit, value: u32) -> Result<(), BenchError> {
    match exit {
        Exit::IoOut { port, value: v, .. } if port == MARK_PORT && v == value => Ok(()),
        other => Err(BenchError::Guest(format!(
            "expected mark {value}, got {other}"
        ))),
    }
}

pub(super) fn guest_touch_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let (start, end) = touched(size);
    let mut m = Machine::new(MachineConfig::new(kind, size))?;
    m.load(&guest::touch_pages(start, end)?, LOAD, LOAD)?;
    expect_mark(m.run(0)?, 1)?;
    let d = timed(|| expect_mark(m.run(0)?, 2))?;
    Ok(per_s((end - start) / PAGE, d))
}

pub(super) fn guest_touch_raw(subject: Subject, size: u64) -> Result<f64, BenchError> {
    let (start, end) = touched(size);
    let mut vm = RawVm::new(subject, size, &guest::touch_pages(start, end)?, LOAD)?;
    vm.run_until_out(MARK_PORT)?;
    let d = timed(|| vm.run_until_out(MARK_PORT).map(drop))?;
    Ok(per_s((end - start) / PAGE, d))
}

// --- launch ------------------------------------------------------------------------

pub(super) fn launch_gmem(kind: BackingKind, ram: u64) -> Result<f64, BenchError> {
    let code = guest::first_exit()?;
    // The machine leaves the timed part alive: teardown is not launch.
    let start = Instant::now();
    let mut m = Machine::new(MachineConfig::new(kind, ram))?;
    m.load(&code, LOAD, LOAD)?;
    expect_mark(m.run(0)?, 1)?;
    let d = start.elapsed();
    drop(m);
    Ok(micros(d))
}

pub(super) fn launch_raw(subject: Subject, ram: u64) -> Result<f64, BenchError> {
    let code = guest::first_exit()?;
    let start = Instant::now();
    let mut vm = RawVm::new(subject, ram, &code, LOAD)?;
    vm.run_until_out(MARK_PORT)?;
    let d = start.elapsed();
    drop(vm);
    Ok(micros(d))
}
