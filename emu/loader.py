"""ELF loading (pyelftools): check a static executable, list what to map, build the
initial stack (argv, envp, auxv) the way fs/binfmt_elf.c's create_elf_tables() does."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from emu.arch import PAGE_SIZE

PF_X, PF_W, PF_R = 1, 2, 4

# auxv types (include/uapi/linux/auxvec.h)
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN = 23, 25, 26, 31


class LoadError(Exception):
    """The file cannot be run: missing, not an ELF executable, wrong arch, ..."""


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    flags: int          # PF_R | PF_W | PF_X
    data: bytes         # file contents (filesz bytes); the rest is zero (bss)


@dataclass(frozen=True)
class ElfImage:
    path: str
    e_machine: str
    big_endian: bool
    entry: int
    segments: tuple[Segment, ...]
    phdr_vaddr: int
    phentsize: int
    phnum: int

    @property
    def end(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments)


def read_elf(path: str) -> ElfImage:
    """Parse ``path`` as a static 64-bit ELF executable or raise LoadError (one line)."""
    if not os.path.exists(path):
        raise LoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LoadError(f"{path}: is a directory")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise LoadError(f"{path}: not an ELF file")
            f.seek(0)
            return _parse(path, ELFFile(f))
    except LoadError:
        raise
    except (ELFError, struct.error, ValueError, EOFError, OSError) as err:
        raise LoadError(f"{path}: truncated or corrupt ELF file ({err})") from None


def _parse(path: str, elf: ELFFile) -> ElfImage:
    if elf.elfclass != 64:
        raise LoadError(f"{path}: 32-bit ELF files are not supported (need a 64-bit executable)")
    if elf["e_type"] != "ET_EXEC":
        kind = "shared object or PIE" if elf["e_type"] == "ET_DYN" else elf["e_type"]
        raise LoadError(f"{path}: {kind}; emu runs static executables (link with -static -no-pie)")
    segments, phdr_vaddr, size = [], 0, os.path.getsize(path)
    first_load = None
    for seg in elf.iter_segments():
        ptype = seg["p_type"]
        if ptype == "PT_INTERP":
            raise LoadError(f"{path}: dynamically linked; emu runs static executables (link with -static)")
        if ptype == "PT_PHDR":
            phdr_vaddr = seg["p_vaddr"]
        if ptype != "PT_LOAD" or seg["p_memsz"] == 0:
            continue
        if seg["p_offset"] + seg["p_filesz"] > size:
            raise LoadError(f"{path}: truncated ELF file (a segment runs past the end)")
        data = seg.data()
        if len(data) != seg["p_filesz"]:
            raise LoadError(f"{path}: truncated ELF file")
        segments.append(Segment(seg["p_vaddr"], seg["p_memsz"], seg["p_flags"], data))
        if first_load is None and seg["p_offset"] == 0:
            first_load = seg
    if not segments:
        raise LoadError(f"{path}: no loadable segments")
    if not phdr_vaddr and first_load is not None:
        phdr_vaddr = first_load["p_vaddr"] + elf["e_phoff"]
    return ElfImage(path, elf["e_machine"], not elf.little_endian, elf["e_entry"], tuple(segments),
                    phdr_vaddr, elf["e_phentsize"], elf["e_phnum"])


def build_stack(image: ElfImage, argv: list[str], envp: list[str], stack_top: int, platform: str,
                random_bytes: bytes, big_endian: bool) -> tuple[int, bytes]:
    """Lay out the initial process stack below ``stack_top``.

    Returns (sp, bytes) where the bytes go at [sp, stack_top) and sp points at argc, 16-byte
    aligned, as every arch's Linux ABI wants at the ELF entry point.
    """
    word = struct.Struct(">Q" if big_endian else "<Q")
    strings = bytearray()
    offsets: dict[str, int] = {}

    def put(s: bytes) -> int:
        strings.extend(s)
        return len(strings) - len(s)

    execfn = put(image.path.encode() + b"\0")
    arg_off = [put(a.encode() + b"\0") for a in argv]
    env_off = [put(e.encode() + b"\0") for e in envp]
    plat_off = put(platform.encode() + b"\0")
    rand_off = put(random_bytes)
    offsets.update(execfn=execfn)
    str_base = (stack_top - len(strings)) & ~0xF

    def addr(off: int) -> int:
        return str_base + off

    auxv = [(AT_PHDR, image.phdr_vaddr), (AT_PHENT, image.phentsize), (AT_PHNUM, image.phnum),
            (AT_PAGESZ, PAGE_SIZE), (AT_BASE, 0), (AT_FLAGS, 0), (AT_ENTRY, image.entry),
            (AT_UID, 1000), (AT_EUID, 1000), (AT_GID, 1000), (AT_EGID, 1000), (AT_SECURE, 0),
            (AT_PLATFORM, addr(plat_off)), (AT_HWCAP, 0), (AT_HWCAP2, 0), (AT_CLKTCK, 100),
            (AT_RANDOM, addr(rand_off)), (AT_EXECFN, addr(execfn)), (AT_NULL, 0)]
    table = [len(argv), *map(addr, arg_off), 0, *map(addr, env_off), 0]
    for key, val in auxv:
        table += [key, val]
    table_bytes = b"".join(word.pack(v) for v in table)
    sp = (str_base - len(table_bytes)) & ~0xF
    blob = bytearray(stack_top - sp)
    blob[0:len(table_bytes)] = table_bytes
    blob[str_base - sp:str_base - sp + len(strings)] = strings
    return sp, bytes(blob)
