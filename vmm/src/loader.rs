//! Puts a guest into memory: the boot GDT, TSS and page tables shared by both
//! modes, then either a flat payload or a Linux kernel with its zero page,
//! command line, initrd and MP table.
//!
//! Flat-payload contract (what `ldt-vmm run --flat` promises): FILE is loaded
//! at guest-physical 0x100000 and entered there in 64-bit mode, CPL 0,
//! interrupts off, RSP = 0x100000; all RAM is identity-mapped with U/S set at
//! every level; the GDT and page tables live below 0x80000 with selectors
//! 0x08/0x10 (ring 0 code/data), 0x18/0x20 (ring 3 data/code). Port 0x3f8
//! writes go to stdout, 0xfe to port 0x64 ends the VM with status 0.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_regs;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    self, CMDLINE_ADDR, CMDLINE_MAX_SIZE, FLAT_ENTRY_ADDR, GDT_ADDR, HIMEM_START, MPTABLE_START,
    TSS_ADDR, ZERO_PAGE_ADDR,
};
use crate::arch::{boot, gdt, mptable, paging, regs};
use crate::input_file::{self, InputError};
use crate::vm::GuestMemory;

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const ELF_MACHINE_X86_64: u16 = 62;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("flat payload {path} is {size} bytes, more than the {room} bytes of RAM above 1 MiB")]
    FlatTooBig { path: PathBuf, size: u64, room: u64 },
    #[error("{path} is an ELF file for machine {machine}, not x86-64 (62)")]
    ElfMachine { path: PathBuf, machine: u16 },
    #[error("{path} is not a loadable x86-64 kernel (neither ELF vmlinux nor bzImage): {err}")]
    Kernel { path: PathBuf, err: loader::Error },
    #[error("{path} is a truncated bzImage: {size} bytes, its header says {expected}")]
    TruncatedBzImage {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM below the kernel's limit")]
    InitrdTooBig { path: PathBuf, size: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("guest memory is too large for the boot page tables ({0} bytes)")]
    TooMuchMemory(u64),
    #[error("writing guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Input(#[from] InputError),
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |err| LoadError::Read {
        path: path.to_path_buf(),
        err,
    }
}

/// Writes the GDT, TSS and identity-mapping page tables (RAM, and at
/// least the first 4 GiB).
pub fn write_boot_tables(mem: &GuestMemory, mem_size: u64) -> Result<(), LoadError> {
    let end = layout::ram_ranges(mem_size)
        .last()
        .map(|r| r.0 + r.1)
        .unwrap_or(0);
    if end > paging::max_mapped_end() {
        return Err(LoadError::TooMuchMemory(mem_size));
    }
    // At least the 32-bit space: the ldt-pv bitmap is in the MMIO hole.
    let end = end.max(layout::MMIO_GAP_END);
    for (i, d) in gdt::table(TSS_ADDR).iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    // TSS: RSP0 (for exceptions taken in ring 3) and an all-zero I/O
    // permission bitmap (every port allowed) ended by 0xff.
    let mut tss = vec![0u8; gdt::TSS_LIMIT as usize + 1];
    tss[4..12].copy_from_slice(&FLAT_ENTRY_ADDR.to_le_bytes());
    tss[102..104].copy_from_slice(&(gdt::TSS_IOMAP_OFFSET as u16).to_le_bytes());
    *tss.last_mut().unwrap() = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))?;
    for page in paging::identity_map(end) {
        for (i, e) in page.entries.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(page.gpa + i as u64 * 8))?;
        }
    }
    Ok(())
}

/// Loads a flat payload; returns the registers to enter it with.
pub fn load_flat(mem: &GuestMemory, mem_size: u64, path: &Path) -> Result<kvm_regs, LoadError> {
    let (file, size) = input_file::open(path, u64::MAX)?;
    if size == 0 {
        return Err(LoadError::Empty { path: path.into() });
    }
    let room = layout::ram_ranges(mem_size)[0]
        .1
        .saturating_sub(FLAT_ENTRY_ADDR);
    if size > room {
        return Err(LoadError::FlatTooBig {
            path: path.into(),
            size,
            room,
        });
    }
    let bytes = input_file::read_all(path, file, size)?;
    write_boot_tables(mem, mem_size)?;
    mem.write_slice(&bytes, GuestAddress(FLAT_ENTRY_ADDR))?;
    Ok(regs::entry_regs(FLAT_ENTRY_ADDR, FLAT_ENTRY_ADDR, 0))
}

/// What to boot as Linux.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Loads a Linux kernel (ELF vmlinux with a 64-bit entry, or bzImage),
/// initrd, command line, zero page and MP table; returns the entry registers.
pub fn load_linux(
    mem: &GuestMemory,
    mem_size: u64,
    vcpus: u8,
    spec: &LinuxBoot,
    reserved: &[(u64, u64)],
) -> Result<kvm_regs, LoadError> {
    let path = spec.kernel.as_path();
    // A kernel larger than guest RAM cannot be loaded into it.
    let (mut kernel, _) = input_file::open(path, mem_size)?;
    let mut magic = [0u8; 20];
    let n = kernel.read(&mut magic).map_err(read_err(path))?;
    if n == 0 {
        return Err(LoadError::Empty { path: path.into() });
    }
    kernel.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    let is_elf = n >= 20 && magic[..4] == *b"\x7fELF";
    if is_elf {
        let machine = u16::from_le_bytes([magic[18], magic[19]]);
        if machine != ELF_MACHINE_X86_64 {
            return Err(LoadError::ElfMachine {
                path: path.into(),
                machine,
            });
        }
    }
    let kernel_err = |err| LoadError::Kernel {
        path: path.into(),
        err,
    };
    let (entry, header) = if is_elf {
        let r = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_err)?;
        (r.kernel_load.0, None)
    } else {
        let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_err)?;
        check_bzimage_size(path, &kernel, &r.setup_header)?;
        (r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET, r.setup_header)
    };

    let initrd = match &spec.initrd {
        Some(p) => Some(load_initrd(
            mem,
            mem_size,
            p,
            header.map(|h| h.initrd_addr_max).unwrap_or(0),
        )?),
        None => None,
    };

    let max = header
        .map(|h| h.cmdline_size as usize + 1)
        .filter(|&m| m > 1)
        .unwrap_or(CMDLINE_MAX_SIZE)
        .min(CMDLINE_MAX_SIZE);
    let mut cmdline = Cmdline::new(max).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    cmdline.insert_str(&spec.cmdline).map_err(|e| {
        LoadError::Cmdline(format!(
            "{e} (length {}, limit {})",
            spec.cmdline.len(),
            max - 1
        ))
    })?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;

    write_boot_tables(mem, mem_size)?;
    mem.write_slice(
        &mptable::build(MPTABLE_START, vcpus),
        GuestAddress(MPTABLE_START),
    )?;
    let params = boot::boot_params(&boot::BootParamsSpec {
        header,
        mem_size,
        cmdline_len: spec.cmdline.len(),
        initrd,
        reserved,
    });
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    // The boot stack only has to last until the kernel sets up its own.
    Ok(regs::entry_regs(entry, ZERO_PAGE_ADDR, ZERO_PAGE_ADDR))
}

/// linux-loader loads whatever follows the setup code, so a cut-off image
/// would boot and crash; the header says how long the image must be.
fn check_bzimage_size(
    path: &Path,
    kernel: &std::fs::File,
    header: &Option<linux_loader::bootparam::setup_header>,
) -> Result<(), LoadError> {
    let Some(h) = header else { return Ok(()) };
    // setup_sects 0 means 4 (boot protocol); the boot sector comes first.
    let setup_sects = if h.setup_sects == 0 { 4 } else { h.setup_sects };
    let expected = (setup_sects as u64 + 1) * 512 + h.syssize as u64 * 16;
    let size = kernel.metadata().map_err(read_err(path))?.len();
    if size < expected {
        return Err(LoadError::TruncatedBzImage {
            path: path.into(),
            size,
            expected,
        });
    }
    Ok(())
}

fn load_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    path: &Path,
    max: u32,
) -> Result<(u64, u64), LoadError> {
    let (file, size) = input_file::open(path, u64::MAX)?;
    // Placed (or refused) by its size before a byte of it is read.
    let addr =
        boot::initrd_address(mem_size, size, max).ok_or_else(|| LoadError::InitrdTooBig {
            path: path.into(),
            size,
        })?;
    let data = input_file::read_all(path, file, size)?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, size))
}
