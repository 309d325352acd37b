//! [`Need`]: what a test may need of the host, each named separately, and
//! [`host_lacks`]: whether this host lacks it, and why.

use std::sync::OnceLock;

use gmem::backing::HugePagePool;
use gmem::{BackingKind, GmemFlags, Vm};

/// One thing a test needs of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Need {
    /// A usable `/dev/kvm` (a default VM can be created).
    Kvm,
    /// KVM's guest_memfd (`KVM_CAP_GUEST_MEMFD` on a default VM).
    GuestMemfd,
    /// One guest_memfd creation flag on a default VM
    /// (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    GuestMemfdFlag(GmemFlags),
    /// KVM memory attributes with the PRIVATE bit
    /// (`KVM_CAP_MEMORY_ATTRIBUTES` on a default VM).
    MemoryAttributes,
    /// Another KVM capability, by name and number (on a default VM).
    CapabilityNr(&'static str, u32),
    /// A capability a check tests itself, by name (pre-fault, protected VM
    /// types): [`host_lacks`] cannot tell, so only [`crate::skip`] uses it.
    Capability(&'static str),
    /// A huge page pool of this backing's page size, with free pages or
    /// raisable (root).
    HugePages(BackingKind),
    /// Root (writing sysfs, mounting, raising pools).
    Root,
}

impl Need {
    /// The need's name: what `GMEM_REQUIRE` lists and the test log records.
    pub fn name(&self) -> String {
        match self {
            Need::Kvm => "kvm".into(),
            Need::GuestMemfd => "guest-memfd".into(),
            Need::GuestMemfdFlag(f) if *f == GmemFlags::MMAP => "guest-memfd-mmap".into(),
            Need::GuestMemfdFlag(f) if *f == GmemFlags::INIT_SHARED => {
                "guest-memfd-init-shared".into()
            }
            Need::GuestMemfdFlag(f) => format!("guest-memfd-flags-{:#x}", f.bits()),
            Need::MemoryAttributes => "memory-attributes".into(),
            Need::CapabilityNr(name, _) | Need::Capability(name) => (*name).into(),
            Need::HugePages(kind) => kind.name().into(),
            Need::Root => "root".into(),
        }
    }

    /// What a test of `backing` needs, in the order checked: guest-memfd
    /// needs KVM, guest_memfd and both flags a gatekept file has
    /// (`MMAP|INIT_SHARED`); hugetlb needs its pool; memfd needs nothing.
    pub fn of_backing(backing: BackingKind) -> Vec<Need> {
        match backing {
            BackingKind::GuestMemfd => vec![
                Need::Kvm,
                Need::GuestMemfd,
                Need::GuestMemfdFlag(GmemFlags::MMAP),
                Need::GuestMemfdFlag(GmemFlags::INIT_SHARED),
            ],
            BackingKind::Memfd => Vec::new(),
            BackingKind::Hugetlb2M | BackingKind::Hugetlb1G => vec![Need::HugePages(backing)],
        }
    }
}

/// What a default VM offers, read once per process.
struct Host {
    kvm: Result<(), String>,
    guest_memfd: bool,
    gmem_flags: u64,
    memory_attributes: u64,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| match Vm::new() {
        Ok(vm) => Host {
            kvm: Ok(()),
            guest_memfd: vm.has_guest_memfd(),
            gmem_flags: vm.supported_gmem_flags(),
            memory_attributes: vm.memory_attributes(),
        },
        Err(e) => Host {
            kvm: Err(format!(
                "no KVM: {e} ({})",
                std::io::Error::from_raw_os_error(e.errno())
            )),
            guest_memfd: false,
            gmem_flags: 0,
            memory_attributes: 0,
        },
    })
}

/// Why this host lacks `need`; `None` if it has it.
pub fn host_lacks(need: Need) -> Option<String> {
    let host = host();
    let kvm_first = || host.kvm.clone().err();
    match need {
        Need::Kvm => kvm_first(),
        Need::GuestMemfd => {
            kvm_first().or_else(|| {
                (!host.guest_memfd).then(|| {
                    "this kernel's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)".to_owned()
                })
            })
        }
        Need::GuestMemfdFlag(flag) => host_lacks(Need::GuestMemfd).or_else(|| {
            (host.gmem_flags & flag.bits() != flag.bits()).then(|| {
                format!(
                    "this VM's guest_memfd takes flags {:#x}, not {} ({:#x})",
                    host.gmem_flags,
                    need.name(),
                    flag.bits()
                )
            })
        }),
        Need::MemoryAttributes => kvm_first().or_else(|| {
            (host.memory_attributes & u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0)
                .then(|| {
                    format!(
                        "this kernel's KVM has no private memory attributes (KVM_CAP_MEMORY_ATTRIBUTES is {:#x})",
                        host.memory_attributes
                    )
                })
        }),
        Need::CapabilityNr(name, nr) => kvm_first().or_else(|| {
            let vm = Vm::new().ok()?;
            (vm.fd().check_extension_raw(nr.into()) <= 0)
                .then(|| format!("this kernel's KVM lacks {name} (capability {nr} is 0)"))
        }),
        Need::Capability(name) => Some(format!("{name} (checked by the test itself)")),
        Need::HugePages(kind) => {
            let kib = kind.page_size() >> 10;
            match HugePagePool::read(kind.page_size()) {
                None => Some(format!("the kernel has no {kib} KiB huge page pool")),
                Some(p) if p.available() == 0 && !is_root() => Some(format!(
                    "no free {kib} KiB huge pages, and only root may raise the pool"
                )),
                Some(_) => None,
            }
        }
        Need::Root => (!is_root()).then(|| "needs root".to_owned()),
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
