#!/usr/bin/env python3
"""Summarises the test log (GMEM_TEST_LOG, written by gmem-testkit's `log`):
how many tests ran on each backing, and how many skipped, by what they
lacked and why. Usage: test-summary.py LOG
"""
import collections
import sys


def main() -> int:
    ran = collections.Counter()
    skipped = collections.Counter()
    reasons = {}
    try:
        with open(sys.argv[1], encoding="utf-8") as log:
            lines = log.read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        fields = line.split("\t")
        if fields[0] == "ran" and len(fields) >= 3:
            ran[fields[1]] += 1
        elif fields[0] == "skipped" and len(fields) >= 4:
            need, reason = fields[1], fields[3]
            # One line per reason; numbers in reasons (pool sizes) vary.
            key = (need, reason if need != "n/a" else "the check does not apply")
            skipped[key] += 1
    print("tests run, by backing:")
    for backing in ["guest-memfd", "memfd", "hugetlb-2m", "hugetlb-1g"]:
        print(f"  {backing:<14}{ran[backing]}")
    print(f"tests skipped: {sum(skipped.values())}")
    for (need, reason), n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        if need == "n/a":
            print(f"  {n:>4}  not applicable: {reason} (backing or flag set)")
        else:
            print(f"  {n:>4}  for want of {need}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
