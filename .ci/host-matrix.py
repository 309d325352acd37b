#!/usr/bin/env python3
"""Reads `gmem probe --json` on stdin; prints the host's matrix (which
backings are usable here, and why not) on stderr, and on stdout the
comma-separated needs this host has, for GMEM_REQUIRE (the test kit's names:
gmem-testkit's `Need::name`). A test that skips for one of them fails CI.

KVM is always required: CI runs on KVM hosts. guest_memfd, each of its flags
and memory attributes are required where the probe finds them; hugetlb-2m
where its pool could be reserved (.ci/run passes --hugetlb-2m); hugetlb-1g
never (1 GiB pages depend on fragmentation); root where CI runs as root.
"""
import json
import os
import sys

FLAGS = {1: "guest-memfd-mmap", 2: "guest-memfd-init-shared"}


def main() -> int:
    probe = json.load(sys.stdin)
    hugetlb_2m = "--hugetlb-2m" in sys.argv[1:]
    out = sys.stderr
    print(f"kernel {probe['kernel']}", file=out)
    kvm = probe.get("kvm")
    if kvm is None:
        print(f"KVM: absent: {probe.get('kvm_error')}", file=out)
    else:
        default = next(
            (t for t in kvm["vm_types"] if t["vm_type"] == "default"), {}
        )
        print(
            "KVM: guest_memfd {} (flags {:#x} on a default VM), memory attributes {:#x}, pre-fault {}".format(
                "yes" if kvm["guest_memfd"] else "no",
                default.get("guest_memfd_flags") or 0,
                kvm["memory_attributes"],
                "yes" if kvm["pre_fault_memory"] else "no",
            ),
            file=out,
        )
    print(f"{'backing':<14}{'usable':<8}why not / note", file=out)
    for b in probe["backings"]:
        print(
            f"{b['backing']:<14}{'yes' if b['usable'] else 'no':<8}{b['reason'] or ''}",
            file=out,
        )

    needs = ["kvm"]
    if kvm is not None and kvm["guest_memfd"]:
        needs.append("guest-memfd")
        default = next(
            (t for t in kvm["vm_types"] if t["vm_type"] == "default"), {}
        )
        flags = default.get("guest_memfd_flags") or 0
        needs += [name for bit, name in FLAGS.items() if flags & bit]
    if kvm is not None and kvm["memory_attributes"] & 8:
        needs.append("memory-attributes")
    if hugetlb_2m:
        needs.append("hugetlb-2m")
    if os.geteuid() == 0:
        needs.append("root")
    print(",".join(needs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
