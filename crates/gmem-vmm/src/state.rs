//! The VMM's state in a snapshot: the opaque blob the library carries
//! beside guest memory ([`gmem::Gatekeeper::snapshot_with_state`]), as
//! bytes. Pure encoding and decoding, no system call.
//!
//! The blob is versioned ([`STATE_MAGIC`], [`STATE_VERSION`]); every length
//! and count read is checked against what is left of the input and against
//! the machine's bounds before anything is allocated, so a decode costs at
//! most the blob's size in time and memory, and bad input is a typed
//! [`StateError`], never a panic.
//!
//! ```text
//! state   := magic "GMEMVMST" version:u32 config vcpus:u32 vcpu* devices:u32 device* end "END!"
//! config  := backing:u8 mem_size:u64 vcpus:u32 initial:u8 policy:u8
//! vcpu    := regs:raw sregs:raw fpu msrs:u32 (index:u32 data:u64)* xsave:opt xcrs:opt
//!            events:opt mp_state:opt lapic:opt abi_key:u32 serial:bytes
//! device  := kind:u8 (console: input:bytes transmitted:u64 | blk: path:bytes capacity:u64
//!            readonly:u8 statuses:3×u64) transport
//! transport := status driver_features:u64 device_sel driver_sel queue_sel interrupt_status
//!            config_generation refusals_total:u64 queues:u32 (bad:u8 queue)*
//! queue   := max_size:u16 size:u16 next_avail:u16 next_used:u16 ready:u8 event_idx:u8
//!            desc:u64 avail:u64 used:u64
//! raw     := len:u32 bytes (exactly the kvm-bindings struct's size, its #[repr(C)] layout)
//! opt     := 0 | 1 raw
//! bytes   := len:u32 bytes
//! ```
//!
//! All integers little-endian.

use std::path::PathBuf;

use gmem::{Attribute, BackingKind, Policy};
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use thiserror::Error;
use virtio_queue::QueueState;
use zerocopy::{FromBytes, IntoBytes};

use crate::config::{MAX_VCPUS, MachineConfig};
use crate::virtio::MAX_DEVICES;

/// The blob's first 8 bytes.
pub const STATE_MAGIC: &[u8; 8] = b"GMEMVMST";
/// The version this VMM writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The most MSRs one vCPU's record holds.
pub const MAX_MSRS: usize = 64;
/// The most queues one device's record holds.
pub const MAX_QUEUES: usize = 8;

/// Why a state blob was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateError {
    /// The blob does not start with [`STATE_MAGIC`].
    #[error("the snapshot's VMM state does not start with GMEMVMST (not this VMM's state)")]
    Magic,
    /// Another version.
    #[error("the snapshot's VMM state is version {found}; this VMM reads version {STATE_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The blob ends early.
    #[error("the snapshot's VMM state ends at byte {len}, reading {need} bytes at byte {at}")]
    Truncated {
        /// Where the read started.
        at: usize,
        /// How many bytes it needed.
        need: usize,
        /// The blob's length.
        len: usize,
    },
    /// A value breaks a rule.
    #[error("the snapshot's VMM state is invalid at byte {at}: {what}")]
    Invalid {
        /// Where.
        at: usize,
        /// What does not hold.
        what: String,
    },
}

/// One vCPU's registers and what the VMM's exit loop remembers of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VcpuSnapshot {
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_FPU`.
    pub fpu: kvm_fpu,
    /// The MSRs that matter that this host has, `(index, value)`.
    pub msrs: Vec<(u32, u64)>,
    /// `KVM_GET_XSAVE`, where KVM has `KVM_CAP_XSAVE`: the bytes of its
    /// `kvm_xsave` (which is not `Clone`), exactly its size.
    pub xsave: Option<Vec<u8>>,
    /// `KVM_GET_XCRS`, where KVM has `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// `KVM_GET_VCPU_EVENTS`, where KVM has `KVM_CAP_VCPU_EVENTS`.
    pub events: Option<kvm_vcpu_events>,
    /// `KVM_GET_MP_STATE`, where KVM has `KVM_CAP_MP_STATE`.
    pub mp_state: Option<kvm_mp_state>,
    /// `KVM_GET_LAPIC`, if the VM has an in-kernel irqchip (this VMM's have none).
    pub lapic: Option<Box<kvm_lapic_state>>,
    /// The key selected on the ABI port.
    pub abi_key: u32,
    /// Serial output not yet written (a partial line).
    pub serial: Vec<u8>,
}

/// A device's model state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSnapshot {
    /// virtio-console.
    Console {
        /// What the guest has not received yet.
        input: Vec<u8>,
        /// Bytes the guest transmitted.
        transmitted: u64,
    },
    /// virtio-blk. The disk's content is not in the snapshot: the restore
    /// opens the image by its path, which must hold what it held.
    Blk {
        /// The disk image.
        path: PathBuf,
        /// Its capacity in 512-byte sectors.
        capacity: u64,
        /// Whether it is read-only.
        readonly: bool,
        /// Requests answered by status (`OK`, `IOERR`, `UNSUPP`).
        statuses: [u64; 3],
    },
}

/// A virtio-mmio register file's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportSnapshot {
    /// The device status register.
    pub status: u32,
    /// What the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Refusals counted so far.
    pub refusals_total: u64,
    /// Per queue: the settings written invalid (bits), and the queue.
    pub queues: Vec<(u8, QueueState)>,
}

/// A device and its transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The model.
    pub device: DeviceSnapshot,
    /// Its registers.
    pub transport: TransportSnapshot,
}

/// Everything the VMM needs beside guest memory to continue a machine.
#[derive(Clone, Debug, PartialEq)]
pub struct VmmState {
    /// How the machine was built.
    pub config: MachineConfig,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuSnapshot>,
    /// Each device, by window.
    pub devices: Vec<DeviceRecord>,
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn raw<T: IntoBytes + zerocopy::Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
    fn opt<T: IntoBytes + zerocopy::Immutable>(&mut self, v: Option<&T>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.raw(v);
            }
        }
    }
}

struct In<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(StateError::Truncated {
                at: self.at,
                need: n,
                len: self.b.len(),
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn invalid(&self, what: impl Into<String>) -> StateError {
        StateError::Invalid {
            at: self.at,
            what: what.into(),
        }
    }
    fn flag(&mut self, what: &str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(format!("{what} is {v}, not 0 or 1"))),
        }
    }
    /// A length-prefixed byte string: its length is checked against what
    /// is left before anything is taken.
    fn bytes(&mut self) -> Result<&'a [u8], StateError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A count, at most `max`.
    fn count(&mut self, what: &str, max: usize) -> Result<usize, StateError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.invalid(format!("{n} {what}: at most {max}")));
        }
        Ok(n)
    }
    fn raw<T: FromBytes>(&mut self, what: &str) -> Result<T, StateError> {
        let b = self.bytes()?;
        T::read_from_bytes(b).map_err(|_| {
            self.invalid(format!(
                "{what} has {} bytes; this host's is {}",
                b.len(),
                std::mem::size_of::<T>()
            ))
        })
    }
    fn opt<T: FromBytes>(&mut self, what: &str) -> Result<Option<T>, StateError> {
        if self.flag(what)? {
            Ok(Some(self.raw(what)?))
        } else {
            Ok(None)
        }
    }
}

fn backing_code(b: BackingKind) -> u8 {
    match b {
        BackingKind::GuestMemfd => 0,
        BackingKind::Memfd => 1,
        BackingKind::Hugetlb2M => 2,
        BackingKind::Hugetlb1G => 3,
    }
}

fn put_fpu(o: &mut Out, f: &kvm_fpu) {
    // kvm_fpu has no zerocopy derive: field by field.
    for r in &f.fpr {
        o.0.extend_from_slice(r);
    }
    o.u16(f.fcw);
    o.u16(f.fsw);
    o.u8(f.ftwx);
    o.u8(f.pad1);
    o.u16(f.last_opcode);
    o.u64(f.last_ip);
    o.u64(f.last_dp);
    for x in &f.xmm {
        o.0.extend_from_slice(x);
    }
    o.u32(f.mxcsr);
    o.u32(f.pad2);
}

fn get_fpu(i: &mut In<'_>) -> Result<kvm_fpu, StateError> {
    let mut f = kvm_fpu::default();
    for r in &mut f.fpr {
        *r = i.arr()?;
    }
    f.fcw = i.u16()?;
    f.fsw = i.u16()?;
    f.ftwx = i.u8()?;
    f.pad1 = i.u8()?;
    f.last_opcode = i.u16()?;
    f.last_ip = i.u64()?;
    f.last_dp = i.u64()?;
    for x in &mut f.xmm {
        *x = i.arr()?;
    }
    f.mxcsr = i.u32()?;
    f.pad2 = i.u32()?;
    Ok(f)
}

impl VmmState {
    /// The blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(8192 * self.vcpus.len().max(1)));
        o.0.extend_from_slice(STATE_MAGIC);
        o.u32(STATE_VERSION);
        let c = &self.config;
        o.u8(backing_code(c.backing));
        o.u64(c.mem_size);
        o.u32(c.vcpus);
        o.u8(u8::from(c.initial == Attribute::Shared));
        o.u8(u8::from(c.policy == Policy::Discard));
        o.u32(self.vcpus.len() as u32);
        for v in &self.vcpus {
            o.raw(&v.regs);
            o.raw(&v.sregs);
            put_fpu(&mut o, &v.fpu);
            o.u32(v.msrs.len() as u32);
            for &(index, data) in &v.msrs {
                o.u32(index);
                o.u64(data);
            }
            match &v.xsave {
                None => o.u8(0),
                Some(x) => {
                    o.u8(1);
                    o.bytes(x);
                }
            }
            o.opt(v.xcrs.as_ref());
            o.opt(v.events.as_ref());
            o.opt(v.mp_state.as_ref());
            o.opt(v.lapic.as_deref());
            o.u32(v.abi_key);
            o.bytes(&v.serial);
        }
        o.u32(self.devices.len() as u32);
        for d in &self.devices {
            match &d.device {
                DeviceSnapshot::Console { input, transmitted } => {
                    o.u8(1);
                    o.bytes(input);
                    o.u64(*transmitted);
                }
                DeviceSnapshot::Blk {
                    path,
                    capacity,
                    readonly,
                    statuses,
                } => {
                    o.u8(2);
                    o.bytes(path.as_os_str().as_encoded_bytes());
                    o.u64(*capacity);
                    o.u8(u8::from(*readonly));
                    for s in statuses {
                        o.u64(*s);
                    }
                }
            }
            let t = &d.transport;
            o.u32(t.status);
            o.u64(t.driver_features);
            o.u32(t.device_features_sel);
            o.u32(t.driver_features_sel);
            o.u32(t.queue_sel);
            o.u32(t.interrupt_status);
            o.u32(t.config_generation);
            o.u64(t.refusals_total);
            o.u32(t.queues.len() as u32);
            for (bad, q) in &t.queues {
                o.u8(*bad);
                o.u16(q.max_size);
                o.u16(q.size);
                o.u16(q.next_avail);
                o.u16(q.next_used);
                o.u8(u8::from(q.ready));
                o.u8(u8::from(q.event_idx_enabled));
                o.u64(q.desc_table);
                o.u64(q.avail_ring);
                o.u64(q.used_ring);
            }
        }
        o.0.extend_from_slice(b"END!");
        o.0
    }

    /// Reads a blob [`encode`](Self::encode) wrote, checking every length,
    /// count and value.
    ///
    /// # Errors
    /// [`StateError`] naming the byte.
    pub fn decode(blob: &[u8]) -> Result<VmmState, StateError> {
        let mut i = In { b: blob, at: 0 };
        if i.take(8).ok() != Some(&STATE_MAGIC[..]) {
            return Err(StateError::Magic);
        }
        let version = i.u32()?;
        if version != STATE_VERSION {
            return Err(StateError::Version { found: version });
        }
        let backing = match i.u8()? {
            0 => BackingKind::GuestMemfd,
            1 => BackingKind::Memfd,
            2 => BackingKind::Hugetlb2M,
            3 => BackingKind::Hugetlb1G,
            v => return Err(i.invalid(format!("backing code {v}"))),
        };
        let mem_size = i.u64()?;
        let vcpus = i.u32()?;
        let initial = if i.flag("the initial attribute")? {
            Attribute::Shared
        } else {
            Attribute::Private
        };
        let policy = if i.flag("the policy")? {
            Policy::Discard
        } else {
            Policy::InPlace
        };
        let config = MachineConfig {
            backing,
            mem_size,
            vcpus,
            initial,
            policy,
        };
        config.validate().map_err(|e| i.invalid(e.to_string()))?;
        let n = i.count("vCPUs", MAX_VCPUS as usize)?;
        if n != vcpus as usize {
            return Err(i.invalid(format!("{n} vCPU records for a machine of {vcpus} vCPUs")));
        }
        let mut out_vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            let regs = i.raw("kvm_regs")?;
            let sregs = i.raw("kvm_sregs")?;
            let fpu = get_fpu(&mut i)?;
            let m = i.count("MSRs", MAX_MSRS)?;
            let mut msrs = Vec::with_capacity(m);
            for _ in 0..m {
                msrs.push((i.u32()?, i.u64()?));
            }
            let xsave = if i.flag("kvm_xsave")? {
                let b = i.bytes()?;
                if b.len() != std::mem::size_of::<kvm_xsave>() {
                    return Err(i.invalid(format!(
                        "kvm_xsave has {} bytes; this host's is {}",
                        b.len(),
                        std::mem::size_of::<kvm_xsave>()
                    )));
                }
                Some(b.to_vec())
            } else {
                None
            };
            let xcrs = i.opt("kvm_xcrs")?;
            let events = i.opt("kvm_vcpu_events")?;
            let mp_state = i.opt("kvm_mp_state")?;
            let lapic = i.opt::<kvm_lapic_state>("kvm_lapic_state")?.map(Box::new);
            let abi_key = i.u32()?;
            let serial = i.bytes()?;
            if serial.len() > crate::vcpu::SERIAL_LINE_MAX {
                return Err(i.invalid(format!(
                    "{} bytes of pending serial output: at most {}",
                    serial.len(),
                    crate::vcpu::SERIAL_LINE_MAX
                )));
            }
            out_vcpus.push(VcpuSnapshot {
                regs,
                sregs,
                fpu,
                msrs,
                xsave,
                xcrs,
                events,
                mp_state,
                lapic,
                abi_key,
                serial: serial.to_vec(),
            });
        }
        let n = i.count("devices", MAX_DEVICES)?;
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            let device = match i.u8()? {
                1 => DeviceSnapshot::Console {
                    input: i.bytes()?.to_vec(),
                    transmitted: i.u64()?,
                },
                2 => {
                    let raw = i.bytes()?;
                    let path = std::str::from_utf8(raw)
                        .map_err(|_| i.invalid("the disk path is not UTF-8"))?;
                    if path.is_empty() {
                        return Err(i.invalid("the disk path is empty"));
                    }
                    DeviceSnapshot::Blk {
                        path: PathBuf::from(path),
                        capacity: i.u64()?,
                        readonly: i.flag("readonly")?,
                        statuses: [i.u64()?, i.u64()?, i.u64()?],
                    }
                }
                v => return Err(i.invalid(format!("device kind {v}"))),
            };
            let mut t = TransportSnapshot {
                status: i.u32()?,
                driver_features: i.u64()?,
                device_features_sel: i.u32()?,
                driver_features_sel: i.u32()?,
                queue_sel: i.u32()?,
                interrupt_status: i.u32()?,
                config_generation: i.u32()?,
                refusals_total: i.u64()?,
                queues: Vec::new(),
            };
            let q = i.count("queues", MAX_QUEUES)?;
            for _ in 0..q {
                let bad = i.u8()?;
                let state = QueueState {
                    max_size: i.u16()?,
                    size: i.u16()?,
                    next_avail: i.u16()?,
                    next_used: i.u16()?,
                    ready: i.flag("queue ready")?,
                    event_idx_enabled: i.flag("queue event_idx")?,
                    desc_table: i.u64()?,
                    avail_ring: i.u64()?,
                    used_ring: i.u64()?,
                };
                t.queues.push((bad, state));
            }
            devices.push(DeviceRecord {
                device,
                transport: t,
            });
        }
        if i.take(4)? != b"END!" {
            return Err(i.invalid("the end marker END! is missing"));
        }
        if i.at != blob.len() {
            return Err(i.invalid(format!("{} bytes after the end", blob.len() - i.at)));
        }
        Ok(VmmState {
            config,
            vcpus: out_vcpus,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmmState {
        let mut v = VcpuSnapshot {
            msrs: vec![(0xc000_0080, 0xd01), (0x10, 12345)],
            xsave: Some(vec![0; std::mem::size_of::<kvm_xsave>()]),
            events: Some(kvm_vcpu_events::default()),
            abi_key: 8,
            serial: b"half a li".to_vec(),
            ..Default::default()
        };
        v.regs.rip = 0x10_1234;
        v.regs.rax = 1;
        v.sregs.cr3 = 0x1000;
        v.fpu.mxcsr = 0x1f80;
        v.fpu.xmm[3] = [7; 16];
        VmmState {
            config: MachineConfig::new(BackingKind::Memfd, 16 << 20),
            vcpus: vec![v],
            devices: vec![
                DeviceRecord {
                    device: DeviceSnapshot::Console {
                        input: b"abc".to_vec(),
                        transmitted: 99,
                    },
                    transport: TransportSnapshot {
                        status: 0xf,
                        driver_features: 1 << 32,
                        queues: vec![(
                            0,
                            QueueState {
                                max_size: 64,
                                size: 16,
                                next_avail: 3,
                                next_used: 3,
                                ready: true,
                                event_idx_enabled: false,
                                desc_table: 0x20_0000,
                                avail_ring: 0x20_1000,
                                used_ring: 0x20_2000,
                            },
                        )],
                        ..Default::default()
                    },
                },
                DeviceRecord {
                    device: DeviceSnapshot::Blk {
                        path: "/tmp/disk.img".into(),
                        capacity: 128,
                        readonly: true,
                        statuses: [4, 0, 1],
                    },
                    transport: TransportSnapshot::default(),
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let blob = s.encode();
        assert_eq!(VmmState::decode(&blob).unwrap(), s);
    }

    #[test]
    fn every_truncation_is_refused() {
        let blob = sample().encode();
        for len in 0..blob.len() {
            assert!(VmmState::decode(&blob[..len]).is_err(), "cut at {len}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            VmmState::decode(&long),
            Err(StateError::Invalid { .. })
        ));
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let blob = sample().encode();
        let mut b = blob.clone();
        b[0] = b'X';
        assert_eq!(VmmState::decode(&b), Err(StateError::Magic));
        let mut b = blob.clone();
        b[8] = 9;
        assert_eq!(VmmState::decode(&b), Err(StateError::Version { found: 9 }));
        // The vCPU count in the config: 0 is no machine.
        let mut b = blob.clone();
        b[21..25].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            VmmState::decode(&b),
            Err(StateError::Invalid { .. })
        ));
        // A huge length prefix (the regs' size) costs nothing: refused as
        // truncated before any allocation.
        let mut b = blob.clone();
        b[31..35].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            VmmState::decode(&b),
            Err(StateError::Truncated { .. })
        ));
        // Flipping any single byte never panics.
        for at in 0..blob.len() {
            let mut b = blob.clone();
            b[at] ^= 0xff;
            let _ = VmmState::decode(&b);
        }
    }
}
