"""Set resource limits on this process, then become the program.

Run as ``python -I -S _launcher.py [OPTIONS] AS CPU FSIZE NOFILE NPROC --
argv...`` (numbers in bytes, seconds, bytes, files and extra processes; an
AS or NPROC of 0 leaves that one as it is, for a caller whose cgroup caps
it). It imports only the standard library and replaces itself with ``argv``
through ``os.execv``, so the limits hold for the program and everything it
starts. Setting them here rather than in a
``preexec_fn`` keeps the parent free of fork-time Python code, which is
unsafe in a process with threads.

Options, for a sandbox started by root, applied in this order:

``--join FILE``
    Write this process's pid into FILE, a cgroup's ``cgroup.procs``
    (repeatable), so the program starts inside the run's cgroups.
``--user UID:GID``
    Become that user, with no supplementary groups, just before the exec.
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


def join(procs_file: str) -> None:
    with open(procs_file, "w") as file:
        file.write(str(os.getpid()))


def become(user: str) -> None:
    # The same calls as ``setpriv --reuid --regid --clear-groups``: groups
    # first, then the group id, then the user id, after which none of them
    # can be taken back.
    uid, gid = map(int, user.split(":"))
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def split_options(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    options: dict[str, list[str]] = {"--join": [], "--user": []}
    rest = list(argv)
    while rest and rest[0] in options:
        options[rest[0]].append(rest[1])
        rest = rest[2:]
    return options, rest


def main(argv: list[str]) -> None:
    options, argv = split_options(argv)
    separator = argv.index("--")
    address_space, cpu_s, file_size, open_files, processes = map(int, argv[:separator])
    program = argv[separator + 1 :]
    user = options["--user"][-1] if options["--user"] else None
    uid = int(user.split(":")[0]) if user else os.getuid()

    for procs_file in options["--join"]:
        join(procs_file)

    if address_space:
        limit(resource.RLIMIT_AS, address_space)
    # The soft CPU limit sends SIGXCPU; the hard one, a second later, SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    limit(resource.RLIMIT_FSIZE, file_size)
    limit(resource.RLIMIT_NOFILE, open_files)
    # RLIMIT_NPROC counts every process of the user, not only this program's,
    # so the limit is what the user runs already plus the program's share.
    # The kernel does not apply it to root.
    if processes:
        limit(resource.RLIMIT_NPROC, user_processes(uid) + processes)

    if user:
        become(user)
    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
