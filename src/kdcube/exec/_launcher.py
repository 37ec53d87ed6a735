"""Set resource limits on this process, then become the program.

Run as ``python -I -S _launcher.py AS CPU FSIZE NOFILE NPROC -- argv...``
(numbers in bytes, seconds, bytes, files and extra processes). It imports
only the standard library and replaces itself with ``argv`` through
``os.execv``, so the limits hold for the program and everything it starts.
Setting them here rather than in a ``preexec_fn`` keeps the parent free of
fork-time Python code, which is unsafe in a process with threads.
"""

import os
import resource
import sys


def user_processes(uid: int) -> int:
    """How many processes ``uid`` owns now (0 where /proc is missing)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    count = 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                count += 1
        except OSError:
            continue
    return count


def limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def main(argv: list[str]) -> None:
    separator = argv.index("--")
    address_space, cpu_s, file_size, open_files, processes = map(int, argv[:separator])
    program = argv[separator + 1 :]

    limit(resource.RLIMIT_AS, address_space)
    # The soft CPU limit sends SIGXCPU; the hard one, a second later, SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    limit(resource.RLIMIT_FSIZE, file_size)
    limit(resource.RLIMIT_NOFILE, open_files)
    # RLIMIT_NPROC counts every process of the user, not only this program's,
    # so the limit is what the user runs already plus the program's share.
    # The kernel does not apply it to root.
    limit(resource.RLIMIT_NPROC, user_processes(os.getuid()) + processes)

    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
