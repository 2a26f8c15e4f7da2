#!/usr/bin/env bash
# Runs a command with io_uring denied the way container runtimes deny it: a seccomp filter makes
# io_uring_setup fail with EPERM for the command and everything it starts. Used by CI to prove
# that the test suite passes (io_uring tests skipped, saying why) where io_uring is unavailable.
#
#   scripts/without-io-uring.sh cargo test --release --test server
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
exec python3 - "$@" <<'PY'
import ctypes, os, struct, sys, platform

if platform.machine() not in ("x86_64", "aarch64"):
    sys.exit(f"without-io-uring: unsupported architecture {platform.machine()}")
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
IO_URING_SETUP = 425  # the same number on x86_64 and aarch64
EPERM = 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000

def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)

program = b"".join([
    insn(BPF_LD_W_ABS, 0, 0, 4),                 # A = seccomp_data.arch
    insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH),           # other architecture: allow (no translation)
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    insn(BPF_LD_W_ABS, 0, 0, 0),                 # A = seccomp_data.nr
    insn(BPF_JEQ_K, 0, 1, IO_URING_SETUP),
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
])
buf = ctypes.create_string_buffer(program, len(program))

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit(f"without-io-uring: PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
    sys.exit(f"without-io-uring: installing the seccomp filter failed: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
PY
