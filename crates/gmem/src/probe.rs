//! What this host offers gmem: KVM's capabilities, the huge page pools, and
//! which backings can be used here (and why not, for the others).

use kvm_ioctls::Kvm;

use crate::backing::{BackingKind, HugePagePool};
use crate::kvm::KvmCaps;
use crate::kvm::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

/// Whether one backing can be used here.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BackingStatus {
    /// The backing.
    pub backing: BackingKind,
    /// Whether it can be created here now.
    pub usable: bool,
    /// Why not, or a note on what it needs.
    pub reason: Option<String>,
    /// How the gatekeeper's host view works on this backing.
    pub host_view: String,
}

/// Everything `gmem probe` reports.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Probe {
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
    /// Whether `/dev/kvm` could be opened.
    pub kvm_present: bool,
    /// Why not, if it could not.
    pub kvm_error: Option<String>,
    /// KVM's capabilities, if KVM is present.
    pub kvm: Option<KvmCaps>,
    /// The 2 MiB and 1 GiB huge page pools (absent if the kernel lacks one).
    pub huge_pages: Vec<HugePagePool>,
    /// Each backing's status.
    pub backings: Vec<BackingStatus>,
}

impl Probe {
    /// Probes the host. Creates (and drops) one VM per advertised VM type.
    pub fn run() -> Probe {
        let kernel = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let (kvm, kvm_error) = match Kvm::new() {
            Ok(kvm) => (Some(KvmCaps::read(&kvm)), None),
            Err(e) => (
                None,
                Some(format!(
                    "cannot open /dev/kvm: {}",
                    std::io::Error::from_raw_os_error(e.errno())
                )),
            ),
        };
        let huge_pages: Vec<HugePagePool> = [2 << 20, 1 << 30]
            .into_iter()
            .filter_map(HugePagePool::read)
            .collect();
        let backings = BackingKind::ALL
            .into_iter()
            .map(|backing| status(backing, kvm.as_ref(), kvm_error.as_deref(), &huge_pages))
            .collect();
        Probe {
            kernel,
            kvm_present: kvm.is_some(),
            kvm_error,
            kvm,
            huge_pages,
            backings,
        }
    }

    /// Whether `backing` is usable here.
    pub fn usable(&self, backing: BackingKind) -> bool {
        self.backings
            .iter()
            .any(|b| b.backing == backing && b.usable)
    }
}

fn status(
    backing: BackingKind,
    kvm: Option<&KvmCaps>,
    kvm_error: Option<&str>,
    pools: &[HugePagePool],
) -> BackingStatus {
    let (usable, reason) = match backing {
        BackingKind::GuestMemfd => match kvm {
            None => (false, Some(kvm_error.unwrap_or("no KVM").to_owned())),
            Some(caps) if !caps.guest_memfd => (false, Some("KVM_CAP_GUEST_MEMFD is 0".to_owned())),
            Some(caps) => {
                let both = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
                let default = caps
                    .vm_types
                    .iter()
                    .find_map(|t| t.guest_memfd_flags)
                    .unwrap_or(0);
                if default & both == both {
                    (true, None)
                } else {
                    (
                        true,
                        Some(format!(
                            "flags {default:#x} only: without MMAP|INIT_SHARED the host cannot load a guest into it"
                        )),
                    )
                }
            }
        },
        BackingKind::Memfd => (true, None),
        BackingKind::Hugetlb2M | BackingKind::Hugetlb1G => {
            match pools.iter().find(|p| p.page_size == backing.page_size()) {
                None => (
                    false,
                    Some("the kernel has no pool of this page size".to_owned()),
                ),
                Some(p) if p.available() == 0 => (
                    false,
                    Some(format!(
                        "no free huge pages (pool of {}; reserve some in {}/nr_hugepages)",
                        p.total,
                        HugePagePool::sysfs_dir(p.page_size)
                    )),
                ),
                Some(p) => (true, Some(format!("{} free pages", p.available()))),
            }
        }
    };
    BackingStatus {
        backing,
        usable,
        reason,
        host_view: crate::gate::view_mechanism(backing),
    }
}
