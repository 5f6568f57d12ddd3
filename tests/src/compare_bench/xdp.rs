//! The comparison's XDP reference points: a program that only returns
//! XDP_PASS (what XDP on a veth costs before any work: the veth copies
//! every packet into a page once a program is attached) and one that only
//! returns XDP_DROP (the ceiling: nothing after the driver). Two
//! instructions each, loaded with bpf(2) and attached with a bpf_link:
//! building them as eBPF objects would add a second eBPF crate to the
//! project for two constants, and aya loads only from objects.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop = 1,
    Pass = 2,
}

/// `bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf_attr` for BPF_LINK_CREATE, its first four fields.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> anyhow::Result<OwnedFd> {
    // SAFETY: `attr` is a repr(C) prefix of bpf_attr, its size passed; the
    // kernel reads only that many bytes and returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    anyhow::ensure!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just returned by the kernel, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An attached program; dropping it detaches it (the link is not pinned).
pub struct Attached {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Loads `r0 = verdict; exit` and attaches it to interface `ifindex` of the
/// calling thread's namespace (run it inside with `Netns::run`).
pub fn attach(verdict: Verdict, ifindex: u32) -> anyhow::Result<Attached> {
    // mov64 r0, imm (0xb7); exit (0x95): {code, regs, off, imm}.
    let insns: [[u8; 8]; 2] = [
        [0xb7, 0, 0, 0, verdict as u8, 0, 0, 0],
        [0x95, 0, 0, 0, 0, 0, 0, 0],
    ];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"lb_bench");
    let prog = bpf(
        BPF_PROG_LOAD,
        &ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_XDP,
            ..ProgLoad::default()
        },
    )?;
    let link = bpf(
        BPF_LINK_CREATE,
        &LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: 0,
        },
    )?;
    Ok(Attached {
        _link: link,
        _prog: prog,
    })
}

/// The index of interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    anyhow::ensure!(i != 0, "no interface {name}");
    Ok(i)
}
