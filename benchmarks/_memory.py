"""A Linux process's memory, from /proc: its resident size and high-water mark, and a reset of
that mark, for the programs and tests that measure what an export holds."""

from __future__ import annotations


def status_bytes(field, pid="self"):
    """`field` of /proc/PID/status ("VmRSS", "VmHWM", "VmPeak") in bytes, or None where it cannot
    be read (the process has ended, or the system has no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return None


def reset_peak():
    """Sets this process's high-water mark (VmHWM) to its resident size now (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
